"""Lean RMSNorm / rotary kernels (``mmalign.models.kernels``): bit-identical forward values and equal
gradients against the Hugging Face originals, the swap scoped to the context (nested, env switch), and
the pair forwards of every tiny architecture unchanged by it (float64 log-probs, rewards and gradients)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama
import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2
from _models_kit import pairs, to_double
from _models_kit import tiny_model as build

from mmalign.data.pairs import PairCollator
from mmalign.models import kernels
from mmalign.models.heads import RewardModel
from mmalign.models.kernels import ENV_SWITCH, lean_kernels
from mmalign.models.logprobs import pair_token_logps

ONE_THREAD = True  # see tests/conftest.py

ARCHES = ["llava", "qwen2_vl", "idefics3", "paligemma", "llama"]
ORIGINAL_ROTARY = modeling_llama.apply_rotary_pos_emb
ORIGINAL_NORM_FORWARD = modeling_llama.LlamaRMSNorm.forward


def grads(fn: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn(*inputs)``'s value and the gradients of a fixed random projection of it."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = torch.cat([o.reshape(-1) for o in out]) if isinstance(out, tuple) else out.reshape(-1)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * proj).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]  # type: ignore[misc]


@pytest.mark.parametrize("cls", [modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_forward_is_bit_identical_and_gradients_match(cls: Any, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = cls(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, dtype=dtype) + 0.5)
    x = torch.randn(3, 5, 16, dtype=dtype) * 3.0

    def run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        norm.weight = torch.nn.Parameter(w) if not isinstance(w, torch.nn.Parameter) else w
        return norm(x)  # type: ignore[no-any-return]

    want, (want_gx, want_gw) = grads(run, x, norm.weight.detach())
    with lean_kernels():
        assert type(norm).forward is not ORIGINAL_NORM_FORWARD or cls is not modeling_llama.LlamaRMSNorm
        got, (got_gx, got_gw) = grads(run, x, norm.weight.detach())
    assert torch.equal(got, want)
    # HF computes the statistics in float32 even for float64 inputs: both agree to float32 round-off
    torch.testing.assert_close(got_gx, want_gx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_gw, want_gw, atol=1e-6, rtol=1e-5)


def test_rmsnorm_on_bfloat16_input_keeps_float32_statistics_like_the_original() -> None:
    norm = modeling_llama.LlamaRMSNorm(8)
    x = (torch.randn(4, 8) * 5).to(torch.bfloat16)
    want = norm(x)
    with lean_kernels():
        got = norm(x)
    assert got.dtype == want.dtype == torch.float32  # fp32 weight times the bf16 normalised input
    assert torch.equal(got, want)


@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_rotary_forward_and_gradients_are_bit_identical(unsqueeze_dim: int) -> None:
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 5, 8
    shape = (b, h, t, d) if unsqueeze_dim == 1 else (b, t, h, d)
    q, k = torch.randn(shape), torch.randn(shape)
    angles = torch.randn(b, t, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # (B, T, D)

    def run(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)  # type: ignore[no-any-return]

    want, want_g = grads(run, q, k)
    with lean_kernels():
        assert modeling_llama.apply_rotary_pos_emb is not ORIGINAL_ROTARY
        got, got_g = grads(run, q, k)
    assert torch.equal(got, want)
    for g, w in zip(got_g, want_g, strict=True):
        assert torch.equal(g, w)


def test_swap_is_scoped_nested_and_switchable_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with lean_kernels():
        with lean_kernels():
            assert modeling_llama.apply_rotary_pos_emb is kernels._lean_apply_rotary_pos_emb
        # the inner exit must not restore while the outer context is open
        assert modeling_llama.apply_rotary_pos_emb is kernels._lean_apply_rotary_pos_emb
        assert modeling_llama.LlamaRMSNorm.forward is kernels._lean_rmsnorm_forward
    assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROTARY
    assert modeling_llama.LlamaRMSNorm.forward is ORIGINAL_NORM_FORWARD
    with lean_kernels(active=False):
        assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROTARY
    monkeypatch.setenv(ENV_SWITCH, "0")
    with lean_kernels():
        assert modeling_llama.LlamaRMSNorm.forward is ORIGINAL_NORM_FORWARD
    with pytest.raises(RuntimeError, match="boom"), lean_kernels():  # restored on errors too
        raise RuntimeError("boom")
    assert modeling_llama.LlamaRMSNorm.forward is ORIGINAL_NORM_FORWARD


def test_a_norm_or_rotary_with_other_maths_is_not_swapped() -> None:
    class OnePlusNorm(modeling_llama.LlamaRMSNorm):  # Gemma-style w + 1 scaling
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) + hidden_states * 0 + 1.0

    assert not kernels._is_plain_rmsnorm(OnePlusNorm)
    assert kernels._is_plain_rmsnorm(modeling_llama.LlamaRMSNorm)

    def interleaved_rotary(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:  # GPT-J style
        def rot(x: torch.Tensor) -> torch.Tensor:
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    assert not kernels._is_plain_rotary(interleaved_rotary)
    assert kernels._is_plain_rotary(ORIGINAL_ROTARY)


def param_grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


LEAN_PARTS = {  # which lean kernels each tiny architecture's text decoder uses
    "llava": {"norm", "rotary"},
    "idefics3": {"norm", "rotary"},
    "llama": {"norm", "rotary"},
    "qwen2_vl": {"norm"},  # multimodal rotary: left alone
    "paligemma": set(),  # Gemma: 1 + w norm, own rotary
}


@pytest.mark.parametrize("arch", ARCHES)
def test_pair_forwards_are_unchanged_by_the_lean_kernels(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DPO log-probs and RM rewards with ``lean=True`` equal ``lean=False`` (float64 model; RMSNorm statistics
    are float32 in both, so agreement is at float32 round-off), gradients too."""
    torch.manual_seed(0)
    model, proc = build(arch)
    model.double().train()
    batch = to_double(PairCollator(proc)(pairs(vision=arch != "llama")))  # type: ignore[arg-type]
    calls = {"norm": 0, "rotary": 0}

    def counting(part: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[part] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(kernels, "_lean_rmsnorm_forward", counting("norm", kernels._lean_rmsnorm_forward))
    monkeypatch.setattr(
        kernels, "_lean_apply_rotary_pos_emb", counting("rotary", kernels._lean_apply_rotary_pos_emb)
    )
    results = {}
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        chosen, rejected = pair_token_logps(model, batch, lean=lean)  # (B, Tc), (B, Tr)
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        results[lean] = (chosen.detach(), rejected.detach(), param_grads(model))
        if not lean:
            assert calls == {"norm": 0, "rotary": 0}
    assert {part for part, n in calls.items() if n} == LEAN_PARTS[arch]
    for want, got in zip(results[False][:2], results[True][:2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want_g, got_g = results[False][2], results[True][2]
    assert want_g.keys() == got_g.keys() and len(want_g) > 10
    for name, g in want_g.items():
        scale = float(g.abs().max()) + 1.0
        torch.testing.assert_close(got_g[name], g, atol=1e-5 * scale, rtol=1e-5, msg=name)

    rm = RewardModel(model).double()
    rewards = {}
    for lean in (False, True):
        rm.zero_grad(set_to_none=True)
        c, r = rm.pair_rewards(batch, lean=lean)  # (B, 1), (B, 1)
        (c - r).sum().backward()
        rewards[lean] = (c.detach(), r.detach(), rm.head.weight.grad.clone())  # type: ignore[union-attr]
    for want, got in zip(rewards[False], rewards[True], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
