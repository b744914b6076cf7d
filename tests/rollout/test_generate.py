"""Batched generation: padding never changes greedy output, sampling is seeded, stopping is exact."""

from __future__ import annotations

import pytest
import torch

from mmalign.data.collate import SFTCollator
from mmalign.data.schema import ImageRef, Message, Sample
from mmalign.errors import DataError
from mmalign.models.tiny import build_tiny
from mmalign.rollout.generate import GenerationConfigSpec, generate, render_prompt, stop_token_ids
from mmalign.world.corpus import eval_scenes
from mmalign.world.render import render

TINY = {
    "image_size": 32,
    "vision_hidden": 32,
    "vision_layers": 1,
    "text_hidden": 32,
    "text_layers": 2,
    "heads": 2,
}

# (prompt, response) pairs the trained fixture memorises; the image prompt sees scene 0.
CAPTION = "There is a large red circle in the top left."
ANSWER = "No."


@pytest.fixture(scope="module")
def llava() -> tuple[object, object]:
    model, processor = build_tiny("llava", **TINY)
    return model, processor


@pytest.fixture(scope="module")
def scenes() -> list:
    return eval_scenes(6, seed=0)


def _mixed_prompts(scenes: list) -> tuple[list[list[Message]], list[list[object]]]:
    """Image prompts of different lengths interleaved with text-only prompts."""
    questions = [
        "Describe the image.",
        "How many circles are there?",
        "What word is written?",
        "Is there a star?",
    ]
    prompts, images = [], []
    for i, scene in enumerate(scenes):
        text_only = i % 3 == 2
        prompts.append([Message.user(questions[i % 4], n_images=0 if text_only else 1)])
        images.append([] if text_only else [render(scene)])
    return prompts, images


def test_greedy_batched_equals_one_by_one_with_left_padding(llava, scenes) -> None:
    model, processor = llava
    prompts, images = _mixed_prompts(scenes)
    batched = generate(model, processor, prompts, images, max_new_tokens=6, batch_size=4)
    single = [
        generate(model, processor, [p], [i], max_new_tokens=6)[0]
        for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == single
    assert len(set(batched)) > 1  # the random model says different things to different prompts


def test_sampling_is_reproducible_with_the_same_seed_and_changes_with_another(llava, scenes) -> None:
    model, processor = llava
    prompts, images = _mixed_prompts(scenes)
    kw = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "batch_size": 3}
    torch.manual_seed(123)
    before = torch.rand(1)
    a = generate(model, processor, prompts, images, seed=7, **kw)
    b = generate(model, processor, prompts, images, seed=7, **kw)
    c = generate(model, processor, prompts, images, seed=8, **kw)
    assert a == b
    assert a != c
    torch.manual_seed(123)  # the caller's RNG stream is not consumed by generation
    assert torch.equal(torch.rand(1), before)


def test_prompt_is_rendered_with_the_generation_prompt(llava) -> None:
    _, processor = llava
    text = render_prompt(processor, [Message.system("Be careful."), Message.user("Is there a star?", 1)])
    assert text == "<|system|>Be careful.<|end|><|user|><image>Is there a star?<|end|><|assistant|>"


def test_stop_tokens_include_end_of_turn(llava) -> None:
    model, processor = llava
    end = processor.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in stop_token_ids(model, processor)


@pytest.fixture(scope="module")
def trained_llava(scenes) -> tuple[object, object]:
    """A tiny LLaVA that memorised one caption (image prompt) and one answer (text-only prompt)."""
    model, processor = build_tiny("llava", **TINY)
    records = [
        Sample(
            id="cap",
            images=[ImageRef.from_pil(render(scenes[0]))],
            conversation=[Message.user("Describe the image.", 1), Message.assistant(CAPTION)],
        ),
        Sample(id="qa", conversation=[Message.user("Is there a star?"), Message.assistant(ANSWER)]),
    ]
    batch = SFTCollator(processor)(records)
    assert batch is not None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    return model, processor


def test_generation_stops_at_end_of_turn_and_strips_the_prompt(trained_llava, scenes) -> None:
    model, processor = trained_llava
    prompts = [[Message.user("Is there a star?")], [Message.user("Describe the image.", 1)]]
    out = generate(model, processor, prompts, [[], [render(scenes[0])]], max_new_tokens=40, batch_size=2)
    assert out == [ANSWER, CAPTION]


def test_max_new_tokens_cuts_the_response(trained_llava, scenes) -> None:
    model, processor = trained_llava
    tok = processor.tokenizer
    prompt = [[Message.user("Describe the image.", 1)]]
    out = generate(model, processor, prompt, [[render(scenes[0])]], max_new_tokens=3)
    first3 = tok(CAPTION, add_special_tokens=False)["input_ids"][:3]
    assert out == [tok.decode(first3, skip_special_tokens=True).strip()]
    assert out[0] != CAPTION


def test_text_lm_generates_with_the_tokenizer_as_processor() -> None:
    model, tokenizer = build_tiny("llama", text_hidden=32, text_layers=2, heads=2)
    prompts = [[Message.user("Is there a star?")], [Message.user("How many red shapes are there in total?")]]
    batched = generate(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    single = [generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored after generation


def test_small_models_decode_on_one_thread_and_the_thread_count_is_restored(llava, scenes) -> None:
    model, processor = llava
    prompts, images = _mixed_prompts(scenes[:3])  # two image prompts, one text-only
    seen: list[int] = []
    before = torch.get_num_threads()
    generate(
        model,
        processor,
        prompts,
        images,
        max_new_tokens=2,
        progress=lambda d, t: seen.append(torch.get_num_threads()),
    )
    assert seen == [1, 1]  # one batch per image count
    assert torch.get_num_threads() == before


def test_image_count_mismatch_is_a_clear_error(llava) -> None:
    model, processor = llava
    with pytest.raises(DataError, match=r"prompts\[0\]: 1 image part\(s\) but 0 image\(s\)"):
        generate(model, processor, [[Message.user("Describe the image.", 1)]], [[]])


def test_generation_config_spec_round_trips_to_generate_kwargs() -> None:
    spec = GenerationConfigSpec(max_new_tokens=8, do_sample=True, seed=3)
    assert spec.kwargs() == {
        "max_new_tokens": 8,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 3,
        "batch_size": 16,
        "num_threads": None,
    }


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3", "paligemma"])
def test_other_vlm_architectures_batch_mixed_prompts_without_changing_greedy_output(arch, scenes) -> None:
    model, processor = build_tiny(arch, **TINY)
    prompts, images = _mixed_prompts(scenes[:4])
    batched = generate(model, processor, prompts, images, max_new_tokens=4, batch_size=4)
    single = [
        generate(model, processor, [p], [i], max_new_tokens=4)[0]
        for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == single
