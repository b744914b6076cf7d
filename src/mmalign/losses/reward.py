"""Pure loss functions for training reward models: Bradley–Terry, pairwise preference, multi-aspect
regression and critique-based RMs.

A recipe picks a :class:`RewardLossType`, reads its capability properties to know which inputs to
build (pairs, aspects, critiques, head size) and calls the function from :data:`REWARD_LOSSES`::

    loss, metrics = REWARD_LOSSES[RewardLossType.BT](r_chosen, r_rejected, margin=None, centering=0.01)

Every loss returns ``(loss, metrics)``; metrics are Python floats except where a vector is the point
(``per_aspect_mse``). Ranked lists become training pairs with :func:`pairs_from_ranking`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmalign.errors import ConfigError, DataError
from mmalign.losses.dpo import StrEnum, _check_shape, sft_nll

Metrics = dict[str, float | Tensor]


class RewardLossType(StrEnum):
    """Reward-model training objective, with the capabilities a recipe needs to know about."""

    BT = "bt"
    PAIRWISE = "pairwise"
    REGRESSION = "regression"
    CRITIQUE = "critique"

    @property
    def needs_pairs(self) -> bool:
        """Trains on (chosen, rejected) pairs rather than on absolute per-response targets."""
        return self is not RewardLossType.REGRESSION

    @property
    def needs_aspects(self) -> bool:
        """Needs per-aspect targets (B, K) and a presence mask (B, K)."""
        return self is RewardLossType.REGRESSION

    @property
    def needs_critique(self) -> bool:
        """Needs critique tokens: the RM generates a critique before scoring (MM-RLHF)."""
        return self is RewardLossType.CRITIQUE

    @property
    def reads_both_responses(self) -> bool:
        """The model reads (x, y_A, y_B) together and predicts P(A≻B) instead of scoring one response."""
        return self is RewardLossType.PAIRWISE

    @property
    def head_dim_from_aspects(self) -> bool:
        """The value head has K outputs (one per aspect) instead of one scalar."""
        return self is RewardLossType.REGRESSION


def _check_pair(r_chosen: Tensor, r_rejected: Tensor) -> None:
    _check_shape(r_chosen, "r_chosen", 1)
    _check_shape(r_rejected, "r_rejected", 1, like=r_chosen)


def bradley_terry_loss(
    r_chosen: Tensor,  # (B,) reward of y_w
    r_rejected: Tensor,  # (B,) reward of y_l
    margin: Tensor | None = None,  # (B,) required reward gap per pair (Llama-2 style), None = 0
    centering: float = 0.0,  # c of the centering term c·(r_w + r_l)² [0.01 when used]
    soft_scale: float = 0.0,  # s > 0: soft labels σ(s·m) from the score margins instead of a required gap
) -> tuple[Tensor, Metrics]:
    """Bradley–Terry reward-model loss, the mean over pairs of

    ``−log σ(r_w − r_l − m) + c·(r_w + r_l)²``

    computed with ``logsigmoid`` so that large gaps neither overflow nor lose the gradient. The
    centering term keeps rewards near zero (the BT loss only sees differences).

    ``soft_scale`` s > 0 uses the margins as *graded* labels instead (BT with probabilistic labels): with
    p = σ(s·m) the loss is the cross-entropy ``−p·log σ(Δ) − (1 − p)·log σ(−Δ)``, minimised at Δ = s·m, so
    the reward gap of every pair is pulled towards s times its score margin (a close trade-off gets a small
    gap instead of an unbounded one; r → s·score). Needs ``margin``.

    Metrics: ``loss``, ``accuracy`` (share with r_w > r_l, strictly), ``reward_margin`` (mean r_w − r_l,
    without m), ``chosen_reward``, ``rejected_reward`` (means).
    """
    _check_pair(r_chosen, r_rejected)
    if centering < 0:
        raise ConfigError(f"bradley_terry_loss: centering: must be >= 0, got {centering}")
    if soft_scale < 0 or (soft_scale and margin is None):
        raise ConfigError(f"bradley_terry_loss: soft_scale: must be >= 0 and needs margin, got {soft_scale}")
    diff = r_chosen - r_rejected  # (B,)
    logits = diff
    if margin is not None:
        _check_shape(margin, "margin", 1, like=r_chosen)
        if not soft_scale:
            logits = diff - margin.detach().to(diff.dtype)
    if soft_scale:
        assert margin is not None
        target = torch.sigmoid(soft_scale * margin.detach().to(diff.dtype))  # (B,)
        losses = F.binary_cross_entropy_with_logits(diff, target, reduction="none")  # (B,)
    else:
        losses = -F.logsigmoid(logits)  # (B,)
    if centering:
        losses = losses + centering * (r_chosen + r_rejected) ** 2
    loss = losses.mean()
    with torch.no_grad():
        metrics: Metrics = {
            "loss": loss.item(),
            "accuracy": (diff > 0).float().mean().item(),
            "reward_margin": diff.mean().item(),
            "chosen_reward": r_chosen.mean().item(),
            "rejected_reward": r_rejected.mean().item(),
        }
    return loss, metrics


def symmetric_preference_prob(logit_ab: Tensor, logit_ba: Tensor) -> Tensor:  # (B,), (B,) -> (B,)
    """P(A≻B) averaged over both presentation orders: ``½(σ(logit_ab) + 1 − σ(logit_ba))``.

    ``logit_ab`` is the model's logit of "first ≻ second" reading (x, A, B), ``logit_ba`` reading
    (x, B, A). Averaging removes a constant position bias of the pairwise model.
    """
    _check_shape(logit_ab, "logit_ab", 1)
    _check_shape(logit_ba, "logit_ba", 1, like=logit_ab)
    return 0.5 * (torch.sigmoid(logit_ab) + torch.sigmoid(-logit_ba))  # 1 − σ(z) = σ(−z)


def pairwise_preference_loss(
    logit_ab: Tensor,  # (B,) logit of P(A≻B) from the model reading (x, A, B)
    logit_ba: Tensor,  # (B,) logit of P(B≻A) from the model reading (x, B, A)
    label: Tensor,  # (B,) 1 if A is preferred, 0 if B is
) -> tuple[Tensor, Metrics]:
    """Pairwise preference model (RLHF Workflow) trained on both presentation orders:

    ``L = ½ [BCE(logit_ab, label) + BCE(logit_ba, 1 − label)]``, each BCE a mean over the batch.

    Metrics: ``loss``, ``accuracy`` (the symmetric probability of :func:`symmetric_preference_prob`
    is on the side of the label, > ½ for label 1 and < ½ for label 0), ``position_consistency``
    (share of pairs whose two orders name the same winner), ``prob_a`` (mean symmetric P(A≻B)).
    """
    prob_a = symmetric_preference_prob(logit_ab, logit_ba)  # (B,) also checks the logit shapes
    _check_shape(label, "label", 1, like=logit_ab)
    y = label.detach().to(logit_ab.dtype)  # (B,)
    if not bool(((y == 0) | (y == 1)).all()):
        raise DataError(
            f"labels must be 0 (B preferred) or 1 (A preferred), got {label.tolist()}", field="label"
        )
    loss_ab = F.binary_cross_entropy_with_logits(logit_ab, y)
    loss_ba = F.binary_cross_entropy_with_logits(logit_ba, 1.0 - y)
    loss = 0.5 * (loss_ab + loss_ba)
    with torch.no_grad():
        a_wins = y == 1  # (B,)
        metrics: Metrics = {
            "loss": loss.item(),
            "accuracy": torch.where(a_wins, prob_a > 0.5, prob_a < 0.5).float().mean().item(),
            "position_consistency": ((logit_ab > 0) == (logit_ba < 0)).float().mean().item(),
            "prob_a": prob_a.mean().item(),
        }
    return loss, metrics


def aspect_regression_loss(
    pred: Tensor,  # (B, K) predicted per-aspect scores
    target: Tensor,  # (B, K) annotated scores; entries outside ``mask`` are ignored (may be nan)
    mask: Tensor,  # (B, K) bool, True where the aspect is annotated
) -> tuple[Tensor, Metrics]:
    """Multi-aspect regression RM (SteerLM / HelpSteer / DPA): masked mean squared error

    ``L = Σ_{b,k} mask·(pred − target)² / Σ mask``

    over the annotated entries only. A batch without any annotated entry gives a loss of 0 that is
    still attached to ``pred`` (zero gradient), never nan. Metrics: ``loss``, ``n_present`` (number of
    annotated entries), ``per_aspect_mse`` (K,) (mean over the annotated entries of each aspect, nan
    for an aspect without any) and ``per_aspect_count`` (K,).
    """
    _check_shape(pred, "pred", 2)
    _check_shape(target, "target", 2, like=pred)
    _check_shape(mask, "mask", 2, like=pred)
    present = mask.bool()  # (B, K)
    # Zero both sides outside the mask first: a nan target there must not reach the value or the grad.
    err = torch.where(present, pred, 0.0) - torch.where(present, target.to(pred.dtype), 0.0)  # (B, K)
    sq = err**2  # (B, K), 0 outside the mask
    n = int(present.sum().item())
    loss = sq.sum() / max(n, 1)
    with torch.no_grad():
        counts = present.sum(dim=0)  # (K,)
        per_aspect = sq.detach().sum(dim=0) / counts.to(pred.dtype)  # (K,) nan where the count is 0
        metrics: Metrics = {
            "loss": loss.item(),
            "n_present": float(n),
            "per_aspect_mse": per_aspect,
            "per_aspect_count": counts,
        }
    return loss, metrics


def critique_reward_loss(
    critique_token_logps: Tensor,  # (B, T) log-prob of each critique token under the RM
    critique_mask: Tensor,  # (B, T) bool, True on critique tokens
    r_chosen: Tensor,  # (B,) scalar-head reward of y_w given (x, y_w, c_w)
    r_rejected: Tensor,  # (B,) reward of y_l given (x, y_l, c_l)
    tie: Tensor,  # (B,) bool, True where the pair is annotated as a tie
    nll_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """Critique-based RM (MM-RLHF): critique language-modelling plus a pairwise reward loss,

    ``L = w·NLL(c) + mean_b ℓ_b``, with ``ℓ_b = −log σ(r_w − r_l)`` for a non-tied pair and
    ``ℓ_b = (r_w − r_l)²`` for a tie (pulls the two rewards together);

    NLL(c) is the mean over all critique tokens of the batch (:func:`~mmalign.losses.dpo.sft_nll`),
    the pair term the mean over all B pairs (so each part weighs by its share of pairs). Metrics:
    ``loss``, ``nll``, ``pair_loss`` (mean ℓ), ``bt_loss`` (mean over non-tied pairs, 0 if none),
    ``tie_loss`` (mean over ties, 0 if none), ``accuracy`` (r_w > r_l over non-tied pairs, 0 if none),
    ``tie_fraction``.
    """
    _check_shape(critique_token_logps, "critique_token_logps", 2)
    _check_pair(r_chosen, r_rejected)
    _check_shape(tie, "tie", 1, like=r_chosen)
    if nll_weight < 0:
        raise ConfigError(f"critique_reward_loss: nll_weight: must be >= 0, got {nll_weight}")
    nll = sft_nll(critique_token_logps, critique_mask)  # checks the mask shape and that it is not empty
    is_tie = tie.bool()  # (B,)
    diff = r_chosen - r_rejected  # (B,)
    pair_losses = torch.where(is_tie, diff**2, -F.logsigmoid(diff))  # (B,)
    pair_loss = pair_losses.mean()
    loss = nll_weight * nll + pair_loss
    with torch.no_grad():
        n_tie = int(is_tie.sum().item())
        n_strict = is_tie.numel() - n_tie
        strict = ~is_tie
        metrics: Metrics = {
            "loss": loss.item(),
            "nll": nll.item(),
            "pair_loss": pair_loss.item(),
            "bt_loss": (pair_losses[strict].sum() / max(n_strict, 1)).item(),
            "tie_loss": (pair_losses[is_tie].sum() / max(n_tie, 1)).item(),
            "accuracy": ((diff > 0) & strict).sum().item() / max(n_strict, 1),
            "tie_fraction": n_tie / max(is_tie.numel(), 1),
        }
    return loss, metrics


REWARD_LOSSES: dict[RewardLossType, Callable[..., tuple[Tensor, Metrics]]] = {
    RewardLossType.BT: bradley_terry_loss,
    RewardLossType.PAIRWISE: pairwise_preference_loss,
    RewardLossType.REGRESSION: aspect_regression_loss,
    RewardLossType.CRITIQUE: critique_reward_loss,
}
"""The loss function of each :class:`RewardLossType` (their inputs differ; see the capabilities)."""


def reward_loss_fn(loss_type: RewardLossType | str) -> Callable[..., tuple[Tensor, Metrics]]:
    """The loss function of ``loss_type`` (a member or its string value)."""
    try:
        lt = RewardLossType(loss_type)
    except ValueError:
        choices = ", ".join(m.value for m in RewardLossType)
        raise ConfigError(f"reward loss type: unknown {loss_type!r}, expected one of {choices}") from None
    return REWARD_LOSSES[lt]


def pairs_from_ranking(scores: Sequence[float]) -> list[tuple[int, int, float]]:
    """All ``(better, worse, margin)`` index pairs of a scored list (higher score = better).

    One pair per unordered pair of positions ``i < j`` with different scores, in that index order;
    ``margin = score[better] − score[worse] > 0``. Tied scores give no pair. n responses with distinct
    scores give n(n−1)/2 pairs.
    """
    values = [float(s) for s in scores]
    bad = [i for i, s in enumerate(values) if not math.isfinite(s)]
    if bad:
        raise DataError(
            f"scores at positions {bad} are not finite: {[values[i] for i in bad]}", field="scores"
        )
    pairs: list[tuple[int, int, float]] = []
    for i, si in enumerate(values):
        for j in range(i + 1, len(values)):
            sj = values[j]
            if si > sj:
                pairs.append((i, j, si - sj))
            elif sj > si:
                pairs.append((j, i, sj - si))
    return pairs


__all__ = [
    "REWARD_LOSSES",
    "Metrics",
    "RewardLossType",
    "aspect_regression_loss",
    "bradley_terry_loss",
    "critique_reward_loss",
    "pairs_from_ranking",
    "pairwise_preference_loss",
    "reward_loss_fn",
    "symmetric_preference_prob",
]
