"""Pure loss functions of the DPO family: DPO, IPO, cDPO, SimPO, DDPO (RLHF-V) and MM-DPO.

The pipeline of a recipe is::

    scores = sequence_scores(token_logps, mask, changed, **score_kwargs(loss_type, gamma))  # (B,)
    loss, metrics = preference_loss(loss_type, pol_c, pol_r, ref_c, ref_r, beta=...)

Variants differ only in (a) how token log-probs become one score per sequence (:func:`score_kwargs`,
driven by the :class:`LossType` capability properties) and (b) the per-pair loss of the score
difference (the ``_PAIR_LOSSES`` registry). Callers dispatch on the properties, never on names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.errors import ConfigError, DataError

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # pragma: no cover - Python 3.10 fallback

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class LossType(StrEnum):
    """Preference-optimisation variant, with the capabilities a recipe needs to know about."""

    DPO = "dpo"
    IPO = "ipo"
    CDPO = "cdpo"
    SIMPO = "simpo"
    DDPO = "ddpo"
    MMDPO = "mmdpo"

    @property
    def needs_reference(self) -> bool:
        """Scores are log-ratios against a frozen reference model (all but SimPO)."""
        return self is not LossType.SIMPO

    @property
    def needs_segments(self) -> bool:
        """Needs per-token ``changed`` masks (from spans or :func:`~mmalign.data.align.align_tokens`)."""
        return self is LossType.DDPO

    @property
    def needs_reward_margin(self) -> bool:
        """Needs a per-pair reward margin δ, turned into a per-pair β by :func:`dynamic_beta`."""
        return self is LossType.MMDPO

    @property
    def length_normalised(self) -> bool:
        """Sequence score is a (weighted) mean of token log-probs instead of their sum."""
        return self in (LossType.SIMPO, LossType.DDPO)


def _check_shape(t: Tensor, field: str, dim: int, like: Tensor | None = None) -> None:
    """Raise DataError naming ``field`` unless ``t`` has ``dim`` dims (and the shape of ``like``)."""
    if t.dim() != dim or (like is not None and t.shape != like.shape):
        want = tuple(like.shape) if like is not None else f"{dim} dims"
        raise DataError(f"shape {tuple(t.shape)}, expected {want}", field=field)


class ScoreKwargs(TypedDict):
    """Keyword arguments of :func:`sequence_scores` that depend on the loss type."""

    gamma: float
    normalise: bool


def score_kwargs(loss_type: LossType | str, gamma: float = 1.0) -> ScoreKwargs:
    """The :func:`sequence_scores` kwargs for ``loss_type``; ``gamma`` only matters for DDPO."""
    lt = LossType(loss_type)
    return ScoreKwargs(gamma=gamma if lt.needs_segments else 1.0, normalise=lt.length_normalised)


def sequence_scores(
    token_logps: Tensor,  # (B, T) log-prob of each target token
    mask: Tensor,  # (B, T) bool, True on response tokens
    changed: Tensor | None = None,  # (B, T) bool, True on changed tokens (DDPO)
    gamma: float = 1.0,
    normalise: bool = False,
) -> Tensor:  # (B,)
    """One score per sequence from its response-token log-probs.

    Each response token gets the weight γ if it is ``changed`` and 1 otherwise (1 everywhere when
    ``changed`` is None). The score is ``Σ w·logp``, or with ``normalise`` the weighted mean
    ``Σ w·logp / Σ w`` — i.e. the RLHF-V score ``(Σ_U logp + γ Σ_C logp) / (|U| + γ|C|)``.
    Positions outside ``mask`` are ignored even if they hold inf/nan.
    """
    _check_shape(token_logps, "token_logps", 2)
    _check_shape(mask, "mask", 2, like=token_logps)
    if gamma <= 0:
        raise ConfigError(f"sequence_scores: gamma: must be > 0, got {gamma}")
    mask = mask.bool()
    weights = mask.to(token_logps.dtype)  # (B, T)
    if changed is not None:
        _check_shape(changed, "changed", 2, like=mask)
        weights = weights * torch.where(changed.bool(), gamma, 1.0).to(token_logps.dtype)
    total = (torch.where(mask, token_logps, 0.0) * weights).sum(dim=-1)  # (B,)
    if not normalise:
        return total
    counts = weights.sum(dim=-1)  # (B,)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise DataError(f"rows {rows} have no response tokens, cannot take a mean", field="mask")
    return total / counts


def dynamic_beta(margin: Tensor, beta0: float = 0.1, w: float = 0.5, k: float = 0.5) -> Tensor:
    """MM-DPO per-pair β (B,) from reward margins δ (B,): ``β0 (1 + w (1 − exp(−k δ)))``, δ clamped ≥ 0.

    Confident pairs (large δ) get up to ``β0 (1 + w)``; pairs with δ ≤ 0 keep ``β0``.
    """
    delta = margin.detach()  # (B,)
    delta = (delta if delta.is_floating_point() else delta.float()).clamp(min=0.0)
    return beta0 * (1.0 + w * (1.0 - torch.exp(-k * delta)))


@dataclass(frozen=True)
class _Options:
    label_smoothing: float
    simpo_gamma: float


# Per-pair loss of h = Δ_w − Δ_l (B,) with β (B,) → (B,). Δ is the log-ratio against the reference,
# or the policy score itself for reference-free types.
_PairLoss = Callable[[Tensor, Tensor, _Options], Tensor]


def _sigmoid_loss(h: Tensor, beta: Tensor, opt: _Options) -> Tensor:
    return -F.logsigmoid(beta * h)


def _ipo_loss(h: Tensor, beta: Tensor, opt: _Options) -> Tensor:
    return (h - 1.0 / (2.0 * beta)) ** 2


def _cdpo_loss(h: Tensor, beta: Tensor, opt: _Options) -> Tensor:
    eps = opt.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _simpo_loss(h: Tensor, beta: Tensor, opt: _Options) -> Tensor:
    return -F.logsigmoid(beta * h - opt.simpo_gamma)


_PAIR_LOSSES: dict[LossType, _PairLoss] = {
    LossType.DPO: _sigmoid_loss,
    LossType.IPO: _ipo_loss,
    LossType.CDPO: _cdpo_loss,
    LossType.SIMPO: _simpo_loss,
    LossType.DDPO: _sigmoid_loss,  # DPO on the weighted-mean scores
    LossType.MMDPO: _sigmoid_loss,  # DPO with a per-pair β
}


def _beta_tensor(loss_type: LossType, beta: float | Tensor, like: Tensor) -> Tensor:  # (B,)
    if loss_type.needs_reward_margin and not (isinstance(beta, Tensor) and beta.shape == like.shape):
        raise ConfigError(
            f"preference_loss: beta: {loss_type} needs a per-pair beta tensor of shape {tuple(like.shape)} "
            "(use dynamic_beta(margins)); for a constant beta use loss_type dpo"
        )
    b = torch.as_tensor(beta, dtype=like.dtype, device=like.device).detach()
    if b.dim() == 0:
        b = b.expand_as(like)
    _check_shape(b, "beta", 1, like=like)
    if bool((b <= 0).any()):
        raise ConfigError(f"preference_loss: beta: must be > 0, got {b.min().item()}")
    return b


def preference_loss(
    loss_type: LossType | str,
    policy_chosen: Tensor,  # (B,) policy sequence scores of y_w
    policy_rejected: Tensor,  # (B,) policy sequence scores of y_l
    ref_chosen: Tensor | None = None,  # (B,) reference scores (same kind), None for SimPO
    ref_rejected: Tensor | None = None,  # (B,)
    *,
    beta: float | Tensor = 0.1,  # scalar or (B,); MMDPO requires a (B,) tensor
    label_smoothing: float = 0.0,  # cDPO ε (only valid for cdpo)
    simpo_gamma: float = 0.5,  # SimPO target margin γ
) -> tuple[Tensor, dict[str, float]]:
    """Mean loss over the batch and its metrics.

    Inputs are per-sequence scores already reduced with :func:`sequence_scores` (use
    :func:`score_kwargs`). For reference-based types Δ = policy − reference (reference detached);
    for SimPO the reference inputs are ignored and Δ = policy score. Metrics: ``loss``,
    ``reward_margin`` (mean β(Δ_w − Δ_l)), ``accuracy`` (share with Δ_w > Δ_l), ``chosen_reward``,
    ``rejected_reward`` (means of βΔ) and, for MMDPO, ``beta`` (mean per-pair β).
    """
    lt = LossType(loss_type)
    _check_shape(policy_chosen, "policy_chosen", 1)
    _check_shape(policy_rejected, "policy_rejected", 1, like=policy_chosen)
    if lt is not LossType.CDPO and label_smoothing != 0.0:
        raise ConfigError(f"preference_loss: label_smoothing: only for cdpo, got {label_smoothing} ({lt})")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ConfigError(f"preference_loss: label_smoothing: must be in [0, 0.5], got {label_smoothing}")
    chosen, rejected = policy_chosen, policy_rejected  # (B,)
    if lt.needs_reference:
        if ref_chosen is None or ref_rejected is None:
            raise ConfigError(f"preference_loss: {lt} needs reference scores (ref_chosen, ref_rejected)")
        _check_shape(ref_chosen, "ref_chosen", 1, like=policy_chosen)
        _check_shape(ref_rejected, "ref_rejected", 1, like=policy_chosen)
        chosen = policy_chosen - ref_chosen.detach()
        rejected = policy_rejected - ref_rejected.detach()
    b = _beta_tensor(lt, beta, chosen)  # (B,)
    losses = _PAIR_LOSSES[lt](chosen - rejected, b, _Options(label_smoothing, simpo_gamma))  # (B,)
    loss = losses.mean()
    with torch.no_grad():
        chosen_reward, rejected_reward = b * chosen, b * rejected  # (B,)
        metrics = {
            "loss": loss.item(),
            "reward_margin": (chosen_reward - rejected_reward).mean().item(),
            "accuracy": (chosen > rejected).float().mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "rejected_reward": rejected_reward.mean().item(),
        }
        if lt.needs_reward_margin:
            metrics["beta"] = b.mean().item()
    return loss, metrics


def sft_nll(token_logps: Tensor, mask: Tensor) -> Tensor:  # (B, T), (B, T) -> scalar
    """Mean negative log-likelihood over all response tokens of the batch (RPO-style term on y_w).

    The caller applies the weight α: ``loss = preference_loss(...)[0] + α · sft_nll(...)``.
    """
    _check_shape(mask, "mask", 2, like=token_logps)
    mask = mask.bool()
    n = int(mask.sum().item())
    if n == 0:
        raise DataError("no response tokens in the batch", field="mask")
    return -torch.where(mask, token_logps, 0.0).sum() / n


__all__ = [
    "LossType",
    "ScoreKwargs",
    "dynamic_beta",
    "preference_loss",
    "score_kwargs",
    "sequence_scores",
    "sft_nll",
]
