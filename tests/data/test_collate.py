"""The SFT collator on real tiny models of every architecture: exact assistant-only labels, image tokens that
match the model (a forward pass must not fail), extra processor inputs passed through, truncation policy."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mmalign.data.collate import (
    IGNORE_INDEX,
    SFTCollator,
    render_conversation,
    response_token_mask,
    spans_to_token_mask,
)
from mmalign.data.schema import Dialogue, ImagePart, ImageRef, Message, PreferencePair, Sample, TextPart
from mmalign.errors import DataError, TruncationError

FIXTURES = Path(__file__).parent / "fixtures"
VISION_ARCHES = ["llava", "qwen2_vl", "idefics3", "paligemma"]
END = "<|end|>"
IMAGE_TOKEN = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "idefics3": "<image>", "paligemma": "<image>"}
EXTRA_KEYS = {
    "llava": {"pixel_values"},
    "qwen2_vl": {"pixel_values", "image_grid_thw", "mm_token_type_ids"},
    "idefics3": {"pixel_values", "pixel_attention_mask"},
    "paligemma": {"pixel_values", "token_type_ids"},
}

_BUILT: dict[str, tuple[Any, Any]] = {}


def tiny(arch: str) -> tuple[Any, Any]:
    """(model, processor) from ``build_tiny``, built once per test session; skipped if unavailable."""
    if arch not in _BUILT:
        try:
            from mmalign.models.tiny import build_tiny

            _BUILT[arch] = build_tiny(arch)
        except (ImportError, Exception) as err:  # the tiny factory or its processor is not available yet
            pytest.skip(f"build_tiny({arch!r}) is not available: {type(err).__name__}: {err}")
    return _BUILT[arch]


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


RED = ImageRef.from_pil(Image.new("RGB", (32, 48), (255, 0, 0)))
BLUE = ImageRef.from_pil(Image.new("RGB", (40, 40), (0, 0, 255)))

ONE_IMAGE = Sample(
    id="one-image",
    images=[RED],
    conversation=[
        Message.user("Describe the image.", n_images=1),
        Message.assistant("There is a red square."),
    ],
)
TEXT_ONLY = Sample(
    id="text-only",
    conversation=[
        Message.system("Answer yes or no."),
        Message.user("Is there a circle?"),
        Message.assistant("yes"),
        Message.user("Is it red?"),
        Message.assistant("no"),
    ],
)
TWO_IMAGES = Sample(
    id="two-images",
    images=[RED, BLUE],
    conversation=[
        Message.user("Describe the image.", n_images=2),
        Message.assistant("There is a blue circle."),
    ],
)
IMAGE_IN_RESPONSE = Sample(
    id="image-in-response",
    images=[RED, BLUE],
    conversation=[
        Message.user("Describe the image.", n_images=1),
        Message(
            role="assistant",
            content=[TextPart(text="There is a"), ImagePart(), TextPart(text=" blue circle.")],
        ),
    ],
)
BATCH = [ONE_IMAGE, TEXT_ONLY, TWO_IMAGES, IMAGE_IN_RESPONSE]


def assistant_texts(record: Sample) -> list[str]:
    return [m.text for m in record.conversation if m.role == "assistant"]


def expected_label_positions(tok: Any, ids: list[int], image_ids: set[int]) -> list[int]:
    """Independent of the collator: every token after an ``<|assistant|>`` header up to and including the
    next ``<|end|>``, except image tokens."""
    header, end = tok.convert_tokens_to_ids("<|assistant|>"), tok.convert_tokens_to_ids(END)
    positions, inside = [], False
    for t, token in enumerate(ids):
        if inside and token not in image_ids:
            positions.append(t)
        if token == header:
            inside = True
        elif token == end:
            inside = False
    return positions


def image_token_ids(tok: Any) -> set[int]:
    names = ["<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<fake_token_around_image>"]
    names.append("<global-img>")
    vocab = tok.get_vocab()
    return {vocab[n] for n in names if n in vocab}


# ------------------------------------------------------------------------------- spans


def test_spans_to_token_mask_marks_tokens_overlapping_any_span() -> None:
    offsets = [(0, 5), (5, 8), (8, 8), (8, 12), (12, 13)]
    assert spans_to_token_mask(offsets, [(3, 6)]) == [True, True, False, False, False]
    assert spans_to_token_mask(offsets, [(5, 5), (8, 9)]) == [False, False, False, True, False]
    assert spans_to_token_mask(offsets, [(12, 13), (0, 1)]) == [True, False, False, False, True]
    assert spans_to_token_mask(offsets, []) == [False] * 5


def test_spans_touching_a_token_boundary_do_not_mark_the_neighbour() -> None:
    assert spans_to_token_mask([(0, 5), (5, 8)], [(5, 8)]) == [False, True]
    assert spans_to_token_mask([(0, 5), (5, 8)], [(0, 5)]) == [True, False]


# ------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("arch", ["llama", *VISION_ARCHES])
def test_labels_cover_exactly_the_assistant_turns_and_end_tokens(arch: str) -> None:
    _, processor = tiny(arch)
    tok = tokenizer_of(processor)
    records = [TEXT_ONLY] if arch == "llama" else BATCH
    batch = SFTCollator(processor)(records)
    assert batch is not None
    image_ids = image_token_ids(tok)
    if arch == "paligemma":  # its processor inserts <s> after the last image, here inside a response
        image_ids.add(tok.bos_token_id)
    for row, record in enumerate(records):
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        labels = batch["labels"][row][batch["attention_mask"][row] == 1]
        supervised = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == expected_label_positions(tok, ids, image_ids), record.id
        assert labels[supervised].tolist() == [ids[t] for t in supervised]
        decoded = tok.decode(labels[labels != IGNORE_INDEX])
        assert decoded == "".join(text + END for text in assistant_texts(record)), record.id
    # padding is right padding and never labelled
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["attention_mask"][:, 0].tolist() == [1] * len(records)


def test_text_only_labels_on_llama_are_pinned() -> None:
    _, tok = tiny("llama")
    ex = render_conversation(tok, TEXT_ONLY.conversation)
    assert ex is not None
    assert tok.convert_ids_to_tokens(ex.input_ids[ex.labels != IGNORE_INDEX]) == ["yes", END, "no", END]
    assert ex.text == (
        "<|system|>Answer yes or no.<|end|><|user|>Is there a circle?<|end|><|assistant|>yes<|end|>"
        "<|user|>Is it red?<|end|><|assistant|>no<|end|>"
    )
    assert ex.assistant_spans == [
        (ex.text.index("yes<|end|><|user|>"), ex.text.index("<|user|>Is it")),
        (
            ex.text.index("no<|end|>", ex.text.index("Is it")),
            len(ex.text),
        ),
    ]


@pytest.mark.parametrize("arch", VISION_ARCHES)
def test_image_tokens_inside_a_response_never_get_labels(arch: str) -> None:
    _, processor = tiny(arch)
    tok = tokenizer_of(processor)
    images = [ref.load() for ref in IMAGE_IN_RESPONSE.images]
    ex = render_conversation(processor, IMAGE_IN_RESPONSE.conversation, images)
    assert ex is not None
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN[arch])
    is_image = ex.input_ids == image_id  # (T,)
    header = ex.input_ids.tolist().index(tok.convert_tokens_to_ids("<|assistant|>"))
    assert is_image[header:].any()  # the second image really is inside the response
    assert (ex.labels[is_image] == IGNORE_INDEX).all()
    assert tok.decode(ex.labels[ex.labels != IGNORE_INDEX]) == "There is a blue circle." + END


# ------------------------------------------------------------------- images and the model


@pytest.mark.parametrize("arch", VISION_ARCHES)
def test_mixed_batch_runs_through_the_model_without_image_token_mismatch(arch: str) -> None:
    model, processor = tiny(arch)
    batch = SFTCollator(processor)(BATCH)
    assert batch is not None
    tok = tokenizer_of(processor)
    n_image_tokens = int((batch["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN[arch])).sum())
    if arch == "qwen2_vl":  # one token per 2x2 merged patches of each image's grid
        per_batch = int(batch["image_grid_thw"].prod(dim=-1).sum()) // 4
        assert batch["image_grid_thw"].shape == (5, 3)
    else:
        per_image = {"llava": 16, "idefics3": 4, "paligemma": 16}[arch]
        per_batch = 5 * per_image
    assert n_image_tokens == per_batch
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", VISION_ARCHES)
def test_extra_processor_inputs_pass_through_as_the_processor_batches_them(arch: str) -> None:
    _, processor = tiny(arch)
    batch = SFTCollator(processor)(BATCH)
    assert batch is not None
    assert set(batch) == {"input_ids", "attention_mask", "labels"} | EXTRA_KEYS[arch]
    image_records = [r for r in BATCH if r.images]
    texts = [processor.apply_chat_template([m.model_dump() for m in r.conversation]) for r in image_records]
    images = [[ref.load() for ref in r.images] for r in image_records]
    direct = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    for key in EXTRA_KEYS[arch] - {"token_type_ids", "mm_token_type_ids"}:
        assert torch.equal(batch[key], direct[key]), key
    if arch == "qwen2_vl":  # per-token: 1 on image tokens, 0 elsewhere (also on the text-only row)
        image_id = tokenizer_of(processor).convert_tokens_to_ids("<|image_pad|>")
        assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id).long())


def test_text_only_batch_has_no_image_inputs() -> None:
    _, processor = tiny("qwen2_vl")
    batch = SFTCollator(processor)([TEXT_ONLY, TEXT_ONLY])
    assert batch is not None
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_paligemma_token_type_ids_make_the_response_causal() -> None:
    _, processor = tiny("paligemma")
    batch = SFTCollator(processor)([ONE_IMAGE, TEXT_ONLY])
    assert batch is not None
    for row in range(2):
        first_label = int((batch["labels"][row] != IGNORE_INDEX).nonzero()[0])
        assert batch["token_type_ids"][row, :first_label].tolist() == [0] * first_label
        n = int(batch["attention_mask"][row].sum())
        assert batch["token_type_ids"][row, first_label:n].tolist() == [1] * (n - first_label)


def test_images_are_loaded_relative_to_base_dir() -> None:
    _, processor = tiny("llava")
    record = Sample(
        id="from-file",
        images=[ImageRef(path="red.png")],
        conversation=[Message.user("Describe the image.", 1), Message.assistant("There is a red square.")],
    )
    batch = SFTCollator(processor, base_dir=FIXTURES)([record])
    assert batch is not None
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    again = SFTCollator(processor)([record], base_dir=FIXTURES)
    assert again is not None and torch.equal(again["pixel_values"], batch["pixel_values"])


# ----------------------------------------------------------------------------- records


def test_pairs_train_on_the_chosen_side_by_default_and_dialogues_on_every_turn() -> None:
    _, processor = tiny("llava")
    tok = processor.tokenizer
    pair = PreferencePair(
        id="pair",
        images=[RED],
        prompt=[Message.user("Describe the image.", 1)],
        chosen="There is a red square.",
        rejected="There is a blue circle.",
    )
    dialogue = Dialogue(id="dialogue", conversation=TEXT_ONLY.conversation, truths=[{"answer": "yes"}, {}])
    for side, text in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        batch = SFTCollator(processor, pair_side=side)([pair, dialogue])  # type: ignore[arg-type]
        assert batch is not None
        first, second = batch["labels"]
        assert tok.decode(first[first != IGNORE_INDEX]) == text + END
        assert tok.decode(second[second != IGNORE_INDEX]) == "yes" + END + "no" + END


def test_image_count_mismatch_names_the_sample() -> None:
    _, processor = tiny("llava")
    with pytest.raises(DataError, match=r"sample 'x': 1 image part\(s\) but 0 image\(s\)"):
        render_conversation(processor, ONE_IMAGE.conversation, [], sample_id="x")


# ---------------------------------------------------------------------------- truncation


def test_truncation_error_names_the_sample_id() -> None:
    _, processor = tiny("llava")
    collator = SFTCollator(processor, max_length=30)
    assert collator([ONE_IMAGE]) is not None  # exactly 30 tokens: fits
    with pytest.raises(TruncationError, match=r"sample 'two-images' has 46 tokens .* > max_length=30"):
        collator([ONE_IMAGE, TWO_IMAGES])


def test_drop_policy_drops_and_counts_long_samples(caplog: pytest.LogCaptureFixture) -> None:
    _, processor = tiny("llava")
    collator = SFTCollator(processor, max_length=30, truncation="drop")
    with caplog.at_level(logging.WARNING, logger="mmalign.data.collate"):
        batch = collator([TWO_IMAGES, ONE_IMAGE, IMAGE_IN_RESPONSE])
    assert batch is not None
    assert collator.n_dropped == 2
    assert batch["input_ids"].shape == (1, 30)
    assert batch["pixel_values"].shape == (1, 3, 64, 64)  # the dropped samples' images are gone too
    assert "'two-images'" in caplog.text and "'image-in-response'" in caplog.text


def test_a_batch_with_every_sample_dropped_returns_none() -> None:
    _, processor = tiny("llava")
    collator = SFTCollator(processor, max_length=10, truncation="drop")
    assert collator([ONE_IMAGE, TWO_IMAGES]) is None
    assert collator.n_dropped == 2


def test_unknown_truncation_policy_is_refused() -> None:
    _, processor = tiny("llama")
    with pytest.raises(DataError, match="truncation must be 'error' or 'drop'"):
        SFTCollator(processor, truncation="left")  # type: ignore[arg-type]


# ------------------------------------------------------------------------ response spans


def test_response_spans_map_to_exactly_the_overlapping_tokens() -> None:
    _, tok = tiny("llama")
    response = "There is a red square. There is a blue circle."
    messages = [Message.user("Describe the image."), Message.assistant(response)]
    mask = response_token_mask(tok, messages, [(response.index("blue"), response.index(" circle"))])
    ex = render_conversation(tok, messages)
    assert ex is not None
    assert tok.convert_ids_to_tokens(ex.input_ids[torch.tensor(mask)]) == ["▁blue"]
    second = (response.index("There is a blue"), len(response))
    mask = response_token_mask(tok, messages, [second])
    assert tok.decode(ex.input_ids[torch.tensor(mask)]) == " There is a blue circle."
    assert sum(mask) == 6


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_response_spans_across_an_image_in_the_response_skip_the_image_tokens(arch: str) -> None:
    _, processor = tiny(arch)
    tok = processor.tokenizer
    message = IMAGE_IN_RESPONSE.conversation[1]
    assert message.text == "There is a blue circle."
    images = [ref.load() for ref in IMAGE_IN_RESPONSE.images]
    span = (message.text.index("a blue"), message.text.index(" circle"))  # "a" | image | " blue"
    mask = response_token_mask(processor, IMAGE_IN_RESPONSE.conversation, [span], images)
    ex = render_conversation(processor, IMAGE_IN_RESPONSE.conversation, images)
    assert ex is not None and len(mask) == len(ex.input_ids)
    assert tok.convert_ids_to_tokens(ex.input_ids[torch.tensor(mask)]) == ["▁a", "▁blue"]


def test_response_span_outside_the_response_is_refused() -> None:
    _, tok = tiny("llama")
    with pytest.raises(DataError, match=r"span \(0, 99\) outside the 2-char response"):
        response_token_mask(tok, [Message.user("Is it red?"), Message.assistant("no")], [(0, 99)])


# ------------------------------------------------------------------------------ internals


def test_offsets_align_through_inserted_tokens_greedily() -> None:
    from mmalign.data.collate import _align_offsets

    plain, offsets = [5, 7, 8], [(0, 1), (1, 4), (4, 6)]
    # the processor expanded token 7 (a placeholder) into three and inserted 9 before and after
    assert _align_offsets(plain, offsets, [9, 5, 7, 7, 7, 8, 9]) == [
        (0, 0),
        (0, 1),
        (1, 4),
        (0, 0),
        (0, 0),
        (4, 6),
        (0, 0),
    ]


def test_offsets_align_with_a_general_alignment_when_the_processor_removed_a_token() -> None:
    from mmalign.data.collate import _align_offsets

    plain, offsets = [5, 6, 7, 8], [(0, 1), (1, 2), (2, 3), (3, 4)]
    # the longest common run (7, 8) is matched first; the extra 7 is treated as inserted
    assert _align_offsets(plain, offsets, [5, 7, 7, 8]) == [(0, 1), (0, 0), (2, 3), (3, 4)]


def test_text_tokenizers_get_plain_string_content_for_their_template() -> None:
    tok = copy.deepcopy(tiny("llama")[1])
    tok.chat_template = (  # concatenating a list of parts to a string would fail
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    ex = render_conversation(tok, TEXT_ONLY.conversation)
    assert ex is not None
    assert tok.decode(ex.labels[ex.labels != IGNORE_INDEX]) == "yes<|end|>no<|end|>"


@pytest.mark.parametrize("arch", ["qwen2_vl", "idefics3"])
def test_a_video_given_as_four_frames_runs_through_the_model(arch: str) -> None:
    model, processor = tiny(arch)
    frames = [ImageRef.from_pil(Image.new("RGB", (48, 48), (60 * k, 0, 0))) for k in range(4)]
    video = Sample(
        id="video",
        images=frames,
        conversation=[
            Message.user("Describe the image.", n_images=4),
            Message.assistant("There is a red circle."),
        ],
    )
    batch = SFTCollator(processor)([video, TEXT_ONLY])
    assert batch is not None
    assert batch["pixel_values"].shape[0] == (16 * 4 if arch == "qwen2_vl" else 1)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_response_spans_need_an_assistant_message() -> None:
    _, tok = tiny("llama")
    with pytest.raises(DataError, match="no assistant message"):
        response_token_mask(tok, [Message.user("Is it red?")], [(0, 1)])


def test_batches_are_right_padded_with_the_pad_token() -> None:
    _, tok = tiny("llama")
    short = Sample(id="short", conversation=[Message.user("Is it red?"), Message.assistant("no")])
    batch = SFTCollator(tok)([TEXT_ONLY, short])
    assert batch is not None
    assert batch["input_ids"].shape == (2, 26)
    assert batch["attention_mask"].sum(dim=1).tolist() == [
        26,
        9,
    ]  # <|user|>Is▁it▁red?<|end|><|assistant|>no<|end|>
    assert batch["input_ids"][1, 9:].tolist() == [tok.pad_token_id] * 17
    assert (
        batch["labels"][1].tolist() == [IGNORE_INDEX] * 7 + batch["input_ids"][1, 7:9].tolist() + [-100] * 17
    )
