"""Last-layer skip (``mmalign.models.partial``): the prefix-shared pair forwards that compute the text
decoder's last layer only where its output is read give the same log-probs, rewards and parameter gradients
as the regular forwards (float64, every tiny architecture, prompts of three lengths in one batch), and the
skip is really taken (the last layer's MLP sees one row per sequence, or none)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from _models_kit import pairs, to_double
from _models_kit import tiny_model as build

from mmalign.data.pairs import PairBatch, PairCollator
from mmalign.errors import DataError
from mmalign.models import partial as partial_mod
from mmalign.models.heads import RewardModel
from mmalign.models.logprobs import pair_token_logps
from mmalign.models.partial import last_layer_queries, last_layer_skip_reason, supports_last_layer_skip

ONE_THREAD = True  # see tests/conftest.py

ARCHES = ["llava", "qwen2_vl", "idefics3", "paligemma", "llama"]


def double_setup(arch: str) -> tuple[Any, PairBatch]:
    torch.manual_seed(0)
    model, proc = build(arch)
    model.double().train()
    batch = to_double(PairCollator(proc)(pairs(vision=arch != "llama")))  # type: ignore[arg-type]
    assert len(set(batch.prompt_lengths.tolist())) == 3  # right-padded prompts of different lengths
    return model, batch


def last_layer(model: Any) -> Any:
    decoder = model.get_decoder()
    return decoder.layers[decoder.config.num_hidden_layers - 1]


def assert_grads_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and len(want) > 10
    for name, g in want.items():
        scale = float(g.abs().max()) + 1.0
        torch.testing.assert_close(got[name], g, atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_tiny_architecture_supports_the_skip(arch: str) -> None:
    model, _ = build(arch)
    assert last_layer_skip_reason(model) is None
    assert supports_last_layer_skip(model)


@pytest.mark.parametrize("arch", ARCHES)
def test_logps_and_gradients_with_last_layer_skip_equal_the_full_forward(arch: str) -> None:
    model, batch = double_setup(arch)
    runs = [
        {"share_prefix": False},
        {"skip_last_layer": False},
        {"skip_last_layer": True},
        {"skip_last_layer": True, "mode": "batched"},
        {"skip_last_layer": True, "mode": "sequential"},
    ]
    logps, grads = [], []
    for kwargs in runs:
        model.zero_grad()
        chosen, rejected = pair_token_logps(model, batch, **kwargs)  # type: ignore[arg-type]
        (chosen.sum(-1) - 0.5 * rejected.sum(-1)).pow(2).mean().backward()
        logps.append((chosen.detach(), rejected.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for got_lp, got_grads in zip(logps[2:], grads[2:], strict=True):
        for got, want, plain in zip(got_lp, logps[1], logps[0], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(got, plain, atol=1e-5, rtol=0)
        assert_grads_equal(got_grads, grads[1])
        assert_grads_equal(got_grads, grads[0])


@pytest.mark.parametrize("arch", ARCHES)
def test_rewards_and_gradients_with_last_layer_skip_equal_the_full_forward(arch: str) -> None:
    backbone, batch = double_setup(arch)
    rm = RewardModel(backbone, dim=2).double().train()
    rewards, grads = [], []
    for kwargs in (
        {"share_prefix": False},
        {"skip_last_layer": False},
        {"skip_last_layer": True},
        {"skip_last_layer": True, "packed": False},
    ):
        rm.zero_grad()
        chosen, rejected = rm.pair_rewards(batch, **kwargs)  # type: ignore[arg-type]
        torch.nn.functional.logsigmoid(chosen - rejected).sum().neg().backward()
        rewards.append((chosen.detach(), rejected.detach()))
        grads.append({n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None})
    for want_r, want_g in zip(rewards[:2], grads[:2], strict=True):
        for got_r, got_g in zip(rewards[2:], grads[2:], strict=True):
            for got, want in zip(got_r, want_r, strict=True):
                assert got.shape == (3, 2)
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert "head.weight" in want_g
            assert_grads_equal(got_g, want_g)


class LastLayerRows:
    """Records the input shapes of the last decoder layer's MLP and K projection."""

    def __init__(self, model: Any) -> None:
        layer = last_layer(model)
        self.mlp: list[tuple[int, ...]] = []
        self.keys: list[tuple[int, ...]] = []
        self.handles = [
            layer.mlp.register_forward_pre_hook(lambda mod, args: self.mlp.append(tuple(args[0].shape[:-1]))),
            layer.self_attn.k_proj.register_forward_pre_hook(
                lambda mod, args: self.keys.append(tuple(args[0].shape[:-1]))
            ),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "paligemma"])
def test_the_last_layer_runs_its_mlp_only_on_the_read_positions(arch: str) -> None:
    model, proc = build(arch)
    batch = PairCollator(proc)(pairs(vision=True))
    assert batch is not None
    b, p = batch.prompt_input_ids.shape
    tc, tr = batch.chosen_ids.shape[1], batch.rejected_ids.shape[1]
    # Packed: every response token up to its last labelled one, nothing else.
    n_tokens = sum(int(m.nonzero().max()) + 1 for m in (*batch.chosen_mask, *batch.rejected_mask))
    rm = RewardModel(model).eval()
    rows = LastLayerRows(model)
    try:
        with torch.no_grad():
            pair_token_logps(model, batch, mode="sequential")  # prompt: one row each; responses: all
            assert rows.mlp == [(b, 1), (b, tc), (b, tr)]
            assert rows.keys == [(b, p), (b, tc), (b, tr)]  # K/V of every position still reach the cache
            rows.mlp.clear(), rows.keys.clear()
            pair_token_logps(model, batch, skip_last_layer=False, mode="sequential")
            assert rows.mlp == [(b, p), (b, tc), (b, tr)]
            rows.mlp.clear(), rows.keys.clear()
            pair_token_logps(model, batch)  # packed: the responses' real tokens in one row, no padding
            assert rows.mlp == [(b, 1), (1, n_tokens)] and rows.keys == [(b, p), (1, n_tokens)]
            rows.mlp.clear(), rows.keys.clear()
            rm.pair_rewards(batch, packed=False)  # prompt: only K/V; responses: their last valid token
            assert rows.mlp == [(b, 1), (b, 1)]
            assert rows.keys == [(b, p), (b, tc), (b, tr)]
            rows.mlp.clear(), rows.keys.clear()
            rm.pair_rewards(batch)  # packed: 2B read positions of one packed row
            assert rows.mlp == [(1, 2 * b)] and rows.keys == [(b, p), (1, n_tokens)]
            rows.mlp.clear()
            rm.pair_rewards(batch, skip_last_layer=False, packed=False)
            assert rows.mlp == [(b, p), (b, tc), (b, tr)]
    finally:
        rows.remove()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False])
def test_last_layer_queries_returns_the_full_forward_at_any_columns(attn: str, padded: bool) -> None:
    """Several unsorted columns per row, no cache; a batch without padding makes sdpa's mask ``None``."""
    model, _ = build("llama")
    model.set_attn_implementation(attn)
    model.double()
    torch.manual_seed(1)
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, 6:] = 0
        mask[2, 4:] = 0
    cols = torch.tensor([[8, 0, 3], [5, 2, 2], [3, 1, 0]])
    base = model.get_decoder()
    with torch.no_grad():
        full = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (3, 9, H)
        with last_layer_queries(model, cols):
            part = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (3, 3, H)
        empty_cols = cols[:, :0]
        with last_layer_queries(model, empty_cols):
            none = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    want = full.gather(1, cols[:, :, None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(part, want, atol=1e-10, rtol=0)
    assert none.shape == (3, 0, full.shape[-1])
    assert "forward" not in vars(last_layer(model))  # the patch is gone after the context


def test_a_patched_last_layer_keeps_the_full_forward_and_logs_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, proc = build("llava")
    batch = PairCollator(proc)(pairs(vision=True))
    assert batch is not None
    with torch.no_grad():
        want = pair_token_logps(model, batch)
    layer = last_layer(model)
    monkeypatch.setattr(layer, "forward", layer.forward)  # an instance forward, as accelerate hooks install
    monkeypatch.setattr(partial_mod, "_warned", set())
    assert not supports_last_layer_skip(model)
    assert "already patched" in str(last_layer_skip_reason(model))
    with (
        pytest.raises(DataError, match="last-layer skip unavailable"),
        last_layer_queries(model, torch.zeros(3, 1, dtype=torch.long)),
    ):
        pass
    rows = LastLayerRows(model)
    with caplog.at_level(logging.INFO, logger="mmalign.models.partial"), torch.no_grad():
        got = pair_token_logps(model, batch)
        pair_token_logps(model, batch)
    rows.remove()
    assert rows.mlp[0] == tuple(batch.prompt_input_ids.shape)  # the whole prompt went through the MLP
    assert len([r for r in caplog.records if "last-layer skip unavailable" in r.getMessage()]) == 1
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_lora_wrapped_backbone_takes_the_skip_with_equal_logps_and_adapter_gradients() -> None:
    from mmalign.models.load import LoraSpec, apply_lora

    model, batch = double_setup("llava")
    peft_model = apply_lora(model, LoraSpec(r=4))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():  # non-zero B matrices: the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    assert supports_last_layer_skip(peft_model)
    rows = LastLayerRows(model)
    results = []
    for skip in (False, True):
        peft_model.zero_grad()
        rows.mlp.clear()
        chosen, rejected = pair_token_logps(peft_model, batch, skip_last_layer=skip)
        (chosen.sum(-1) - 0.5 * rejected.sum(-1)).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
        results.append((chosen.detach(), rejected.detach(), grads, rows.mlp[0]))
    rows.remove()
    assert results[0][3] == tuple(batch.prompt_input_ids.shape) and results[1][3] == (3, 1)
    for got, want in zip(results[1][:2], results[0][:2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert all("lora_" in n for n in results[0][2]) and any("lora_A" in n for n in results[0][2])
    assert_grads_equal(results[1][2], results[0][2])
