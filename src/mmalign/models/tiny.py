"""Tiny, randomly initialised but *real* Hugging Face models built from configs, one per architecture.

No pretrained weights can be downloaded, so every test, demo and recipe trains models that this module builds:
``build_tiny(arch)`` returns ``(model, processor)`` where the model is the genuine transformers class
(``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ``Idefics3ForConditionalGeneration``,
``PaliGemmaForConditionalGeneration`` or ``LlamaForCausalLM``) and the processor is the architecture's own
processor around a copy of the world tokenizer, with the chat template set.

Image placeholders written by the chat template (the processor expands each one to the image's tokens):

* ``llava``: ``<image>`` → ``(image_size/patch)^2`` ``<image>`` tokens (CLS dropped, strategy ``default``).
* ``qwen2_vl``: ``<|vision_start|><|image_pad|><|vision_end|>`` → ``(image_size/patch)^2 / 4`` pads.
* ``idefics3``: ``<image>`` → ``<fake_token_around_image><global-img><image>*n<fake_token_around_image>``
  with ``n = (image_size/patch)^2 / scale_factor^2`` (no image splitting).
* ``paligemma``: ``<image>`` → ``(image_size/patch)^2`` ``<image>`` tokens; the processor also inserts
  ``bos`` after the last image token and appends ``"\\n"``, which our copy of the tokenizer normalises
  away. It returns ``token_type_ids`` (0 = bidirectional prefix, 1 = causal); see
  :func:`prefix_lm_token_type_ids` for training.
* ``llama``: no images; the "processor" is the tokenizer itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.errors import ModelLoadError
from mmalign.models.load import load_model

ARCHES: tuple[str, ...] = ("llava", "qwen2_vl", "idefics3", "paligemma", "llama")
VISION_ARCHES: frozenset[str] = frozenset({"llava", "qwen2_vl", "idefics3", "paligemma"})

#: What the chat template writes for one image part, per architecture.
IMAGE_PLACEHOLDERS: dict[str, str] = {
    "llava": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "paligemma": "<image>",
    "llama": "<image>",
}

#: Special tokens each architecture's processor/model needs on top of the world tokenizer's.
ARCH_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "llava": ("<image>",),
    "qwen2_vl": ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"),
    "idefics3": ("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"),
    "paligemma": ("<image>",),
    "llama": (),
}

END_OF_TURN = "<|end|>"


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model (the defaults give 1.1–1.9 M parameters with the world tokenizer)."""

    image_size: int = 64
    """Side of the square input image in pixels (the processor resizes every image to it)."""
    patch_size: int = 16
    """Vision patch side in pixels; ``image_size`` must be a multiple of it."""
    vision_hidden: int = 96
    """Hidden width of the vision tower."""
    vision_layers: int = 2
    """Number of vision transformer layers."""
    text_hidden: int = 192
    """Hidden width of the language model."""
    text_layers: int = 3
    """Number of language-model layers."""
    heads: int = 4
    """Attention heads (vision and text)."""
    seed: int = 0
    """Seed of the weight initialisation."""

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    def validate(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.vision_hidden % self.heads or self.text_hidden % self.heads:
            problems.append(
                f"heads={self.heads} must divide vision_hidden={self.vision_hidden} and "
                f"text_hidden={self.text_hidden}"
            )
        if (self.text_hidden // self.heads) % 2:
            problems.append(
                f"text head dim {self.text_hidden // self.heads} must be even (rotary embeddings)"
            )
        if problems:
            raise ModelLoadError("TinySpec: " + "; ".join(problems))


def build_tiny(
    arch: str,
    out_dir: str | Path | None = None,
    *,
    image_size: int = 64,
    patch_size: int = 16,
    vision_hidden: int = 96,
    vision_layers: int = 2,
    text_hidden: int = 192,
    text_layers: int = 3,
    heads: int = 4,
    tokenizer: Any | None = None,
    chat_template: Callable[[str], str] | None = None,
    seed: int = 0,
) -> tuple[Any, Any]:
    """Build a tiny randomly initialised ``arch`` model (in eval mode) and its processor.

    ``tokenizer`` defaults to ``mmalign.world.tokenizer.build_tokenizer()`` and ``chat_template`` (a function
    ``image_placeholder -> jinja template``) to ``mmalign.world.tokenizer.chat_template``; the tokenizer is
    copied, never modified. The same ``seed`` gives identical weights. With ``out_dir`` the model
    (safetensors) and processor are saved there and the returned pair is reloaded from disk.
    """
    if arch not in ARCHES:
        raise ModelLoadError(f"build_tiny: unknown arch {arch!r}; expected one of {', '.join(ARCHES)}")
    spec = TinySpec(
        image_size, patch_size, vision_hidden, vision_layers, text_hidden, text_layers, heads, seed
    )
    spec.validate()
    if tokenizer is None or chat_template is None:
        world_tokenizer, world_template = _world_tokenizer()
        tokenizer = world_tokenizer() if tokenizer is None else tokenizer
        chat_template = world_template if chat_template is None else chat_template
    tok = _arch_tokenizer(tokenizer, arch)
    template = chat_template(IMAGE_PLACEHOLDERS[arch])
    processor = _build_processor(arch, spec, tok, template)
    tok = processor if arch == "llama" else processor.tokenizer  # some processors add tokens at init
    config = _build_config(arch, spec, tok)
    model = _init_model(arch, config, seed)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    if out_dir is None:
        return model, processor
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return load_model(out, dtype="fp32", for_training=False)


def prefix_lm_token_type_ids(labels: torch.Tensor) -> torch.Tensor:
    """PaliGemma ``token_type_ids`` for training on a rendered conversation: 0 before the first supervised
    token (bidirectional prefix, as the processor gives for a generation prompt), 1 from it on (causal).

    labels: (B, T) with -100 on unsupervised positions → (B, T) long. Rows without labels are all 0.
    """
    supervised = (labels != -100).long()  # (B, T)
    return (supervised.cumsum(dim=-1) > 0).long()  # (B, T)


def qwen2_vl_processor_class() -> type[Any]:
    """``Qwen2VLProcessor``, or an image-only variant when torchvision is missing.

    transformers' ``Qwen2VLProcessor`` insists on a video processor, which needs torchvision (not installed).
    The variant saves itself as ``Qwen2VLProcessor`` so the saved directory stays standard.
    """
    import transformers as tf
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return tf.Qwen2VLProcessor
    global _IMAGE_ONLY_QWEN2_VL
    if _IMAGE_ONLY_QWEN2_VL is None:
        _IMAGE_ONLY_QWEN2_VL = _define_image_only_qwen2_vl()
    return _IMAGE_ONLY_QWEN2_VL


_IMAGE_ONLY_QWEN2_VL: type[Any] | None = None


def _define_image_only_qwen2_vl() -> type[Any]:
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):  # type: ignore[misc,valid-type]
        """Qwen2-VL processor without the (torchvision-only) video processor; images behave identically."""

        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw: Any
        ):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)

        def to_dict(self) -> dict[str, Any]:
            out: dict[str, Any] = super().to_dict()
            out["processor_class"] = "Qwen2VLProcessor"
            return out

    return ImageOnlyQwen2VLProcessor


# ----------------------------------------------------------------------------------------------------
def _world_tokenizer() -> tuple[Callable[[], Any], Callable[[str], str]]:
    from mmalign.world.tokenizer import build_tokenizer, chat_template

    return build_tokenizer, chat_template


def _arch_tokenizer(tokenizer: Any, arch: str) -> Any:
    """A copy of ``tokenizer`` with the architecture's special tokens and pad/bos/eos set."""
    tok = copy.deepcopy(tokenizer)
    missing = [t for t in ARCH_SPECIAL_TOKENS[arch] if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    for role, value in (("pad_token", "<pad>"), ("bos_token", "<s>"), ("eos_token", END_OF_TURN)):
        if getattr(tok, role, None) is None and value in tok.get_vocab():
            setattr(tok, role, value)
    if tok.pad_token_id is None:
        raise ModelLoadError("build_tiny: tokenizer has no pad token")
    if arch == "paligemma" and "\n" not in tok.get_vocab():
        _drop_newlines(tok)
    return tok


def _drop_newlines(tok: Any) -> None:
    """Normalise ``"\n"`` away. PaliGemma's processor appends ``"\n"`` to every text; the world vocabulary has
    no newline, so it would become ``<unk>`` after the generation prompt but at the end of a training text."""
    from tokenizers import normalizers

    backend = tok.backend_tokenizer
    drop = normalizers.Replace("\n", "")
    backend.normalizer = (
        drop if backend.normalizer is None else normalizers.Sequence([backend.normalizer, drop])
    )


def _build_processor(arch: str, spec: TinySpec, tok: Any, template: str) -> Any:
    import transformers as tf

    side = spec.image_size
    image_processor: Any
    if arch == "llama":
        tok.chat_template = template
        return tok
    if arch == "llava":
        image_processor = tf.LlavaImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        return tf.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=spec.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=template,
        )
    if arch == "qwen2_vl":
        image_processor = tf.Qwen2VLImageProcessorPil(
            min_pixels=side * side,
            max_pixels=side * side,
            patch_size=spec.patch_size,
            temporal_patch_size=2,
            merge_size=2,
        )
        return qwen2_vl_processor_class()(
            image_processor=image_processor, tokenizer=tok, chat_template=template
        )
    if arch == "idefics3":
        image_processor = tf.Idefics3ImageProcessorPil(
            size={"longest_edge": side},
            max_image_size={"longest_edge": side},
            do_image_splitting=False,
        )
        return tf.Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tok,
            image_seq_len=spec.num_patches // 4,  # scale_factor 2 → 4 patches per token
            chat_template=template,
        )
    # paligemma
    image_processor = tf.SiglipImageProcessorPil(size={"height": side, "width": side})
    image_processor.image_seq_length = spec.num_patches
    return tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template)


def _text_kwargs(spec: TinySpec, tok: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "hidden_size": spec.text_hidden,
        "intermediate_size": 2 * spec.text_hidden,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads,
        "max_position_embeddings": 2048,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.convert_tokens_to_ids(END_OF_TURN),
        "tie_word_embeddings": False,
    }


def _vision_kwargs(spec: TinySpec) -> dict[str, Any]:
    return {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 2 * spec.vision_hidden,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.heads,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
    }


def _build_config(arch: str, spec: TinySpec, tok: Any) -> Any:
    import transformers as tf

    text = _text_kwargs(spec, tok)
    vision = _vision_kwargs(spec)
    if arch == "llama":
        return tf.LlamaConfig(**text)
    if arch == "llava":
        return tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(**vision, projection_dim=spec.vision_hidden),
            text_config=tf.LlamaConfig(**text),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_seq_length=spec.num_patches,
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if arch == "qwen2_vl":
        half = spec.text_hidden // spec.heads // 2  # rotary frequencies per head
        hw = (3 * half) // 8
        mrope = [half - 2 * hw, hw, hw]  # temporal, height, width sections; sums to half
        return tf.Qwen2VLConfig(
            vision_config=tf.Qwen2VLVisionConfig(
                depth=spec.vision_layers,
                embed_dim=spec.vision_hidden,
                hidden_size=spec.text_hidden,  # output width of the patch merger
                mlp_ratio=2,
                num_heads=spec.heads,
                patch_size=spec.patch_size,
                spatial_merge_size=2,
                temporal_patch_size=2,
            ),
            text_config=tf.Qwen2VLTextConfig(
                **text,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            ),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )
    if arch == "idefics3":
        return tf.Idefics3Config(
            vision_config=tf.Idefics3VisionConfig(**vision),
            text_config=tf.LlamaConfig(**text),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            scale_factor=2,
            tie_word_embeddings=False,
        )
    # paligemma
    gemma = dict(text, head_dim=spec.text_hidden // spec.heads)
    return tf.PaliGemmaConfig(
        vision_config=tf.SiglipVisionConfig(**vision),
        text_config=tf.GemmaConfig(**gemma),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vocab_size=len(tok),
        projection_dim=spec.text_hidden,
        hidden_size=spec.text_hidden,
        tie_word_embeddings=False,
    )


def _init_model(arch: str, config: Any, seed: int) -> Any:
    import transformers as tf

    cls = {
        "llama": tf.LlamaForCausalLM,
        "llava": tf.LlavaForConditionalGeneration,
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "paligemma": tf.PaliGemmaForConditionalGeneration,
    }[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.float().eval()
