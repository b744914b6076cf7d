"""Reward-model losses against values computed by hand (plain Python math written out in each test)."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.errors import ConfigError, DataError
from mmalign.losses.reward import (
    REWARD_LOSSES,
    RewardLossType,
    aspect_regression_loss,
    bradley_terry_loss,
    critique_reward_loss,
    pairs_from_ranking,
    pairwise_preference_loss,
    reward_loss_fn,
    symmetric_preference_prob,
)

NAN = float("nan")


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus_neg(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x}) in plain Python."""
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------- capabilities and registry


def test_reward_loss_type_capability_table_is_exact() -> None:
    table = {
        lt.value: (
            lt.needs_pairs,
            lt.needs_aspects,
            lt.needs_critique,
            lt.reads_both_responses,
            lt.head_dim_from_aspects,
        )
        for lt in RewardLossType
    }
    assert table == {
        "bt": (True, False, False, False, False),
        "pairwise": (True, False, False, True, False),
        "regression": (False, True, False, False, True),
        "critique": (True, False, True, False, False),
    }
    assert RewardLossType("bt") is RewardLossType.BT and str(RewardLossType.CRITIQUE) == "critique"


def test_registry_maps_every_type_to_its_function() -> None:
    assert set(REWARD_LOSSES) == set(RewardLossType)
    assert reward_loss_fn("bt") is bradley_terry_loss
    assert reward_loss_fn(RewardLossType.PAIRWISE) is pairwise_preference_loss
    assert reward_loss_fn("regression") is aspect_regression_loss
    assert reward_loss_fn("critique") is critique_reward_loss
    with pytest.raises(ConfigError, match=r"unknown 'dpo'.*bt, pairwise, regression, critique"):
        reward_loss_fn("dpo")


# ---------------------------------------------------------------- Bradley–Terry


def test_bt_loss_is_mean_of_log1p_exp_of_minus_gap_with_metrics() -> None:
    # gaps r_w − r_l: 1.0 − 0.5 = 0.5 and 0.0 − 0.3 = −0.3
    loss, m = bradley_terry_loss(t(1.0, 0.0), t(0.5, 0.3))
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(0.3))) / 2
    assert loss.item() == pytest.approx(expected)
    assert expected == pytest.approx((0.474077 + 0.854355) / 2, abs=1e-6)
    assert m["loss"] == pytest.approx(expected)
    assert m["accuracy"] == 0.5  # only the first pair has r_w > r_l
    assert m["reward_margin"] == pytest.approx((0.5 - 0.3) / 2)
    assert m["chosen_reward"] == pytest.approx(0.5) and m["rejected_reward"] == pytest.approx(0.4)


def test_bt_margin_is_subtracted_from_the_gap_and_centering_adds_squared_sum() -> None:
    r_w, r_l = t(1.0, 0.0), t(0.5, 0.3)
    loss, m = bradley_terry_loss(r_w, r_l, margin=t(0.2, 0.0))
    # −log σ(0.5 − 0.2) and −log σ(−0.3 − 0)
    assert loss.item() == pytest.approx((softplus_neg(0.3) + softplus_neg(-0.3)) / 2)
    assert m["reward_margin"] == pytest.approx(0.1)  # the reported margin is r_w − r_l, without m
    loss, _ = bradley_terry_loss(r_w, r_l, centering=0.01)
    # + 0.01 · mean((1.0 + 0.5)², (0.0 + 0.3)²) = 0.01 · (2.25 + 0.09) / 2 = 0.0117
    assert loss.item() == pytest.approx((softplus_neg(0.5) + softplus_neg(-0.3)) / 2 + 0.0117)


def test_bt_soft_margin_is_cross_entropy_against_sigmoid_of_scaled_margin() -> None:
    r_w, r_l = t(1.0, 0.0), t(0.5, 0.3)
    loss, m = bradley_terry_loss(r_w, r_l, margin=t(0.5, 0.0), soft_scale=2.0)
    # pair 1: Δ = 0.5, p = σ(1.0); pair 2: Δ = −0.3, p = σ(0) = ½
    p1 = 1 / (1 + math.exp(-1.0))
    lse = softplus_neg  # −log σ(d)
    want = (p1 * lse(0.5) + (1 - p1) * lse(-0.5) + 0.5 * lse(-0.3) + 0.5 * lse(0.3)) / 2
    assert loss.item() == pytest.approx(want)
    assert m["accuracy"] == 0.5 and m["reward_margin"] == pytest.approx(0.1)
    # the minimum over the gap sits at Δ = s·m (gradient 0 there), not at Δ → ∞ as with hard labels
    gap = torch.tensor([1.0], requires_grad=True)
    bradley_terry_loss(gap, t(0.0), margin=t(0.5), soft_scale=2.0)[0].backward()
    assert gap.grad is not None and gap.grad.item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ConfigError, match="soft_scale"):
        bradley_terry_loss(r_w, r_l, soft_scale=1.0)  # needs margins
    with pytest.raises(ConfigError, match="soft_scale"):
        bradley_terry_loss(r_w, r_l, margin=t(0.1, 0.1), soft_scale=-1.0)


def test_bt_is_stable_for_huge_gaps() -> None:
    loss, _ = bradley_terry_loss(t(0.0, 1000.0), t(1000.0, 0.0))
    # −log σ(−1000) = 1000 (exactly, in float64), −log σ(1000) = 0
    assert loss.item() == pytest.approx(500.0)
    r_w = t(0.0).requires_grad_()
    bradley_terry_loss(r_w, t(1000.0))[0].backward()
    assert r_w.grad is not None and r_w.grad.item() == pytest.approx(-1.0)  # −σ(−gap) = −1, not nan


def test_bt_gradient_pushes_chosen_up_and_rejected_down() -> None:
    r_w, r_l = t(0.2).requires_grad_(), t(0.7).requires_grad_()
    loss, _ = bradley_terry_loss(r_w, r_l)
    loss.backward()
    # d/dr_w −log σ(r_w − r_l) = −σ(−(r_w − r_l)) = −σ(0.5)
    assert r_w.grad is not None and r_l.grad is not None
    assert r_w.grad.item() == pytest.approx(-sigmoid(0.5)) and r_w.grad.item() < 0
    assert r_l.grad.item() == pytest.approx(sigmoid(0.5)) and r_l.grad.item() > 0


def test_bt_centering_gradient_pulls_the_sum_towards_zero() -> None:
    r_w, r_l = t(3.0).requires_grad_(), t(3.0).requires_grad_()
    bradley_terry_loss(r_w, r_l, centering=0.5)[0].backward()
    # gap 0: BT part −σ(0) = −0.5; centering 0.5 · 2 · (3 + 3) = 6 → 5.5 on r_w, 0.5 + 6 = 6.5 on r_l
    assert r_w.grad is not None and r_l.grad is not None
    assert r_w.grad.item() == pytest.approx(5.5) and r_l.grad.item() == pytest.approx(6.5)


def test_bt_rejects_bad_inputs() -> None:
    with pytest.raises(DataError, match="r_rejected: shape"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))
    with pytest.raises(DataError, match="margin: shape"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0, 0.0), margin=t(0.1))
    with pytest.raises(ConfigError, match="centering"):
        bradley_terry_loss(t(1.0), t(0.0), centering=-0.1)


# ---------------------------------------------------------------- pairwise preference model


def test_symmetric_preference_prob_averages_both_orders() -> None:
    p = symmetric_preference_prob(t(2.0, -1.0, 0.0), t(-1.0, 0.5, 0.0))
    # ½(σ(2) + 1 − σ(−1)) = ½(0.880797 + 0.731059); ½(σ(−1) + 1 − σ(0.5)) = ½(0.268941 + 0.377541); ½
    expected = [0.5 * (sigmoid(2.0) + 1 - sigmoid(-1.0)), 0.5 * (sigmoid(-1.0) + 1 - sigmoid(0.5)), 0.5]
    assert p.tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx(0.805928, abs=1e-6) and expected[1] == pytest.approx(
        0.323241, abs=1e-6
    )


def test_pairwise_loss_is_bce_on_both_orders_averaged() -> None:
    logit_ab, logit_ba, label = t(2.0, -1.0), t(-1.0, 0.5), t(1.0, 0.0)
    loss, m = pairwise_preference_loss(logit_ab, logit_ba, label)
    # order (A, B): row 0 label 1 → −log σ(2); row 1 label 0 → −log(1 − σ(−1)) = −log σ(1)
    # order (B, A): row 0 label 0 → −log(1 − σ(−1)) = −log σ(1); row 1 label 1 → −log σ(0.5)
    ab = (softplus_neg(2.0) + softplus_neg(1.0)) / 2
    ba = (softplus_neg(1.0) + softplus_neg(0.5)) / 2
    assert loss.item() == pytest.approx((ab + ba) / 2)
    assert loss.item() == pytest.approx((0.126928 + 2 * 0.313262 + 0.474077) / 4, abs=1e-6)
    assert m["accuracy"] == 1.0  # symmetric P(A≻B): 0.806 (label A), 0.323 (label B)
    assert m["position_consistency"] == 1.0  # both orders name the same winner in both rows
    assert m["prob_a"] == pytest.approx((0.805928 + 0.323241) / 2, abs=1e-6)


def test_pairwise_metrics_see_position_bias_and_wrong_answers() -> None:
    # The model always says "the first one wins" (logit 1 in both orders): inconsistent.
    _, m = pairwise_preference_loss(t(1.0, 1.0), t(1.0, 1.0), t(1.0, 0.0))
    assert m["position_consistency"] == 0.0
    assert m["prob_a"] == pytest.approx(0.5)  # ½(σ(1) + 1 − σ(1)): the bias cancels
    assert m["accuracy"] == 0.0  # exactly ½ is on neither side
    _, m = pairwise_preference_loss(t(3.0), t(-3.0), t(0.0))
    assert m["accuracy"] == 0.0 and m["position_consistency"] == 1.0


def test_pairwise_gradient_raises_the_logit_of_the_preferred_order() -> None:
    logit_ab, logit_ba = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    pairwise_preference_loss(logit_ab, logit_ba, t(1.0))[0].backward()
    # ½ d/dz BCE(z, y) = ½ (σ(z) − y): ½(0.5 − 1) on ab, ½(0.5 − 0) on ba
    assert logit_ab.grad is not None and logit_ba.grad is not None
    assert logit_ab.grad.item() == pytest.approx(-0.25) and logit_ba.grad.item() == pytest.approx(0.25)


def test_pairwise_labels_must_be_zero_or_one() -> None:
    with pytest.raises(DataError, match="label: labels must be 0"):
        pairwise_preference_loss(t(1.0), t(1.0), t(0.5))
    with pytest.raises(DataError, match="logit_ba: shape"):
        pairwise_preference_loss(t(1.0, 2.0), t(1.0), t(1.0, 0.0))


# ---------------------------------------------------------------- multi-aspect regression

PRED = t(1.0, 2.0, 3.0, 4.0, 5.0, 6.0).view(2, 3)
TARGET = t(1.5, NAN, 2.0, 4.0, 7.0, NAN).view(2, 3)  # missing aspects are nan
PRESENT = torch.tensor([[True, False, True], [True, True, False]])


def test_aspect_regression_is_mse_over_present_entries_and_per_aspect() -> None:
    loss, m = aspect_regression_loss(PRED, TARGET, PRESENT)
    # squared errors of present entries: (1 − 1.5)² = 0.25, (3 − 2)² = 1, (4 − 4)² = 0, (5 − 7)² = 4
    assert loss.item() == pytest.approx((0.25 + 1.0 + 0.0 + 4.0) / 4)  # 1.3125
    assert m["loss"] == pytest.approx(1.3125) and m["n_present"] == 4.0
    per_aspect, counts = m["per_aspect_mse"], m["per_aspect_count"]
    assert isinstance(per_aspect, torch.Tensor) and isinstance(counts, torch.Tensor)
    # aspect 0: (0.25 + 0) / 2; aspect 1: 4 / 1; aspect 2: 1 / 1
    assert per_aspect.tolist() == pytest.approx([0.125, 4.0, 1.0])
    assert counts.tolist() == [2, 1, 1]


def test_aspect_regression_ignores_values_under_the_mask_and_gives_them_no_gradient() -> None:
    pred = PRED.clone().requires_grad_()
    loss, _ = aspect_regression_loss(pred, TARGET, PRESENT)
    loss.backward()
    # d/dpred of Σ (pred − target)² / 4 = (pred − target) / 2 on present entries, 0 elsewhere
    assert pred.grad is not None
    assert pred.grad.flatten().tolist() == pytest.approx([-0.25, 0.0, 0.5, 0.0, -1.0, 0.0])
    other = aspect_regression_loss(
        torch.where(PRESENT, PRED, 99.0), torch.where(PRESENT, TARGET, -1e9), PRESENT
    )[0]
    assert other.item() == loss.item()


def test_aspect_regression_all_masked_is_zero_loss_with_zero_gradient_not_nan() -> None:
    pred = PRED.clone().requires_grad_()
    loss, m = aspect_regression_loss(pred, TARGET, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum().item() == 0.0
    assert m["n_present"] == 0.0
    per_aspect = m["per_aspect_mse"]
    assert isinstance(per_aspect, torch.Tensor) and bool(per_aspect.isnan().all())  # no data per aspect


def test_aspect_regression_rejects_mismatched_shapes() -> None:
    with pytest.raises(DataError, match="mask: shape"):
        aspect_regression_loss(PRED, TARGET, PRESENT[:, :2])


# ---------------------------------------------------------------- critique-based RM

CRITIQUE_LOGPS = t(-1.0, -2.0, NAN, -3.0, NAN, NAN).view(2, 3)
CRITIQUE_MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_critique_loss_adds_nll_bt_for_strict_pairs_and_squared_gap_for_ties() -> None:
    r_w, r_l, tie = t(1.0, 0.4), t(0.0, 0.1), torch.tensor([False, True])
    loss, m = critique_reward_loss(CRITIQUE_LOGPS, CRITIQUE_MASK, r_w, r_l, tie, nll_weight=0.5)
    nll = (1.0 + 2.0 + 3.0) / 3  # mean over the 3 critique tokens = 2
    bt = softplus_neg(1.0)  # pair 0: −log σ(1.0 − 0.0) = 0.313262
    tie_sq = (0.4 - 0.1) ** 2  # pair 1: 0.09
    assert loss.item() == pytest.approx(0.5 * nll + (bt + tie_sq) / 2)
    assert m["nll"] == pytest.approx(2.0)
    assert m["bt_loss"] == pytest.approx(bt) and m["tie_loss"] == pytest.approx(0.09)
    assert m["pair_loss"] == pytest.approx((bt + 0.09) / 2)
    assert m["accuracy"] == 1.0 and m["tie_fraction"] == 0.5


def test_critique_tie_gradient_pulls_rewards_together() -> None:
    r_w, r_l = t(0.4).requires_grad_(), t(0.1).requires_grad_()
    critique_reward_loss(CRITIQUE_LOGPS[:1], CRITIQUE_MASK[:1], r_w, r_l, torch.tensor([True]))[0].backward()
    # d/dr_w (r_w − r_l)² = 2 · 0.3: descent lowers r_w and raises r_l
    assert r_w.grad is not None and r_l.grad is not None
    assert r_w.grad.item() == pytest.approx(0.6) and r_l.grad.item() == pytest.approx(-0.6)


def test_critique_nll_gradient_reaches_only_critique_tokens() -> None:
    logps = CRITIQUE_LOGPS.clone().requires_grad_()
    loss, m = critique_reward_loss(logps, CRITIQUE_MASK, t(0.0, 0.0), t(0.0, 0.0), torch.tensor([True, True]))
    loss.backward()
    assert m["tie_loss"] == 0.0 and m["bt_loss"] == 0.0 and m["accuracy"] == 0.0  # no strict pair
    assert logps.grad is not None
    third = -1.0 / 3  # d/dlogp of −Σ logp / 3
    assert logps.grad.flatten().tolist() == pytest.approx([third, third, 0.0, third, 0.0, 0.0])


def test_critique_loss_needs_critique_tokens_and_valid_weight() -> None:
    no_tokens = torch.zeros(2, 3, dtype=torch.bool)
    tie = torch.tensor([False, False])
    with pytest.raises(DataError, match="no response tokens"):
        critique_reward_loss(CRITIQUE_LOGPS, no_tokens, t(1.0, 1.0), t(0.0, 0.0), tie)
    with pytest.raises(ConfigError, match="nll_weight"):
        critique_reward_loss(CRITIQUE_LOGPS, CRITIQUE_MASK, t(1.0, 1.0), t(0.0, 0.0), tie, nll_weight=-1.0)
    with pytest.raises(DataError, match="tie: shape"):
        critique_reward_loss(CRITIQUE_LOGPS, CRITIQUE_MASK, t(1.0, 1.0), t(0.0, 0.0), tie[:1])


# ---------------------------------------------------------------- ranked lists → pairs


def test_pairs_from_ranking_gives_all_ordered_pairs_with_margins_and_skips_ties() -> None:
    pairs = pairs_from_ranking([0.5, 2.0, 0.5, 1.0])
    # (0,1): 2.0 > 0.5; (0,2): tie; (0,3): 1.0 > 0.5; (1,2): 2.0 > 0.5; (1,3): 2.0 > 1.0; (2,3): 1.0 > 0.5
    assert pairs == [(1, 0, 1.5), (3, 0, 0.5), (1, 2, 1.5), (1, 3, 1.0), (3, 2, 0.5)]
    assert len(pairs_from_ranking([4, 3, 2, 1])) == 4 * 3 // 2
    assert pairs_from_ranking([1.0]) == [] and pairs_from_ranking([]) == []
    assert pairs_from_ranking([2.0, 2.0]) == []


def test_pairs_from_ranking_rejects_non_finite_scores() -> None:
    with pytest.raises(DataError, match=r"scores: scores at positions \[1\]"):
        pairs_from_ranking([1.0, NAN])
