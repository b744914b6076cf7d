"""Pure pieces of PPO for language models: rewards, KL estimates, GAE, whitening, the clipped policy
and value losses, KL-coefficient controllers and the LLaVA-RLHF sequence reward.

One PPO step of a recipe, all tensors over the response tokens of a rollout batch::

    score, _ = llava_rlhf_reward(rm_score, length, max_length, has_eos, correctness, ...)  # (B,)
    kl = kl_penalty(old_logp, ref_logp, "k1", clamp=...)                                 # (B, T)
    rewards = token_rewards(score, kl, mask, kl_ctl.value)                               # (B, T)
    advantages, returns = gae(rewards, old_values, mask, gamma, lam)                     # (B, T)
    advantages = whiten(advantages, mask)
    pg_loss, _ = policy_loss(logp, old_logp, advantages, mask)
    vf_loss, _ = value_loss(values, old_values, returns, mask)
    kl_ctl.update(mean_kl, n_steps=B)

Masks are explicit (B, T) bool tensors; positions outside the mask never reach a value or a gradient,
even when they hold nan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from mmalign.errors import ConfigError, DataError
from mmalign.losses.dpo import _check_shape

KLKind = Literal["k1", "k2", "k3", "abs"]


def _token_mask(mask: Tensor, **tensors: Tensor) -> Tensor:  # (B, T) bool
    """Check that the named (B, T) ``tensors`` and ``mask`` share one shape; return ``mask`` as bool."""
    first: Tensor | None = None
    for field, x in tensors.items():
        _check_shape(x, field, 2, like=first)
        first = x if first is None else first
    assert first is not None, "_token_mask needs at least one tensor"
    _check_shape(mask, "mask", 2, like=first)
    return mask.bool()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:  # (B, T), (B, T) bool -> scalar
    """Mean of ``x`` over the True entries of ``mask``, all rows pooled (token-level mean)."""
    n = int(mask.sum().item())
    if n == 0:
        raise DataError("no valid tokens in the batch", field="mask")
    return torch.where(mask, x, 0.0).sum() / n


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}: must be in [0, 1], got {value}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}: must be > 0, got {value}")


@torch.no_grad()
def gae(
    rewards: Tensor,  # (B, T) per-token rewards
    values: Tensor,  # (B, T) value estimates V(s_t) of the rollout (old) critic
    mask: Tensor,  # (B, T) bool, True on the action (response) tokens
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:  # advantages (B, T), returns (B, T)
    """Generalised advantage estimation (Schulman et al. 2016) along the valid tokens of each row.

    With t' the next valid token after t::

        δ_t = r_t + γ·V(t') − V(t)          (V after the last valid token is 0: the episode ends)
        A_t = δ_t + γλ·A_{t'}               (A after the last valid token is 0)
        R_t = A_t + V(t)

    For the usual right-padded masks t' = t + 1; positions outside the mask are skipped (they take
    no time step, so a hole in the mask joins its two sides) and get A = R = 0. λ = 1 gives Monte
    Carlo advantages, λ = 0 the one-step TD error. Computed without gradient: the outputs are
    constants for the losses.
    """
    valid = _token_mask(mask, rewards=rewards, values=values)
    _check_unit_interval("gae: gamma", gamma)
    _check_unit_interval("gae: lam", lam)
    r = torch.where(valid, rewards, 0.0)  # (B, T)
    v = torch.where(valid, values.to(r.dtype), 0.0)  # (B, T)
    advantages = torch.zeros_like(r)  # (B, T)
    next_value = torch.zeros_like(r[:, 0])  # (B,) V(t') of the next valid token
    next_adv = torch.zeros_like(r[:, 0])  # (B,) A_{t'}
    for t in reversed(range(r.shape[1])):
        m = valid[:, t]  # (B,)
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0.0)
        next_adv = torch.where(m, adv, next_adv)
        next_value = torch.where(m, v[:, t], next_value)
    returns = torch.where(valid, advantages + v, 0.0)
    return advantages, returns


def whiten(
    x: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Tensor:  # (B, T)
    """Masked whitening over all valid entries of the batch: ``(x − μ) / sqrt(σ² + eps)``.

    μ and σ² are taken over the entries under ``mask`` only; σ² is the *unbiased* sample variance
    (Bessel's n − 1 denominator, as in TRL's ``masked_whiten``), so at least two valid entries are
    needed. With ``shift_mean=False`` the mean is added back (only the scale changes), the usual
    choice for rewards. Positions outside the mask are 0 in the output.
    """
    valid = _token_mask(mask, x=x)
    n = int(valid.sum().item())
    if n < 2:
        raise DataError(f"whitening needs at least 2 valid entries, got {n}", field="mask")
    xs = torch.where(valid, x, 0.0)  # (B, T)
    mean = xs.sum() / n
    var = torch.where(valid, (xs - mean) ** 2, 0.0).sum() / (n - 1)
    out = (xs - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, 0.0)


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: Tensor) -> Tensor:
    return torch.expm1(-log_ratio) + log_ratio  # (ρ − 1) − log ρ with ρ = π_ref/π = exp(−log_ratio)


_KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3, "abs": torch.abs}


def kl_penalty(
    logp: Tensor,  # (B, T) log π(y_t) of the sampled tokens under the policy
    ref_logp: Tensor,  # (B, T) log π_ref(y_t) of the same tokens
    kind: KLKind = "k1",
    clamp: float | None = None,
) -> Tensor:  # (B, T)
    """Per-token estimate of KL(π ‖ π_ref) from samples of π, with x = log π − log π_ref:

    - ``k1``: x (unbiased, can be negative; the classic RLHF penalty),
    - ``k2``: ½x² (low variance, biased),
    - ``k3``: (e^{−x} − 1) + x (Schulman's unbiased, non-negative estimator),
    - ``abs``: |x|.

    With ``clamp`` the estimate is clamped to [−clamp, clamp] (LLaVA-RLHF clamps the k1 penalty).
    No mask: the caller masks (e.g. :func:`token_rewards` ignores positions outside its mask).
    """
    _check_shape(logp, "logp", 2)
    _check_shape(ref_logp, "ref_logp", 2, like=logp)
    if kind not in _KL_ESTIMATORS:
        raise ConfigError(f"kl_penalty: kind: unknown {kind!r}, expected one of {', '.join(_KL_ESTIMATORS)}")
    kl = _KL_ESTIMATORS[kind](logp - ref_logp)  # (B, T)
    if clamp is not None:
        _check_positive("kl_penalty: clamp", clamp)
        kl = kl.clamp(min=-clamp, max=clamp)
    return kl


def token_rewards(
    score: Tensor,  # (B,) sequence-level reward (RM score, verifier reward, …)
    kl: Tensor,  # (B, T) per-token KL estimate (:func:`kl_penalty`)
    mask: Tensor,  # (B, T) bool, True on response tokens
    kl_coef: float | Tensor,  # β, a scalar or one per row (B,)
) -> Tensor:  # (B, T)
    """Per-token PPO rewards: ``r_t = −β·kl_t`` on every valid token, plus ``score`` on the last valid
    token of each row; 0 outside the mask. A row without a valid token is an error (its score would
    be lost).
    """
    valid = _token_mask(mask, kl=kl)
    _check_shape(score, "score", 1)
    if score.shape[0] != kl.shape[0]:
        raise DataError(f"shape {tuple(score.shape)}, expected ({kl.shape[0]},)", field="score")
    empty = ~valid.any(dim=1)  # (B,)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise DataError(f"rows {rows} have no response tokens to put the score on", field="mask")
    beta = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device)
    if beta.dim() == 1:
        _check_shape(beta, "kl_coef", 1, like=score)
        beta = beta.unsqueeze(1)  # (B, 1)
    elif beta.dim() != 0:
        raise DataError(f"shape {tuple(beta.shape)}, expected a scalar or ({kl.shape[0]},)", field="kl_coef")
    rewards = torch.where(valid, -beta * torch.where(valid, kl, 0.0), 0.0)  # (B, T)
    positions = torch.arange(kl.shape[1], device=kl.device)  # (T,)
    last = torch.where(valid, positions, -1).amax(dim=1)  # (B,) index of the last valid token
    is_last = positions.unsqueeze(0) == last.unsqueeze(1)  # (B, T)
    return rewards + torch.where(is_last, score.to(kl.dtype).unsqueeze(1), 0.0)


def policy_loss(
    logp: Tensor,  # (B, T) log π_θ of the sampled tokens (with grad)
    old_logp: Tensor,  # (B, T) log π_old of the same tokens at rollout time
    advantages: Tensor,  # (B, T)
    mask: Tensor,  # (B, T) bool
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate, masked mean over all valid tokens of the batch:

    ``L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))`` with ρ_t = exp(logp − old_logp).

    ``old_logp`` and ``advantages`` are detached. Metrics: ``loss``, ``clip_frac`` (share of tokens
    where the clipped term is the larger one, i.e. the gradient is cut), ``approx_kl``
    (½·mean (logp − old_logp)², the k2 estimate of KL(old ‖ new)), ``ratio_mean``.
    """
    valid = _token_mask(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    _check_positive("policy_loss: clip_eps", clip_eps)
    log_ratio = torch.where(valid, logp, 0.0) - torch.where(valid, old_logp.detach(), 0.0)  # (B, T)
    adv = torch.where(valid, advantages.detach(), 0.0)  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), valid)
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), valid).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, valid).item(),
            "ratio_mean": masked_mean(ratio, valid).item(),
        }
    return loss, metrics


def value_loss(
    values: Tensor,  # (B, T) V_φ(s_t) of the critic being trained (with grad)
    old_values: Tensor,  # (B, T) values at rollout time
    returns: Tensor,  # (B, T) GAE returns
    mask: Tensor,  # (B, T) bool
    clip_eps: float = 0.2,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped value loss, masked mean over all valid tokens of the batch:

    ``L = ½ mean_t max((V − R)², (V_clip − R)²)``, ``V_clip = V_old + clip(V − V_old, −ε, ε)``.

    ``old_values`` and ``returns`` are detached. Metrics: ``loss``, ``clip_frac`` (share of tokens
    where the clipped error is the larger one), ``value_mean``, ``return_mean``, ``value_error``
    (mean (V − R)²).
    """
    valid = _token_mask(mask, values=values, old_values=old_values, returns=returns)
    _check_positive("value_loss: clip_eps", clip_eps)
    v = torch.where(valid, values, 0.0)  # (B, T)
    v_old = torch.where(valid, old_values.detach(), 0.0)
    ret = torch.where(valid, returns.detach(), 0.0)
    v_clipped = v_old + (v - v_old).clamp(-clip_eps, clip_eps)
    err_unclipped = (v - ret) ** 2
    err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), valid)
    with torch.no_grad():
        metrics = {
            "loss": loss.item(),
            "clip_frac": masked_mean((err_clipped > err_unclipped).to(v.dtype), valid).item(),
            "value_mean": masked_mean(v, valid).item(),
            "return_mean": masked_mean(ret, valid).item(),
            "value_error": masked_mean(err_unclipped, valid).item(),
        }
    return loss, metrics


class FixedKLController:
    """A constant KL coefficient β; :meth:`update` does nothing."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ConfigError(f"FixedKLController: coef: must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β unchanged (same interface as :class:`AdaptiveKLController`)."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), steering the observed KL towards ``target``:

    ``e = clip(KL / target − 1, −0.2, 0.2)``, ``β ← β · (1 + e · n_steps / horizon)``.

    β grows while the KL is above the target and shrinks while it is below; the clipped error bounds
    the change per update.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        _check_positive("AdaptiveKLController: init_coef", init_coef)
        _check_positive("AdaptiveKLController: target", target)
        _check_positive("AdaptiveKLController: horizon", horizon)
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after ``n_steps`` samples (episodes) whose mean KL was ``current_kl``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


KLController = FixedKLController | AdaptiveKLController
"""Either controller: both expose ``.value`` and ``.update(current_kl, n_steps)``."""


def llava_rlhf_reward(
    rm_score: Tensor,  # (B,) reward-model score of each response
    length: Tensor,  # (B,) response length in tokens
    max_length: int,  # L, the generation budget
    has_eos: Tensor,  # (B,) bool, True if the response ended with EOS
    correctness: Tensor | None,  # (B,) in [0, 1] from a symbolic check against facts, None = no bonus
    length_penalty: float,
    correctness_bonus: float,
    no_eos_penalty: float = -8.0,
) -> tuple[Tensor, dict[str, float]]:
    """Sequence reward of LLaVA-RLHF's PPO stage:

    ``reward = rm_score − length_penalty·(length / L) + correctness_bonus·correctness``

    except that a response without EOS (cut off at the budget) gets ``no_eos_penalty`` *instead*: the
    fixed penalty replaces the whole reward, as in LLaVA-RLHF, so a truncated answer cannot earn a
    good score. The reward is detached; the per-token KL term is added by :func:`token_rewards`. Metrics:
    ``reward``, ``rm_score``, ``length_penalty`` (mean length term over all responses),
    ``correctness`` (mean, 0 when None) and ``no_eos_frac``.
    """
    _check_shape(rm_score, "rm_score", 1)
    _check_shape(length, "length", 1, like=rm_score)
    _check_shape(has_eos, "has_eos", 1, like=rm_score)
    _check_positive("llava_rlhf_reward: max_length", max_length)
    score = rm_score.detach()  # (B,) rewards are constants for the PPO losses
    if not score.is_floating_point():
        score = score.to(torch.get_default_dtype())
    penalty = length_penalty * length.to(score.dtype) / max_length  # (B,)
    bonus = torch.zeros_like(score)  # (B,)
    if correctness is not None:
        _check_shape(correctness, "correctness", 1, like=rm_score)
        bonus = correctness_bonus * correctness.to(score.dtype)
    ended = has_eos.bool()  # (B,)
    reward = torch.where(ended, score - penalty + bonus, no_eos_penalty)  # (B,)
    metrics = {
        "reward": reward.mean().item(),
        "rm_score": score.mean().item(),
        "length_penalty": penalty.mean().item(),
        "correctness": 0.0 if correctness is None else correctness.float().mean().item(),
        "no_eos_frac": (~ended).float().mean().item(),
    }
    return reward, metrics


__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "KLKind",
    "gae",
    "kl_penalty",
    "llava_rlhf_reward",
    "masked_mean",
    "policy_loss",
    "token_rewards",
    "value_loss",
    "whiten",
]
