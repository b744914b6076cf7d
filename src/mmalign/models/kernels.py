"""Leaner RMSNorm and rotary embeddings for Llama/Qwen2-family text decoders, for CPU training.

A tiny or mid-sized model on a CPU spends a large share of a training step in memory-bound element-wise
work, and two of Hugging Face's eager building blocks do more of it than the maths needs:

- **RMSNorm** (``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``Qwen2VLRMSNorm``, ``MistralRMSNorm``, …): autograd
  records five element-wise ops and, in backward, walks ``pow → mean → add → rsqrt → mul → mul`` one
  full-size tensor at a time. :class:`_RMSNormFn` keeps the normalised input and the per-row ``1/rms`` and
  computes the input gradient in closed form, ``rstd · (g·w − x̂ · mean(g·w · x̂))``.
- **Rotary embeddings** (``modeling_llama.apply_rotary_pos_emb``): ``rotate_half`` allocates a negated half
  and a concatenation for q and for k in forward, and autograd undoes both in backward. :class:`_RotaryFn`
  writes ``x·cos`` once and subtracts/adds the half products in place; backward is the transpose rotation.

The forward values are **bit-identical** to Hugging Face's (same ops in the same order); the RMSNorm input
gradient is the same quantity by a different formula (round-off level differences), the rotary gradient is
bit-identical. Tested against the original modules in float64 (``tests/models/test_kernels.py``).

:func:`lean_kernels` is a context manager that swaps these in **while it is open** (class attribute and
module function, restored on exit; nesting is counted, so inner uses do not restore early). Backward passes
run after the context closed still use the custom backward: it is recorded in the autograd graph. Our pair
forwards (:func:`mmalign.models.logprobs.pair_token_logps`, the reward model's ``pair_rewards``) open it by
default; ``MMALIGN_LEAN_KERNELS=0`` in the environment turns it off everywhere (for debugging). Other
architectures (Gemma's ``1 + w`` norm, Qwen2-VL's multimodal rotary) are left untouched.

The swap is process-wide while open: another thread running the same HF classes at that moment would use
the lean versions too, which compute the same values.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

ENV_SWITCH = "MMALIGN_LEAN_KERNELS"

RMSNORM_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLRMSNorm"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
)
"""RMSNorm classes whose forward is ``w · (x / rms(x))`` computed in float32 (checked at swap time by
:func:`_is_plain_rmsnorm`, which compares outputs on a probe input)."""

ROTARY_MODULES = ("transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral")
"""Modeling modules whose ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` is the half-rotation
(checked at swap time by :func:`_is_plain_rotary`)."""


class _RMSNormFn(torch.autograd.Function):
    """``w · (x · rsqrt(mean(x²) + eps))`` over the last dim, statistics in float32."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        xhat = x32 * rstd  # (..., H) float32
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.in_dtype = dtype
        return weight * xhat.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        xhat, rstd, weight = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * xhat.to(ctx.in_dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gh = (grad * weight).to(torch.float32)  # dL/dx̂
            dot = (gh * xhat).mean(-1, keepdim=True)  # (..., 1)
            grad_x = gh.sub_(xhat * dot).mul_(rstd).to(ctx.in_dtype)
        return grad_x, grad_w, None


def _lean_rmsnorm_forward(self: Any, hidden_states: Tensor) -> Tensor:
    return _RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)  # type: ignore[no-any-return]


class _RotaryFn(torch.autograd.Function):
    """``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = cat(−x₂, x₁)``; cos/sin carry no gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].sub_(x[..., h:] * sin[..., :h])  # x₁cos₁ + (−x₂)sin₁
        out[..., h:].add_(x[..., :h] * sin[..., h:])  # x₂cos₂ + x₁sin₂
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        h = grad.shape[-1] // 2
        gs = grad * sin
        gx = grad * cos
        gx[..., :h].add_(gs[..., h:])  # x₁ feeds out₂ through +sin₂
        gx[..., h:].sub_(gs[..., :h])  # x₂ feeds out₁ through −sin₁
        return gx, None, None


def _lean_apply_rotary_pos_emb(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int = 1
) -> tuple[Tensor, Tensor]:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if q.shape[-1] % 2 or cos.requires_grad or sin.requires_grad:  # not the case this replaces: plain maths

        def rotate_half(x: Tensor) -> Tensor:
            h = x.shape[-1] // 2
            return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return _RotaryFn.apply(q, cos, sin), _RotaryFn.apply(k, cos, sin)


_lock = threading.Lock()
_depth = 0
_saved: list[tuple[Any, str, Any]] = []  # (owner, attribute, original value)


def enabled() -> bool:
    """False when ``MMALIGN_LEAN_KERNELS`` is set to 0/false/no/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _module(name: str) -> Any:
    """The modeling module if it is already imported (no model of it can exist otherwise; importing it here
    would only add start-up time), else None."""
    return sys.modules.get(name)


@functools.cache
def _is_plain_rmsnorm(cls: Any) -> bool:
    """Whether ``cls`` computes exactly what :class:`_RMSNormFn` computes (float64 probe, once per class)."""
    try:
        norm = cls(6, eps=1e-6).to(torch.float64)
    except TypeError:
        return False
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
        x = torch.linspace(-2.0, 3.0, 12, dtype=torch.float64).reshape(2, 6)
        want = norm(x)
        got = _RMSNormFn.apply(x, norm.weight, norm.variance_epsilon)
    return bool(torch.allclose(want, got, rtol=1e-12, atol=1e-12))


@functools.cache
def _is_plain_rotary(fn: Any) -> bool:
    """Whether ``fn(q, k, cos, sin)`` is the half-rotation :class:`_RotaryFn` computes (float64 probe, once
    per function)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64).unbind(0)  # (H, T, D) each
    q, k = q[None], k[None]  # (1, 2, 3, 4)
    angles = torch.randn(1, 3, 2, generator=gen, dtype=torch.float64)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (1, 3, 4)
    try:
        want = fn(q, k, cos, sin)
    except TypeError:
        return False
    got = _lean_apply_rotary_pos_emb(q, k, cos, sin)
    return all(torch.allclose(w, g, rtol=1e-12, atol=1e-12) for w, g in zip(want, got, strict=True))


def _install() -> None:
    for module_name, class_name in RMSNORM_CLASSES:
        cls = getattr(_module(module_name), class_name, None)
        if cls is None or "forward" not in vars(cls) or not _is_plain_rmsnorm(cls):
            continue
        _saved.append((cls, "forward", vars(cls)["forward"]))
        cls.forward = _lean_rmsnorm_forward
    for module_name in ROTARY_MODULES:
        mod = _module(module_name)
        original = getattr(mod, "apply_rotary_pos_emb", None)
        if original is None or original is _lean_apply_rotary_pos_emb or not _is_plain_rotary(original):
            continue
        _saved.append((mod, "apply_rotary_pos_emb", original))
        mod.apply_rotary_pos_emb = _lean_apply_rotary_pos_emb


def _uninstall() -> None:
    while _saved:
        owner, attr, value = _saved.pop()
        setattr(owner, attr, value)


@contextlib.contextmanager
def lean_kernels(active: bool = True) -> Iterator[None]:
    """Use the lean RMSNorm / rotary implementations for every forward run inside (see module docstring).
    ``active=False`` (or ``MMALIGN_LEAN_KERNELS=0``) makes it a no-op."""
    global _depth
    if not (active and enabled()):
        yield
        return
    with _lock:
        if _depth == 0:
            _install()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _uninstall()


__all__ = ["ENV_SWITCH", "enabled", "lean_kernels"]
