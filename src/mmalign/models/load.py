"""Load any Hugging Face vision-language or text model with its processor (optionally LoRA-wrapped).

``load_model(name_or_path)`` takes a local directory, a hub id (same code path; the hub is not reachable
in our tests) or ``"tiny:<arch>"`` (an in-memory model from :mod:`mmalign.models.tiny`). Vision-language
configs are loaded with ``AutoModelForImageTextToText`` + ``AutoProcessor``, text-only ones with
``AutoModelForCausalLM`` + ``AutoTokenizer``. Only safetensors weights are read; remote code is off unless
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mmalign.errors import ModelLoadError

Dtype = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
TINY_PREFIX = "tiny:"


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter on the language model's linear layers."""

    r: int = 8
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: tuple[str, ...] | None = None
    """Last name components of the language-model linear layers to adapt (e.g. ``("q_proj", "v_proj")``);
    ``None`` adapts every linear layer of the language model (never the vision tower, projector or head)."""
    extra_modules: tuple[str, ...] = field(default=())
    """Full module names adapted in addition (e.g. a vision-tower layer), for experiments."""


def load_model(
    name_or_path: str | Path,
    *,
    dtype: Dtype = "fp32",
    lora: LoraSpec | None = None,
    trust_remote_code: bool = False,
    for_training: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, processor)``; the processor is the tokenizer for text-only models.

    ``for_training`` puts the model in train mode (else eval mode). Raises :class:`ModelLoadError` naming
    ``name_or_path`` when it does not exist, is not a model, or its architecture is unknown.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"{name_or_path}: dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        from mmalign.models.tiny import build_tiny

        model, processor = build_tiny(name[len(TINY_PREFIX) :])
        model = model.to(DTYPES[dtype])
    else:
        model, processor = _load_pretrained(name, DTYPES[dtype], trust_remote_code)
    if lora is not None:
        model = apply_lora(model, lora)
    model.train(for_training)
    return model, processor


def _load_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    import transformers as tf

    path = Path(name).expanduser()
    local = path.exists()
    if not local and _looks_like_path(name):
        raise ModelLoadError(f"{name}: no such file or directory")
    if local and not (path / "config.json").is_file():
        raise ModelLoadError(f"{name}: not a model directory (no config.json)")
    source = str(path) if local else name
    try:
        config = tf.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as err:  # unknown model_type, or remote code refused
        raise ModelLoadError(f"{name}: unknown or unsupported architecture: {err}") from err
    except OSError as err:  # not on the hub / no network / unreadable config
        raise ModelLoadError(f"{name}: cannot load a model config: {err}") from err
    vision = is_vision_config(config)
    auto_model = tf.AutoModelForImageTextToText if vision else tf.AutoModelForCausalLM
    try:
        model = auto_model.from_pretrained(
            source, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except ValueError as err:  # config class not supported by the auto class
        kind = "vision-language" if vision else "causal LM"
        raise ModelLoadError(
            f"{name}: unsupported {kind} architecture {type(config).__name__}: {err}"
        ) from err
    except OSError as err:  # e.g. no model.safetensors
        raise ModelLoadError(f"{name}: cannot load safetensors weights: {err}") from err
    try:
        if getattr(config, "model_type", None) == "qwen2_vl":
            from mmalign.models.tiny import qwen2_vl_processor_class

            processor = qwen2_vl_processor_class().from_pretrained(
                source, trust_remote_code=trust_remote_code
            )
        elif vision:
            processor = tf.AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        else:
            processor = tf.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{name}: cannot load the processor/tokenizer: {err}") from err
    return model, processor


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``owner/name``; anything else that does not exist is a missing path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name == ""


def is_vision_config(config: Any) -> bool:
    """True when ``config`` describes a vision-language model (it has a vision tower)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    return (
        type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        or getattr(config, "vision_config", None) is not None
    )


def is_vision_model(model: Any) -> bool:
    """True for vision-language models (also when wrapped by peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return is_vision_config(base.config)


def image_token_id(processor: Any) -> int | None:
    """Id of the token the processor expands images into (``None`` for a plain tokenizer)."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is not None:
        return int(token_id)
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if token is None or tokenizer is None:
        return None
    return int(tokenizer.convert_tokens_to_ids(token))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def language_model_linear_names(model: Any) -> list[str]:
    """Full names of the ``nn.Linear`` layers inside the language model (decoder), excluding the LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, nn.Module):
        raise ModelLoadError(f"{type(model).__name__}: cannot find the language model (no get_decoder())")
    inside = {id(m) for m in decoder.modules()}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def apply_lora(model: Any, spec: LoraSpec) -> Any:
    """Wrap ``model`` with a peft LoRA adapter; base weights are frozen, only adapter weights train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a dependency
        raise ModelLoadError("LoRA needs peft: pip install peft") from err
    names = language_model_linear_names(model)
    if spec.target_modules is not None:
        wanted = set(spec.target_modules)
        names = [n for n in names if n.rsplit(".", 1)[-1] in wanted]
    names += list(spec.extra_modules)
    if not names:
        raise ModelLoadError(
            f"{type(model).__name__}: LoRA target_modules {spec.target_modules} "
            "match no language-model linear layer"
        )
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names)
    return get_peft_model(model, config)
