"""load_model on saved tiny models: auto classes, dtype, errors naming the path, LoRA freezing, helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmalign.errors import ModelLoadError
from mmalign.models.load import (
    LoraSpec,
    count_parameters,
    image_token_id,
    is_vision_model,
    language_model_linear_names,
    load_model,
)
from mmalign.models.tiny import build_tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llava, qwen2_vl and llama tiny models saved to disk (weights + processor)."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for arch in ("llava", "qwen2_vl", "llama"):
        model, processor = build_tiny(arch, seed=0)
        model.save_pretrained(root / arch)
        processor.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


def test_vision_dirs_load_as_image_text_to_text_with_their_processor(saved: dict[str, Path]) -> None:
    model, processor = load_model(saved["llava"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert model.training and is_vision_model(model)
    assert image_token_id(processor) == model.config.image_token_id
    qwen, qproc = load_model(str(saved["qwen2_vl"]), for_training=False)
    assert type(qwen).__name__ == "Qwen2VLForConditionalGeneration"
    assert not qwen.training
    assert (
        image_token_id(qproc)
        == qwen.config.image_token_id
        == qproc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    )
    assert json.loads((saved["qwen2_vl"] / "processor_config.json").read_text())["processor_class"] == (
        "Qwen2VLProcessor"
    )


def test_text_dir_loads_as_causal_lm_with_a_tokenizer(saved: dict[str, Path]) -> None:
    model, tok = load_model(saved["llama"])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not is_vision_model(model)
    assert image_token_id(tok) is None
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == "<|user|>Hi<|end|>"


def test_loaded_weights_equal_the_saved_ones_and_bf16_casts(saved: dict[str, Path]) -> None:
    built, _ = build_tiny("llama", seed=0)
    model, _ = load_model(saved["llama"])
    ref = built.state_dict()
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())
    half, _ = load_model(saved["llama"], dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_tiny_prefix_builds_in_memory(red_image: Any) -> None:
    model, processor = load_model("tiny:idefics3", for_training=False)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    assert not model.training
    assert image_token_id(processor) == model.config.image_token_id
    with pytest.raises(ModelLoadError, match="unknown arch 'nope'"):
        load_model("tiny:nope")


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match=f"^{missing}: no such file or directory$"):
        load_model(missing)
    with pytest.raises(ModelLoadError, match=r"^\./nowhere/at/all: no such"):
        load_model("./nowhere/at/all")


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=f"^{tmp_path}: not a model directory \\(no config.json\\)$"):
        load_model(tmp_path)


def test_unknown_architecture_is_reported_with_the_path(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "martian_vlm"}))
    with pytest.raises(ModelLoadError, match=f"^{tmp_path}: unknown or unsupported architecture"):
        load_model(tmp_path)


def test_only_safetensors_weights_are_read(saved: dict[str, Path], tmp_path: Path) -> None:
    model, tok = load_model(saved["llama"])
    model.config.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=f"^{tmp_path}: cannot load safetensors weights"):
        load_model(tmp_path)


def test_unknown_dtype_is_refused(saved: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="dtype: expected one of \\['bf16', 'fp32'\\], got 'fp16'"):
        load_model(saved["llama"], dtype="fp16")  # type: ignore[arg-type]


def test_hub_id_takes_the_hub_path_and_fails_cleanly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"^someone/missing-tiny-vlm: cannot load a model config"):
        load_model("someone/missing-tiny-vlm")


def test_lora_trains_only_language_model_adapters(kit: Any, saved: dict[str, Path], red_image: Any) -> None:
    model, processor = load_model(saved["llava"], lora=LoraSpec(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 3 layers x (q, k, v, o, gate, up, down) x (A, B)
    assert len(trainable) == 3 * 7 * 2
    assert all("lora_" in n and ".language_model." in n for n in trainable)
    before = kit.snapshot(model)
    losses = kit.sft_steps(model, kit.sft_batch(processor, red_image, vision=True), steps=3)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(trainable)
    # LoRA on Linear(i, o) adds r * (i + o): q, k, v, o (192→192), gate, up (192→384), down (384→192)
    per_layer = 4 * (192 + 192) + 2 * (192 + 384) + (384 + 192)
    assert count_parameters(model, trainable_only=True) == 3 * 4 * per_layer


def test_lora_target_modules_pick_language_model_layers_by_name(saved: dict[str, Path]) -> None:
    model, _ = load_model(saved["llava"], lora=LoraSpec(r=2, target_modules=("q_proj", "v_proj")))
    adapted = sorted({n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad})
    expected = [
        f"base_model.model.model.language_model.layers.{i}.self_attn.{m}" for i in range(3) for m in "qv"
    ]
    assert adapted == [e + "_proj" for e in expected]
    with pytest.raises(ModelLoadError, match="match no language-model linear layer"):
        load_model(saved["llava"], lora=LoraSpec(target_modules=("patch_embedding",)))


def test_language_model_linear_names_exclude_vision_tower_projector_and_head() -> None:
    model, _ = build_tiny("llava")
    names = language_model_linear_names(model)
    assert len(names) == 21
    assert all(n.startswith("model.language_model.layers.") for n in names)


def test_count_parameters_counts_shared_tensors_once() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))  # 12+4 + 12+3
    assert count_parameters(net) == 31
    net[1].weight = nn.Parameter(net[0].weight.T.contiguous())
    tied = nn.Sequential(net[0], net[0])
    assert count_parameters(tied) == 16
    net[0].bias.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 27


def test_image_token_id_of_a_plain_tokenizer_is_none(kit: Any, world_tokenizer: Any) -> None:
    assert image_token_id(world_tokenizer) is None
    assert kit.tokenizer_of(world_tokenizer) is world_tokenizer
