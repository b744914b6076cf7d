"""Reward and value heads: the reward sits on the last non-pad token, the prefix-shared pair forward equals
the plain one (rewards and gradients) for every tiny architecture, and a saved reward model reloads
identically from safetensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _models_kit import pairs, to_double
from _models_kit import tiny_model as build

from mmalign.data.collate import SFTCollator
from mmalign.data.pairs import PairCollator
from mmalign.errors import ModelLoadError
from mmalign.models.heads import RewardModel, ValueModel, last_token_index, load_reward_model

ONE_THREAD = True  # see tests/conftest.py

ARCHES = ["llava", "qwen2_vl", "idefics3", "paligemma", "llama"]


def test_last_token_index_handles_right_and_left_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


@pytest.mark.parametrize("arch", ARCHES)
def test_shared_prefix_pair_rewards_equal_plain_and_single_sequence_forwards(arch: str) -> None:
    torch.manual_seed(0)
    backbone, proc = build(arch)
    rm = RewardModel(backbone, dim=2, aspects=("a", "b")).eval()
    data = pairs(vision=arch != "llama")
    batch = PairCollator(proc)(data)
    assert batch is not None
    with torch.no_grad():
        plain = rm.pair_rewards(batch, share_prefix=False)
        shared = rm.pair_rewards(batch)  # packed: both responses in one padding-free continuation
        padded = rm.pair_rewards(batch, packed=False)  # one padded continuation per side
        for b, pair in enumerate(data):
            if arch == "paligemma" and not pair.images:
                continue  # alone it is a causal prompt; inside a vision batch a prefix-LM one
            for k, side in enumerate(("chosen", "rejected")):
                one = SFTCollator(proc, pair_side=side)([pair])
                assert one is not None
                one.pop("labels")
                alone = rm(one.pop("input_ids"), one.pop("attention_mask"), **one)  # (1, 2)
                torch.testing.assert_close(plain[k][b], alone[0], atol=1e-5, rtol=0)
    for got, want in zip((*shared, *padded), (*plain, *plain), strict=True):
        assert got.shape == (3, 2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(plain[0], plain[1])  # different responses get different rewards


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "llama"])
def test_shared_prefix_reward_gradients_equal_the_plain_forward(arch: str) -> None:
    torch.manual_seed(0)
    backbone, proc = build(arch)
    rm = RewardModel(backbone.double()).train()
    batch = to_double(PairCollator(proc)(pairs(vision=arch != "llama")))  # type: ignore[arg-type]
    grads = []
    for kwargs in ({"share_prefix": False}, {"packed": True}, {"packed": False}):
        rm.zero_grad()
        chosen, rejected = rm.pair_rewards(batch, **kwargs)
        torch.nn.functional.logsigmoid(chosen - rejected).sum().neg().backward()
        grads.append({n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None})
    for shared in grads[1:]:
        assert grads[0].keys() == shared.keys() and "head.weight" in grads[0]
        for name, g in grads[0].items():
            scale = float(g.abs().max()) + 1.0
            torch.testing.assert_close(shared[name], g, atol=1e-6 * scale, rtol=1e-5, msg=name)


def test_saved_reward_model_reloads_with_identical_rewards(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone, proc = build("llava")
    rm = RewardModel(backbone, dim=3, aspects=("x", "y", "z"), kind="aspects").eval()
    batch = PairCollator(proc)(pairs(vision=True))
    assert batch is not None
    with torch.no_grad():
        before = rm.pair_rewards(batch)
    rm.save(tmp_path / "rm", proc)
    assert (tmp_path / "rm" / "reward_head.safetensors").exists()
    loaded, proc2 = load_reward_model(tmp_path / "rm")
    assert loaded.aspects == ("x", "y", "z") and loaded.kind == "aspects" and not loaded.training
    batch2 = PairCollator(proc2)(pairs(vision=True))
    assert batch2 is not None
    with torch.no_grad():
        after = loaded.pair_rewards(batch2)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_loading_a_plain_model_folder_as_reward_model_names_the_missing_files(tmp_path: Path) -> None:
    backbone, _proc = build("llama")
    backbone.save_pretrained(tmp_path / "lm")
    with pytest.raises(ModelLoadError, match=r"lm: not a reward model \(reward_head.json"):
        load_reward_model(tmp_path / "lm")


def test_value_model_gives_one_value_per_token_from_the_same_hidden_states() -> None:
    torch.manual_seed(0)
    backbone, _proc = build("llama")
    vm = ValueModel(backbone).eval()
    ids = torch.tensor([[5, 9, 12, 7], [5, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        values = vm(ids, mask)
        hidden = vm.hidden_states(ids, mask)
    assert values.shape == (2, 4)
    want = hidden @ vm.head.weight[0] + vm.head.bias[0]
    torch.testing.assert_close(values, want)
    # causal: a row's first two values do not depend on what follows
    torch.testing.assert_close(values[1, :2], values[0, :2], atol=1e-6, rtol=0)
