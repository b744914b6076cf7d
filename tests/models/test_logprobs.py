"""Token log-probs of preference pairs: the prefix-shared forward (prompt + images encoded once, KV cache
reused) equals the plain concatenated forward — log-probs and parameter gradients — for every tiny
architecture, with prompts of different lengths in one batch; unsupported models fall back to
the plain path."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from _models_kit import pairs, to_double
from _models_kit import tiny_model as build

from mmalign.data.collate import IGNORE_INDEX, SFTCollator
from mmalign.data.pairs import PairCollator
from mmalign.data.schema import PreferencePair
from mmalign.models import logprobs as lp_mod
from mmalign.models.logprobs import (
    pair_token_logps,
    prefix_sharing_supported,
    sequence_token_logps,
    token_logps_from_logits,
)

ONE_THREAD = True  # see tests/conftest.py

ARCHES = ["llava", "qwen2_vl", "idefics3", "paligemma", "llama"]
VISION_TOWER = {
    "llava": "vision_tower",
    "qwen2_vl": "visual",
    "idefics3": "vision_model",
    "paligemma": "vision_tower",
}


def single_pair_logps(model: Any, proc: Any, pair: PreferencePair, prompt_len: int) -> list[torch.Tensor]:
    """Independent reference: each side alone (SFT collator, batch of one, no padding) through
    ``sequence_token_logps``; returns the log-probs of the response tokens."""
    out = []
    for side in ("chosen", "rejected"):
        sft = SFTCollator(proc, pair_side=side)([pair])
        assert sft is not None
        labels = sft.pop("labels")  # (1, T)
        mask = labels != IGNORE_INDEX
        mask[:, :prompt_len] = False
        ids, attn = sft.pop("input_ids"), sft.pop("attention_mask")
        token_lp = sequence_token_logps(model, ids, attn, mask, **sft)[0]  # (T,)
        last = int(mask[0].nonzero().max())
        out.append(token_lp[prompt_len : last + 1])
    return out


@pytest.mark.parametrize("arch", ARCHES)
def test_shared_prefix_logps_equal_plain_and_unpadded_single_pair_forwards(arch: str) -> None:
    model, proc = build(arch)
    collator = PairCollator(proc)
    data = pairs(vision=arch != "llama")
    batch = collator(data)
    assert batch is not None and len(set(batch.prompt_lengths.tolist())) == 3
    assert prefix_sharing_supported(model)
    with torch.no_grad():
        plain = pair_token_logps(model, batch, share_prefix=False)
        packed = pair_token_logps(model, batch)  # default mode
        sequential = pair_token_logps(model, batch, mode="sequential")
        batched = pair_token_logps(model, batch, mode="batched")
        for b, pair in enumerate(data):
            if arch == "paligemma" and not pair.images:
                continue  # alone it has no token_type_ids (causal prompt); in a vision batch: prefix-LM
            chosen, rejected = single_pair_logps(model, proc, pair, int(batch.prompt_lengths[b]))
            torch.testing.assert_close(plain[0][b, : chosen.numel()], chosen, atol=1e-5, rtol=0)
            torch.testing.assert_close(plain[1][b, : rejected.numel()], rejected, atol=1e-5, rtol=0)
    for shared in (packed, batched, sequential):
        for got, want, mask in zip(shared, plain, (batch.chosen_mask, batch.rejected_mask), strict=True):
            assert got.shape == mask.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert bool((got[~mask] == 0).all()) and bool((got[mask] < 0).all())


@pytest.mark.parametrize("arch", ARCHES)
def test_shared_prefix_parameter_gradients_equal_the_plain_forward(arch: str) -> None:
    # float64 weights so that the comparison tests the algorithm, not float32 round-off (attention softmax
    # stays float32 inside transformers, hence 1e-5 rather than 1e-12).
    model, proc = build(arch)
    model.double().train()
    batch = to_double(PairCollator(proc)(pairs(vision=arch != "llama")))  # type: ignore[arg-type]
    grads = []
    for kwargs in ({"share_prefix": False}, {"mode": "packed"}, {"mode": "sequential"}, {"mode": "batched"}):
        model.zero_grad()
        chosen, rejected = pair_token_logps(model, batch, **kwargs)  # type: ignore[arg-type]
        (chosen.sum(-1) - 0.5 * rejected.sum(-1)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    plain = grads[0]
    for shared in grads[1:]:
        assert plain.keys() == shared.keys() and len(plain) > 10
        if arch != "llama":  # the vision tower gets gradients through the shared prompt cache
            assert any(VISION_TOWER[arch] in n and float(g.abs().sum()) > 0 for n, g in shared.items())
        for name, g in plain.items():
            scale = float(g.abs().max()) + 1.0
            torch.testing.assert_close(shared[name], g, atol=1e-5 * scale, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_images_are_encoded_once_with_prefix_sharing_and_twice_without(arch: str) -> None:
    model, proc = build(arch)
    batch = PairCollator(proc)(pairs(vision=True))
    assert batch is not None
    tower = getattr(model.model, VISION_TOWER[arch])
    seen: list[int] = []
    handle = tower.register_forward_hook(lambda mod, args, kw_out: seen.append(1))
    calls: list[int] = []
    top = model.get_decoder().register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        with torch.no_grad():
            pair_token_logps(model, batch, mode="sequential")
            assert (len(seen), len(calls)) == (1, 3)  # prompt with images once, then chosen, then rejected
            pair_token_logps(model, batch, mode="batched")
            assert (len(seen), len(calls)) == (2, 5)  # prompt once, both responses in one call
            pair_token_logps(model, batch)  # packed: prompt once, every response token in one row
            assert (len(seen), len(calls)) == (3, 7)
            pair_token_logps(model, batch, share_prefix=False)
    finally:
        handle.remove()
        top.remove()
    assert (len(seen), len(calls)) == (4, 8)
    # image rows: the plain path encodes every image twice (prompt+chosen and prompt+rejected rows)
    assert batch.concat["pixel_values"].shape[0] == 2 * batch.prompt_inputs["pixel_values"].shape[0]


def test_sequence_token_logps_are_log_softmax_of_the_previous_position() -> None:
    model, proc = build("llama")
    batch = PairCollator(proc)(pairs(vision=False)[:2])
    assert batch is not None
    c = batch.concat
    with torch.no_grad():
        got = sequence_token_logps(model, c["input_ids"], c["attention_mask"], c["response_mask"])
        logits = model(input_ids=c["input_ids"], attention_mask=c["attention_mask"]).logits
    assert got.shape == c["input_ids"].shape
    for row, col in ((0, 7), (0, 13), (3, 11)):
        assert bool(c["response_mask"][row, col])
        want = torch.log_softmax(logits[row, col - 1], -1)[c["input_ids"][row, col]]
        assert abs(float(got[row, col]) - float(want)) < 1e-5
    assert bool((got[~c["response_mask"]] == 0).all())
    assert bool((got[:, 0] == 0).all())


def test_token_logps_from_logits_matches_hand_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    got = token_logps_from_logits(logits, torch.tensor([1, 0]))
    want = torch.tensor([-torch.log(torch.tensor(2.0)), -torch.log1p(torch.exp(torch.tensor(-1.0)))])
    torch.testing.assert_close(got, want)
    assert token_logps_from_logits(logits.bfloat16(), torch.tensor([1, 0])).dtype == torch.float32


def test_unsupported_models_fall_back_to_the_plain_path_and_warn_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, proc = build("llama")
    batch = PairCollator(proc)(pairs(vision=False))
    assert batch is not None
    monkeypatch.setattr(model.config, "model_type", "mystery_lm")
    monkeypatch.setattr(lp_mod, "_warned", set())
    assert not prefix_sharing_supported(model)
    calls: list[int] = []
    hook = model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    with caplog.at_level(logging.WARNING), torch.no_grad():
        got = pair_token_logps(model, batch)
        pair_token_logps(model, batch)
    hook.remove()
    assert len(calls) == 2  # one plain forward per call, no prompt/continuation split
    assert len([r for r in caplog.records if "mystery_lm" in r.getMessage()]) == 1
    monkeypatch.setattr(model.config, "model_type", "llama")
    with torch.no_grad():
        want = pair_token_logps(model, batch)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


def test_gradient_checkpointing_disables_prefix_sharing() -> None:
    model, _ = build("llama")
    assert prefix_sharing_supported(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert not prefix_sharing_supported(model)


def test_sliding_window_attention_disables_prefix_sharing_unless_switched_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, _ = build("llama")
    monkeypatch.setattr(model.config, "sliding_window", 4, raising=False)
    assert not prefix_sharing_supported(model)
    monkeypatch.setattr(model.config, "use_sliding_window", False, raising=False)
    assert prefix_sharing_supported(model)
