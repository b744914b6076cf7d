"""mmalign.models: model/processor loading (any HF VLM or LM, LoRA via peft) and tiny-model factories."""

from __future__ import annotations

from mmalign.models.load import (
    LoraSpec,
    apply_lora,
    count_parameters,
    image_token_id,
    is_vision_config,
    is_vision_model,
    load_model,
)
from mmalign.models.tiny import ARCHES, IMAGE_PLACEHOLDERS, TinySpec, build_tiny, prefix_lm_token_type_ids

__all__ = [
    "ARCHES",
    "IMAGE_PLACEHOLDERS",
    "LoraSpec",
    "TinySpec",
    "apply_lora",
    "build_tiny",
    "count_parameters",
    "image_token_id",
    "is_vision_config",
    "is_vision_model",
    "load_model",
    "prefix_lm_token_type_ids",
]
