"""PPO pieces against values computed by hand (plain Python math written out in each test)."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.errors import ConfigError, DataError
from mmalign.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    llava_rlhf_reward,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)

NAN = float("nan")


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def row(*xs: float) -> torch.Tensor:
    return t(*xs).view(1, -1)


def bools(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ---------------------------------------------------------------- GAE

# One episode of three tokens, reward 1 on the last one.
R3, V3 = row(0.0, 0.0, 1.0), row(0.5, 0.6, 0.7)


def test_gae_one_row_of_three_tokens_step_by_step() -> None:
    adv, ret = gae(R3, V3, bools([1, 1, 1]), gamma=0.9, lam=0.8)
    # γλ = 0.72; V after the last token is 0
    d2 = 1.0 + 0.9 * 0.0 - 0.7  # 0.3
    a2 = d2  # 0.3
    d1 = 0.0 + 0.9 * 0.7 - 0.6  # 0.03
    a1 = d1 + 0.72 * a2  # 0.03 + 0.216 = 0.246
    d0 = 0.0 + 0.9 * 0.6 - 0.5  # 0.04
    a0 = d0 + 0.72 * a1  # 0.04 + 0.17712 = 0.21712
    assert adv.flatten().tolist() == pytest.approx([a0, a1, a2])
    assert adv.flatten().tolist() == pytest.approx([0.21712, 0.246, 0.3])
    assert ret.flatten().tolist() == pytest.approx([0.71712, 0.846, 1.0])  # A + V


def test_gae_lambda_one_is_monte_carlo_and_lambda_zero_is_td_error() -> None:
    _, ret = gae(R3, V3, bools([1, 1, 1]), gamma=0.9, lam=1.0)
    assert ret.flatten().tolist() == pytest.approx([0.81, 0.9, 1.0])  # γ²·1, γ·1, 1
    adv, _ = gae(R3, V3, bools([1, 1, 1]), gamma=0.9, lam=0.0)
    assert adv.flatten().tolist() == pytest.approx([0.04, 0.03, 0.3])  # the δ_t above


def test_gae_right_padding_is_ignored_and_one_token_row_is_reward_minus_value() -> None:
    rewards = t(0.0, 0.0, 1.0, NAN, 2.0, NAN, NAN, NAN).view(2, 4)
    values = t(0.5, 0.6, 0.7, NAN, 0.5, 123.0, 4.0, NAN).view(2, 4)
    mask = bools([1, 1, 1, 0], [1, 0, 0, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.21712, 0.246, 0.3, 0.0])  # as the unpadded row
    # one valid token: δ = r − V = 2.0 − 0.5 (V after it is 0, the padded 123.0 is not used)
    assert adv[1].tolist() == pytest.approx([1.5, 0.0, 0.0, 0.0])
    assert ret[1].tolist() == pytest.approx([2.0, 0.0, 0.0, 0.0])
    assert ret[0, 3].item() == 0.0


def test_gae_skips_a_hole_in_the_mask() -> None:
    adv, _ = gae(row(0.0, 9.0, 1.0), row(0.5, 9.0, 0.7), bools([1, 0, 1]), gamma=0.9, lam=0.8)
    # the next valid token after 0 is 2: δ0 = 0 + 0.9·0.7 − 0.5 = 0.13, A0 = 0.13 + 0.72·0.3 = 0.346
    assert adv.flatten().tolist() == pytest.approx([0.346, 0.0, 0.3])


def test_gae_outputs_carry_no_gradient() -> None:
    values = V3.clone().requires_grad_()
    adv, ret = gae(R3, values, bools([1, 1, 1]), gamma=0.9, lam=0.8)
    assert not adv.requires_grad and not ret.requires_grad


def test_gae_rejects_bad_parameters_and_shapes() -> None:
    with pytest.raises(ConfigError, match="gamma"):
        gae(R3, V3, bools([1, 1, 1]), gamma=1.5, lam=0.8)
    with pytest.raises(ConfigError, match="lam"):
        gae(R3, V3, bools([1, 1, 1]), gamma=0.9, lam=-0.1)
    with pytest.raises(DataError, match="mask: shape"):
        gae(R3, V3, bools([1, 1]), gamma=0.9, lam=0.8)


# ---------------------------------------------------------------- whitening


def test_whiten_uses_masked_mean_and_unbiased_variance() -> None:
    x = t(1.0, 3.0, 5.0, NAN).view(2, 2)
    mask = bools([1, 1], [1, 0])
    # valid 1, 3, 5: mean 3; unbiased var = ((−2)² + 0² + 2²) / (3 − 1) = 4 → std 2
    out = whiten(x, mask)
    assert out.flatten().tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0])
    kept = whiten(x, mask, shift_mean=False)  # (x − 3) / 2 + 3
    assert kept.flatten().tolist() == pytest.approx([2.0, 3.0, 4.0, 0.0])


def test_whiten_needs_two_valid_entries() -> None:
    with pytest.raises(DataError, match="at least 2 valid entries, got 1"):
        whiten(row(1.0, 2.0), bools([1, 0]))


# ---------------------------------------------------------------- KL estimates

LOGP, REF = row(-1.0, -2.0), row(-1.5, -1.0)  # x = logp − ref = 0.5, −1.0


def test_kl_estimators_match_hand_values() -> None:
    assert kl_penalty(LOGP, REF, "k1").flatten().tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(LOGP, REF, "k2").flatten().tolist() == pytest.approx([0.125, 0.5])  # ½x²
    # (e^{−x} − 1) + x: e^{−0.5} − 1 + 0.5 = 0.106531; e^{1} − 1 − 1 = 0.718282
    k3 = [math.exp(-0.5) - 0.5, math.e - 2.0]
    assert kl_penalty(LOGP, REF, "k3").flatten().tolist() == pytest.approx(k3)
    assert k3 == pytest.approx([0.106531, 0.718282], abs=1e-6)
    assert kl_penalty(LOGP, REF, "abs").flatten().tolist() == pytest.approx([0.5, 1.0])


def test_kl_clamp_bounds_the_estimate_on_both_sides() -> None:
    assert kl_penalty(LOGP, REF, "k1", clamp=0.3).flatten().tolist() == pytest.approx([0.3, -0.3])
    assert kl_penalty(LOGP, REF, "k2", clamp=0.3).flatten().tolist() == pytest.approx([0.125, 0.3])


def test_kl_rejects_unknown_kind_and_bad_clamp() -> None:
    with pytest.raises(ConfigError, match="unknown 'k4'"):
        kl_penalty(LOGP, REF, "k4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="clamp"):
        kl_penalty(LOGP, REF, "k1", clamp=0.0)


# ---------------------------------------------------------------- per-token rewards

KL = t(0.1, 0.2, 0.3, 0.4, 0.5, 9.9).view(2, 3)
KL_MASK = bools([1, 1, 1], [1, 1, 0])


def test_token_rewards_penalise_kl_and_put_the_score_on_the_last_valid_token() -> None:
    rewards = token_rewards(t(2.0, -1.0), KL, KL_MASK, kl_coef=0.5)
    # row 0: −0.5·[0.1, 0.2, 0.3] + [0, 0, 2]; row 1: −0.5·[0.4, 0.5] + [0, −1], padding 0
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, 1.85])
    assert rewards[1].tolist() == pytest.approx([-0.2, -1.25, 0.0])
    nan_under_mask = torch.where(KL_MASK, KL, NAN)
    assert torch.equal(token_rewards(t(2.0, -1.0), nan_under_mask, KL_MASK, kl_coef=0.5), rewards)


def test_token_rewards_accept_a_per_row_coefficient() -> None:
    rewards = token_rewards(t(2.0, -1.0), KL, KL_MASK, kl_coef=t(0.5, 1.0))
    assert rewards[1].tolist() == pytest.approx([-0.4, -1.5, 0.0])  # −1·[0.4, 0.5] + [0, −1]
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, 1.85])


def test_token_rewards_reject_a_row_without_tokens() -> None:
    with pytest.raises(DataError, match=r"mask: rows \[1\]"):
        token_rewards(t(2.0, -1.0), KL, bools([1, 1, 1], [0, 0, 0]), kl_coef=0.1)
    with pytest.raises(DataError, match="kl_coef"):
        token_rewards(t(2.0, -1.0), KL, KL_MASK, kl_coef=t(0.1, 0.1, 0.1))


# ---------------------------------------------------------------- clipped policy loss

# Log-ratios ln 1.5, ln 0.5, ln 1.1, ln 1.5 and a padded position.
OLD = row(-1.0, -1.0, -1.0, -1.0, NAN)
NEW = OLD + row(math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5), NAN)
ADV = row(1.0, -1.0, 2.0, -1.0, NAN)
PG_MASK = bools([1, 1, 1, 1, 0])


def test_policy_loss_clipped_surrogate_hand_values() -> None:
    loss, m = policy_loss(NEW, OLD, ADV, PG_MASK, clip_eps=0.2)
    # token: max(−Aρ, −A·clip(ρ, 0.8, 1.2))
    # 0: ρ 1.5, A 1 → max(−1.5, −1.2) = −1.2 (clipped)
    # 1: ρ 0.5, A −1 → max(0.5, 0.8) = 0.8 (clipped)
    # 2: ρ 1.1, A 2 → max(−2.2, −2.2) = −2.2
    # 3: ρ 1.5, A −1 → max(1.5, 1.2) = 1.5 (pessimistic bound keeps the unclipped term)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 + 1.5) / 4)  # −0.275
    assert m["loss"] == pytest.approx(-0.275)
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1 + 1.5) / 4)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1), math.log(1.5)]
    assert m["approx_kl"] == pytest.approx(0.5 * sum(x * x for x in logs) / 4)


def test_policy_loss_gradient_is_zero_where_clipped_and_finite_under_the_mask() -> None:
    logp = NEW.clone().requires_grad_()
    policy_loss(logp, OLD, ADV, PG_MASK)[0].backward()
    # unclipped tokens: d/dlogp (−Aρ)/4 = −Aρ/4 → token 2: −2·1.1/4 = −0.55, token 3: 1·1.5/4 = 0.375
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, -0.55, 0.375, 0.0])


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_ignores_padding() -> None:
    loss, m = policy_loss(OLD, OLD, ADV, PG_MASK)
    assert loss.item() == pytest.approx(-(1.0 - 1.0 + 2.0 - 1.0) / 4)
    assert m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0 and m["ratio_mean"] == 1.0
    garbage = torch.where(PG_MASK, ADV, 1e6)
    assert policy_loss(NEW, OLD, garbage, PG_MASK)[0].item() == pytest.approx(-0.275)


def test_policy_loss_rejects_empty_mask_and_bad_eps() -> None:
    with pytest.raises(DataError, match="no valid tokens"):
        policy_loss(NEW, OLD, ADV, torch.zeros_like(PG_MASK))
    with pytest.raises(ConfigError, match="clip_eps"):
        policy_loss(NEW, OLD, ADV, PG_MASK, clip_eps=0.0)


# ---------------------------------------------------------------- clipped value loss

VALUES, OLD_VALUES, RETURNS = row(1.0, 0.0, 2.0, NAN), row(0.5, 0.1, 1.0, NAN), row(1.2, 0.3, 1.5, NAN)
V_MASK = bools([1, 1, 1, 0])


def test_value_loss_clipped_hand_values() -> None:
    loss, m = value_loss(VALUES, OLD_VALUES, RETURNS, V_MASK, clip_eps=0.2)
    # 0: V_clip = 0.5 + 0.2 = 0.7; max((1 − 1.2)², (0.7 − 1.2)²) = max(0.04, 0.25) = 0.25 (clipped)
    # 1: V − V_old = −0.1 within ε → V_clip = V = 0; (0 − 0.3)² = 0.09
    # 2: V_clip = 1.0 + 0.2 = 1.2; max((2 − 1.5)², (1.2 − 1.5)²) = max(0.25, 0.09) = 0.25
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.09 + 0.25) / 3)  # 0.098333
    assert m["clip_frac"] == pytest.approx(1 / 3)
    assert m["value_mean"] == pytest.approx(1.0) and m["return_mean"] == pytest.approx(1.0)
    assert m["value_error"] == pytest.approx((0.04 + 0.09 + 0.25) / 3)


def test_value_loss_gradient_is_zero_where_clipped_and_finite_under_the_mask() -> None:
    values = VALUES.clone().requires_grad_()
    value_loss(values, OLD_VALUES, RETURNS, V_MASK)[0].backward()
    # d/dV ½(V − R)²/3 = (V − R)/3: token 1 → −0.3/3 = −0.1, token 2 → 0.5/3; token 0 is clipped
    assert values.grad is not None
    assert values.grad.flatten().tolist() == pytest.approx([0.0, -0.1, 0.5 / 3, 0.0])


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller_never_changes() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    with pytest.raises(ConfigError, match="coef"):
        FixedKLController(-0.1)


def test_adaptive_kl_controller_moves_towards_target_with_clipped_error() -> None:
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)
    # error = clip(9/6 − 1 = 0.5, ±0.2) = 0.2 → β·(1 + 0.2·256/10000) = 0.1 · 1.00512
    assert ctl.value == pytest.approx(0.100512)
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=3.0, n_steps=256)
    # error = clip(3/6 − 1 = −0.5, ±0.2) = −0.2 → 0.1 · 0.99488
    assert ctl.value == pytest.approx(0.099488)
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=6.6, n_steps=100)
    # error = 6.6/6 − 1 = 0.1 (within the clip) → 0.1 · (1 + 0.1·100/10000) = 0.1001
    assert ctl.value == pytest.approx(0.1001)
    ctl.update(current_kl=6.0, n_steps=100)  # on target: no change
    assert ctl.value == pytest.approx(0.1001)


def test_adaptive_kl_controller_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="target"):
        AdaptiveKLController(init_coef=0.1, target=0.0, horizon=100)
    with pytest.raises(ConfigError, match="horizon"):
        AdaptiveKLController(init_coef=0.1, target=6.0, horizon=0)


# ---------------------------------------------------------------- LLaVA-RLHF sequence reward

RM, LENGTH, EOS = t(1.0, 2.0, 0.5), torch.tensor([50, 100, 200]), torch.tensor([True, True, False])


def test_llava_rlhf_reward_hand_values_and_no_eos_replaces_the_reward() -> None:
    reward, m = llava_rlhf_reward(
        RM, LENGTH, 200, EOS, t(1.0, 0.0, 1.0), length_penalty=0.5, correctness_bonus=2.0
    )
    # 0: 1.0 − 0.5·50/200 + 2·1 = 2.875; 1: 2.0 − 0.5·100/200 + 0 = 1.75; 2: no EOS → −8
    assert reward.tolist() == pytest.approx([2.875, 1.75, -8.0])
    assert m["reward"] == pytest.approx((2.875 + 1.75 - 8.0) / 3)
    assert m["rm_score"] == pytest.approx(3.5 / 3)
    assert m["length_penalty"] == pytest.approx(0.5 * (0.25 + 0.5 + 1.0) / 3)
    assert m["correctness"] == pytest.approx(2 / 3) and m["no_eos_frac"] == pytest.approx(1 / 3)


def test_llava_rlhf_reward_without_correctness_and_custom_penalty() -> None:
    reward, m = llava_rlhf_reward(
        RM, LENGTH, 200, EOS, None, length_penalty=0.5, correctness_bonus=2.0, no_eos_penalty=-3.0
    )
    assert reward.tolist() == pytest.approx([0.875, 1.75, -3.0])
    assert m["correctness"] == 0.0
    with pytest.raises(ConfigError, match="max_length"):
        llava_rlhf_reward(RM, LENGTH, 0, EOS, None, length_penalty=0.5, correctness_bonus=2.0)


def test_masked_mean_pools_valid_tokens_of_all_rows_and_rejects_an_empty_mask() -> None:
    x = torch.tensor([[1.0, 2.0, NAN], [4.0, NAN, NAN]])  # padding may hold anything, even NaN
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 4) / 3)  # token-level, not row means
    with pytest.raises(DataError, match="no valid tokens"):
        masked_mean(x, torch.zeros_like(mask))
