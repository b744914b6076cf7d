"""Last-layer skip: the text decoder's last layer computes its output only where it is read.

In the prefix-shared pair forwards (:mod:`mmalign.models.logprobs`, :mod:`mmalign.models.heads`) many
positions of a forward are never read at the model's output: the prompt forward only feeds the KV cache
(plus, for log-probs, the hidden state at each prompt's last real token, which predicts the first response
token), and a reward model reads each response only at its last valid token. Every layer but the last must
still run on all positions (their outputs are the next layer's K/V inputs), but the **last** layer's
contribution to the cache is only its K/V, which come from the layer's *input*. So within
:func:`last_layer_queries` the last decoder layer

1. normalises all positions (``input_layernorm``), projects K and V (``k_proj``, ``v_proj``), rotates K
   with the ``(cos, sin)`` the model passed to the layer and the modeling module's own
   ``apply_rotary_pos_emb``, and appends them to the cache (``Cache.update``) exactly as the HF layer does;
2. runs the query projection, attention, ``o_proj``, ``post_attention_layernorm`` and MLP **only for the
   selected columns** ``cols`` (N, k), attending to the full K/V with the selected rows of the mask the model
   built for the layer (causal + padding, PaliGemma's bidirectional prefix, …), through the same attention
   function (``sdpa`` / ``eager``) the HF layer would use;
3. returns (N, k, H): the model's final norm (and LM head, if any) then only sees those positions, so the
   forward's ``last_hidden_state`` is (N, k, H) — row ``i``, slot ``j`` is position ``cols[i, j]``.

Everything upstream of the last layer (embeddings, image merging, Gemma's embedding scale, M-RoPE position
ids, mask construction) stays the model's own code, so the result is the regular forward's output at those
positions up to float round-off, with gradients (tested in float64 for every tiny architecture).

The layer is patched by setting an instance ``forward`` for the duration of the context (restored on exit).
Supported: the decoder layers of Llama (LLaVA's and Idefics3's text model, text Llama), Qwen2-VL and Gemma
(PaliGemma), with ``sdpa`` or ``eager`` attention or inside a packed continuation
(:mod:`mmalign.models.packed`, whose attention then answers only the selected queries) — see
:func:`last_layer_skip_reason` for the full check.
Other models keep the regular forward (:func:`supports_last_layer_skip` logs that once per architecture).
Saving: for the unread positions, the last layer's ``q_proj``, attention, ``o_proj`` and MLP (for the tiny
models, 8/10 of the layer's matmul work per position).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mmalign.errors import DataError
from mmalign.models.packed import PACKED_ATTENTION

__all__ = [
    "SUPPORTED_ATTENTION",
    "last_layer_queries",
    "last_layer_skip_reason",
    "supports_last_layer_skip",
    "text_decoder",
]

logger = logging.getLogger(__name__)

SUPPORTED_ATTENTION = frozenset({"sdpa", "eager", PACKED_ATTENTION})
"""Attention implementations the partial last layer (and the packed continuation) can run with."""
_warned: set[str] = set()


def _layer_classes() -> tuple[type, ...]:
    """Decoder-layer classes whose forward the partial layer reproduces (pre-norm attention + MLP)."""
    from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer

    return (LlamaDecoderLayer, Qwen2VLDecoderLayer, GemmaDecoderLayer)


def _arch(model: Any) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))


def text_decoder(model: Any) -> Any:
    """The text transformer (``LlamaModel``, ``Qwen2VLTextModel``, ``GemmaModel``…) of ``model``."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    get = getattr(hf, "get_decoder", None)
    return get() if callable(get) else None


def _last_layer(decoder: Any) -> Any:
    return decoder.layers[int(decoder.config.num_hidden_layers) - 1]


def last_layer_skip_reason(model: Any) -> str | None:
    """Why :func:`last_layer_queries` cannot be used on ``model`` (``None`` when it can)."""
    decoder = text_decoder(model)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "config"):
        return "no text decoder with a `layers` list"
    config = decoder.config
    if not len(decoder.layers) or int(getattr(config, "num_hidden_layers", 0)) < 1:
        return "no decoder layers"
    layer = _last_layer(decoder)
    if type(layer) not in _layer_classes():
        return f"decoder layer {type(layer).__name__} is not a supported family"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl!r} (supported: sdpa, eager)"
    attn = layer.self_attn
    if getattr(attn, "sliding_window", None) is not None:
        return "sliding-window attention"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[int(config.num_hidden_layers) - 1] != "full_attention":
        return f"last layer type {layer_types[-1]!r}"
    if "forward" in vars(layer):
        return "the last layer's forward is already patched (e.g. by an accelerate hook)"
    if getattr(layer, "gradient_checkpointing", False):
        return "gradient checkpointing"
    if getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False):
        return "the config asks for per-layer hidden states / attentions"
    if not callable(getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)):
        return "no apply_rotary_pos_emb in the layer's modeling module"
    return None


def supports_last_layer_skip(model: Any, *, log: bool = False) -> bool:
    """True when :func:`last_layer_queries` applies to ``model`` exactly (see the module docstring).

    With ``log`` a negative answer is logged once per architecture (the caller then runs the regular
    forward)."""
    reason = last_layer_skip_reason(model)
    if reason is None:
        return True
    arch = _arch(model)
    if log and arch not in _warned:
        _warned.add(arch)
        logger.info("%s: last-layer skip unavailable (%s); computing every position", arch, reason)
    return False


def _take(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Rows' columns of ``x`` (N or 1, T, ...) at ``cols`` (N, k) → (N, k, ...)."""
    n, k = cols.shape
    x = x.expand(n, *x.shape[1:])
    index = cols.reshape(n, k, *([1] * (x.dim() - 2))).expand(n, k, *x.shape[2:])
    return x.gather(1, index)


def _query_mask(
    mask: torch.Tensor | None,
    cols: torch.Tensor,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    dtype: torch.dtype,
    impl: str,
) -> torch.Tensor | None:
    """The layer mask's rows for the selected queries: (N, 1 or heads, k, S).

    A ``None`` mask (``sdpa``: nothing to mask but causality) means what the attention function makes of it
    in the full forward: for a causal module (``is_causal``) the causal mask aligned bottom-right (the
    chunk's queries are the last ``q_len`` of the ``kv_len`` keys) — made explicit here, as a subset of
    queries cannot rely on sdpa's ``is_causal`` flag — and for a non-causal one (PaliGemma's Gemma sets
    ``use_bidirectional_attention``) no mask at all."""
    n, k = cols.shape
    if mask is None and not causal:
        return None
    if mask is None:
        keys = torch.arange(kv_len, device=cols.device)
        allowed = keys[None, None, :] <= (cols + (kv_len - q_len))[:, :, None]  # (N, k, S)
        allowed = allowed[:, None]  # (N, 1, k, S)
        if impl == "eager":  # additive float mask, like the one the model builds for eager attention
            return torch.zeros(allowed.shape, dtype=dtype, device=cols.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return allowed
    if mask.dim() != 4 or mask.shape[2] != q_len or mask.shape[3] != kv_len:
        raise DataError(
            f"last-layer skip: unexpected attention mask shape {tuple(mask.shape)} for {q_len} queries and "
            f"{kv_len} keys"
        )
    mask = mask.expand(n, *mask.shape[1:])
    index = cols[:, None, :, None].expand(n, mask.shape[1], k, kv_len)
    return mask.gather(2, index)


def _partial_forward(layer: Any, cols: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A ``forward`` for ``layer`` computing its output only at ``cols`` (N, k) (module docstring)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = layer.self_attn
    modeling = sys.modules[type(attn).__module__]
    rope = modeling.apply_rotary_pos_emb

    def forward(
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if position_embeddings is None:
            raise DataError("last-layer skip: the model passed no rotary position embeddings to the layer")
        n, t, _ = hidden_states.shape
        if cols.shape[0] != n or (cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= t)):
            raise DataError(
                f"last-layer skip: columns {tuple(cols.shape)} do not fit a ({n}, {t}) forward", field="cols"
            )
        k = cols.shape[1]
        # K/V of every position (from the layer's input), into the cache as the HF layer stores them.
        normed = layer.input_layernorm(hidden_states)  # (N, T, H)
        cos, sin = position_embeddings  # (N or 1, T, D)
        key = attn.k_proj(normed).view(n, t, -1, attn.head_dim).transpose(1, 2)  # (N, Hkv, T, D)
        value = attn.v_proj(normed).view(n, t, -1, attn.head_dim).transpose(1, 2)
        _, key = rope(key, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attn.layer_idx)  # (N, Hkv, S, D)
        if k == 0:  # only the cache was wanted
            return hidden_states[:, :0]
        # Queries, attention, o_proj and MLP at the selected columns only.
        residual = _take(hidden_states, cols)  # (N, k, H)
        query = (
            attn.q_proj(_take(normed, cols)).view(n, k, -1, attn.head_dim).transpose(1, 2)
        )  # (N, Hq, k, D)
        query, _ = rope(query, query, _take(cos, cols), _take(sin, cols))
        impl = attn.config._attn_implementation
        mask = _query_mask(
            attention_mask,
            cols,
            t,
            key.shape[2],
            causal=bool(getattr(attn, "is_causal", True)),
            dtype=query.dtype,
            impl=impl,
        )
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(impl, modeling.eager_attention_forward)
        out, _ = interface(
            attn,
            query,
            key,
            value,
            mask,
            dropout=0.0 if not attn.training else attn.attention_dropout,
            scaling=attn.scaling,
        )  # (N, k, Hq, D)
        hidden = residual + attn.o_proj(out.reshape(n, k, -1).contiguous())
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))  # (N, k, H)

    return forward


@contextmanager
def last_layer_queries(model: Any, cols: torch.Tensor) -> Iterator[None]:
    """Within the context, forwards of ``model`` compute the last decoder layer only at ``cols``.

    ``cols``: (N, k) long, per row of the forward the (sorted or not) columns of the current input whose
    output is wanted; k may be 0 (only the KV cache is filled). The forward's ``last_hidden_state`` (and
    logits) are then (N, k, ·). Raises :class:`DataError` when :func:`supports_last_layer_skip` is False.
    """
    reason = last_layer_skip_reason(model)
    if reason is not None:
        raise DataError(f"{_arch(model)}: last-layer skip unavailable ({reason})")
    if cols.dim() != 2:
        raise DataError(f"cols must be (N, k), got shape {tuple(cols.shape)}", field="cols")
    layer = _last_layer(text_decoder(model))
    layer.forward = _partial_forward(layer, cols.long())
    try:
        yield
    finally:
        del layer.forward
