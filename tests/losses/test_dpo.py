"""DPO-family losses against values computed by hand (plain Python math written out in each test)."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.errors import ConfigError, DataError
from mmalign.losses.dpo import (
    LossType,
    dynamic_beta,
    preference_loss,
    score_kwargs,
    sequence_scores,
    sft_nll,
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def softplus_neg(x: float) -> float:
    """−log σ(x) in plain Python."""
    return math.log1p(math.exp(-x))


# One pair with Δw = 0.5 (−1.0 vs ref −1.5) and Δl = −0.3 (−2.3 vs ref −2.0).
PC, PR, RC, RR = t(-1.0), t(-2.3), t(-1.5), t(-2.0)
# A batch: pair 1 as above, pair 2 with Δw = −0.2 and Δl = 0.4 (the policy prefers the rejected one).
BPC, BPR, BRC, BRR = t(-1.0, -3.2), t(-2.3, -1.6), t(-1.5, -3.0), t(-2.0, -2.0)


def test_loss_type_capability_table_is_exact() -> None:
    table = {
        lt.value: (lt.needs_reference, lt.needs_segments, lt.needs_reward_margin, lt.length_normalised)
        for lt in LossType
    }
    assert table == {
        "dpo": (True, False, False, False),
        "ipo": (True, False, False, False),
        "cdpo": (True, False, False, False),
        "simpo": (False, False, False, True),
        "ddpo": (True, True, False, True),
        "mmdpo": (True, False, True, False),
    }
    assert LossType("ddpo") is LossType.DDPO and str(LossType.DDPO) == "ddpo"


def test_score_kwargs_follow_the_loss_type() -> None:
    assert score_kwargs(LossType.DPO, gamma=5.0) == {"gamma": 1.0, "normalise": False}
    assert score_kwargs("simpo", gamma=5.0) == {"gamma": 1.0, "normalise": True}
    assert score_kwargs(LossType.DDPO, gamma=5.0) == {"gamma": 5.0, "normalise": True}


def test_sequence_scores_sum_and_mean_ignore_masked_positions_even_nan() -> None:
    logps = t(-1.0, -2.0, float("nan"), -3.0, float("-inf"), float("nan")).view(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert sequence_scores(logps, mask).tolist() == [-3.0, -3.0]
    assert sequence_scores(logps, mask, normalise=True).tolist() == [-1.5, -3.0]


def test_sequence_scores_weighted_mean_gives_changed_tokens_weight_gamma() -> None:
    logps = t(-1.0, -4.0, -1.0, -9.0).view(1, 4)
    mask = torch.tensor([[True, True, True, False]])
    changed = torch.tensor([[False, True, False, True]])  # the masked changed token is ignored
    # (Σ_U + γ Σ_C) / (|U| + γ|C|) = (−1 − 1 + 3·(−4)) / (2 + 3·1) = −14 / 5
    assert sequence_scores(logps, mask, changed, gamma=3.0, normalise=True).item() == pytest.approx(-2.8)
    assert sequence_scores(logps, mask, changed, gamma=1.0, normalise=True).item() == pytest.approx(-2.0)
    assert sequence_scores(logps, mask, changed, gamma=3.0).item() == pytest.approx(-14.0)  # weighted sum


def test_sequence_scores_mean_of_row_without_response_tokens_is_an_error() -> None:
    with pytest.raises(DataError, match=r"mask: rows \[1\]"):
        sequence_scores(t(-1.0, -1.0).view(2, 1), torch.tensor([[True], [False]]), normalise=True)
    with pytest.raises(DataError, match="changed"):
        sequence_scores(t(-1.0, -1.0).view(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.ones(2, 1))


def test_dynamic_beta_hand_values_and_negative_margin_clamped() -> None:
    beta = dynamic_beta(t(0.0, 2.0, 4.0, -3.0, 1e6))
    # β0 (1 + w (1 − e^{−kδ})) with β0 0.1, w 0.5, k 0.5
    b2, b4 = 0.1 * (1 + 0.5 * (1 - math.exp(-1.0))), 0.1 * (1 + 0.5 * (1 - math.exp(-2.0)))
    expected = [0.1, b2, b4, 0.1, 0.15]
    assert beta.tolist() == pytest.approx(expected)
    assert expected[1] == pytest.approx(0.1316060279414279)
    assert dynamic_beta(t(2.0), beta0=0.2, w=1.0, k=1.0).item() == pytest.approx(0.2 * (2 - math.exp(-2.0)))


def test_dpo_single_pair_matches_hand_value_and_metrics() -> None:
    loss, m = preference_loss(LossType.DPO, PC, PR, RC, RR, beta=0.1)
    # β(Δw − Δl) = 0.1 · (0.5 + 0.3) = 0.08 → −log σ(0.08)
    assert loss.item() == pytest.approx(softplus_neg(0.08)) and loss.item() == pytest.approx(0.6539469673)
    assert m["loss"] == pytest.approx(0.6539469673)
    assert m["reward_margin"] == pytest.approx(0.08)
    assert m["chosen_reward"] == pytest.approx(0.05) and m["rejected_reward"] == pytest.approx(-0.03)
    assert m["accuracy"] == 1.0 and "beta" not in m


def test_dpo_batch_is_the_mean_of_per_pair_losses() -> None:
    loss, m = preference_loss("dpo", BPC, BPR, BRC, BRR, beta=0.1)
    # pair 2: β(Δw − Δl) = 0.1 · (−0.2 − 0.4) = −0.06
    assert loss.item() == pytest.approx((softplus_neg(0.08) + softplus_neg(-0.06)) / 2)
    assert m["accuracy"] == 0.5
    assert m["reward_margin"] == pytest.approx((0.08 - 0.06) / 2)
    assert m["chosen_reward"] == pytest.approx((0.05 - 0.02) / 2)
    assert m["rejected_reward"] == pytest.approx((-0.03 + 0.04) / 2)


def test_ipo_is_squared_distance_to_half_inverse_beta() -> None:
    loss, _ = preference_loss(LossType.IPO, PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx((0.8 - 5.0) ** 2)  # 17.64
    loss, _ = preference_loss(LossType.IPO, BPC, BPR, BRC, BRR, beta=0.1)
    assert loss.item() == pytest.approx(((0.8 - 5.0) ** 2 + (-0.6 - 5.0) ** 2) / 2)  # (17.64 + 31.36) / 2


def test_cdpo_mixes_both_directions_and_equals_dpo_at_zero_smoothing() -> None:
    loss, _ = preference_loss(LossType.CDPO, PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * softplus_neg(0.08) + 0.1 * softplus_neg(-0.08))  # 0.66194...
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(4)]
    cdpo, _ = preference_loss(LossType.CDPO, *xs, beta=0.3, label_smoothing=0.0)
    dpo, _ = preference_loss(LossType.DPO, *xs, beta=0.3)
    assert torch.equal(cdpo, dpo)


def test_simpo_uses_target_margin_and_ignores_reference_inputs() -> None:
    sw, sl = t(-0.5), t(-1.2)  # length-normalised policy scores
    loss, m = preference_loss(LossType.SIMPO, sw, sl, beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(softplus_neg(2.0 * 0.7 - 0.5))  # −log σ(0.9) = 0.34115...
    assert m["chosen_reward"] == pytest.approx(-1.0) and m["rejected_reward"] == pytest.approx(-2.4)
    with_ref, _ = preference_loss(LossType.SIMPO, sw, sl, t(9.0), t(-9.0), beta=2.0, simpo_gamma=0.5)
    assert torch.equal(loss, with_ref)


def test_ddpo_with_gamma_one_equals_length_normalised_dpo_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    logps = [-torch.rand(3, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    changed = torch.rand(3, 5, generator=g) > 0.5
    ddpo_scores = [sequence_scores(x, mask, changed, **score_kwargs("ddpo", gamma=1.0)) for x in logps]
    mean_scores = [sequence_scores(x, mask, normalise=True) for x in logps]
    assert all(torch.equal(a, b) for a, b in zip(ddpo_scores, mean_scores, strict=True))
    ddpo, _ = preference_loss(LossType.DDPO, *ddpo_scores, beta=0.5)
    dpo, _ = preference_loss(LossType.DPO, *mean_scores, beta=0.5)
    assert torch.equal(ddpo, dpo)


def test_ddpo_with_gamma_above_one_weights_changed_tokens() -> None:
    kw = score_kwargs(LossType.DDPO, gamma=3.0)
    mask = torch.tensor([[True, True, True, False]])
    chosen_changed = torch.tensor([[False, True, False, False]])
    rejected_changed = torch.tensor([[False, True, False, True]])
    pol_c = sequence_scores(t(-1.0, -4.0, -1.0, 0.0).view(1, 4), mask, chosen_changed, **kw)  # −14/5 = −2.8
    pol_r = sequence_scores(t(-1.0, -2.0, -1.5, 0.0).view(1, 4), mask, rejected_changed, **kw)  # −8.5/5
    ref_c = sequence_scores(torch.full((1, 4), -2.0, dtype=torch.float64), mask, chosen_changed, **kw)  # −2
    ref_r = sequence_scores(torch.full((1, 4), -1.0, dtype=torch.float64), mask, rejected_changed, **kw)  # −1
    assert (pol_c.item(), pol_r.item()) == (pytest.approx(-2.8), pytest.approx(-1.7))
    loss, m = preference_loss(LossType.DDPO, pol_c, pol_r, ref_c, ref_r, beta=0.5)
    # Δw = −0.8, Δl = −0.7 → β(Δw − Δl) = 0.5 · (−0.1) = −0.05
    assert loss.item() == pytest.approx(softplus_neg(-0.05))  # 0.71845...
    assert m["accuracy"] == 0.0


def test_mmdpo_uses_per_pair_beta_and_reports_its_mean() -> None:
    beta = dynamic_beta(t(0.0, 2.0))  # [0.1, 0.13160...]
    b2 = 0.1 * (1 + 0.5 * (1 - math.exp(-1.0)))
    loss, m = preference_loss(LossType.MMDPO, BPC, BPR, BRC, BRR, beta=beta)
    assert loss.item() == pytest.approx((softplus_neg(0.1 * 0.8) + softplus_neg(b2 * -0.6)) / 2)
    assert m["beta"] == pytest.approx((0.1 + b2) / 2)
    assert m["reward_margin"] == pytest.approx((0.08 - 0.6 * b2) / 2)


def test_mmdpo_rejects_a_scalar_beta() -> None:
    with pytest.raises(ConfigError, match="per-pair beta"):
        preference_loss(LossType.MMDPO, BPC, BPR, BRC, BRR, beta=0.1)


def test_invalid_inputs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError, match="needs reference"):
        preference_loss(LossType.DPO, PC, PR)
    with pytest.raises(ConfigError, match="label_smoothing"):
        preference_loss(LossType.DPO, PC, PR, RC, RR, label_smoothing=0.1)
    with pytest.raises(ConfigError, match="beta: must be > 0"):
        preference_loss(LossType.IPO, PC, PR, RC, RR, beta=0.0)
    with pytest.raises(DataError, match="ref_rejected: shape"):
        preference_loss(LossType.DPO, BPC, BPR, BRC, RR)
    with pytest.raises(DataError, match="beta: shape"):
        preference_loss(LossType.DPO, BPC, BPR, BRC, BRR, beta=t(0.1, 0.1, 0.1))


def test_dpo_gradient_has_the_right_sign_and_value() -> None:
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    rc = RC.clone().requires_grad_()
    loss, _ = preference_loss(LossType.DPO, pc, pr, rc, RR, beta=0.1)
    loss.backward()
    # d/dpc −log σ(βh) = −β σ(−βh)
    sigma = 1 / (1 + math.exp(0.08))
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.item() == pytest.approx(-0.1 * sigma) and pc.grad.item() < 0  # raising chosen lowers loss
    assert pr.grad.item() == pytest.approx(0.1 * sigma) and pr.grad.item() > 0
    assert rc.grad is None  # the reference is detached


def test_gradients_flow_from_loss_to_token_logps() -> None:
    token_logps = t(-1.0, -2.0, -0.5, -0.5).view(2, 2).requires_grad_()
    mask = torch.ones(2, 2, dtype=torch.bool)
    scores = sequence_scores(token_logps, mask)  # (2,): row 0 chosen, row 1 rejected
    loss, _ = preference_loss(LossType.SIMPO, scores[:1], scores[1:], beta=1.0, simpo_gamma=0.0)
    loss.backward()
    assert token_logps.grad is not None
    assert (token_logps.grad[0] < 0).all() and (token_logps.grad[1] > 0).all()


def test_sft_nll_is_mean_over_response_tokens_of_the_batch() -> None:
    logps = t(-1.0, -2.0, float("nan"), -3.0, 0.0, 0.0).view(2, 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert sft_nll(logps, mask).item() == pytest.approx((1.0 + 2.0 + 3.0) / 3)
    with pytest.raises(DataError, match="no response tokens"):
        sft_nll(logps, torch.zeros(2, 3, dtype=torch.bool))
