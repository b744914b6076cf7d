"""Reward-model evaluation on held-out preference pairs: accuracy, Acc+, calibration, per-aspect MSE and
Spearman, and (critique RMs) whether the generated critique names the hallucinated object.

- **Acc**: share of pairs where r(chosen) > r(rejected).
- **Acc+** (MM-RLHF): share of *prompts* all of whose pairs are right; pairs are grouped by
  ``pair.meta["group"]`` (else the prompt text + image digest).
- **Calibration**: P(chosen ≻ rejected) = σ(r_c − r_r), binned; per bin the mean predicted probability and
  the empirical accuracy; ECE = Σ_bins (n_bin / n) · |accuracy − confidence|.
- **Per-aspect** (multi-aspect RMs): MSE and Spearman ρ between predicted and annotated aspect scores over
  both responses of every pair that carries ``scores``.
- **Critique naming** (critique RMs, shapes world): among rejected responses with an invented object
  (judged against ``meta["scene"]``), the share whose generated critique names that object's shape.

``evaluate_rm`` scores through the :class:`~mmalign.rollout.rewards.Reward` protocol, so a critique RM
writes its critique first, exactly as at PPO time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mmalign.data.schema import PreferencePair
from mmalign.eval.bench import Result
from mmalign.rollout.rewards import ModelReward, RewardBatch
from mmalign.world.oracle import judge_exact
from mmalign.world.scene import Scene


def pair_accuracy(
    chosen: Sequence[float], rejected: Sequence[float], groups: Sequence[str]
) -> dict[str, float]:
    """``accuracy``, ``acc_plus`` (all pairs of a group right), ``n_pairs``, ``n_groups``."""
    if not (len(chosen) == len(rejected) == len(groups)) or not chosen:
        raise ValueError("pair_accuracy: chosen, rejected and groups need the same non-zero length")
    right = [c > r for c, r in zip(chosen, rejected, strict=True)]
    by_group: dict[str, bool] = {}
    for g, ok in zip(groups, right, strict=True):
        by_group[g] = by_group.get(g, True) and ok
    return {
        "accuracy": sum(right) / len(right),
        "acc_plus": sum(by_group.values()) / len(by_group),
        "n_pairs": float(len(right)),
        "n_groups": float(len(by_group)),
    }


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (Pearson correlation of tie-averaged ranks); NaN when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman: need two sequences of equal length >= 2")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def aspect_quality(aspect: str, pred: Sequence[float], gold: Sequence[float]) -> dict[str, float]:
    """``<aspect>.mse`` and ``<aspect>.spearman`` of predicted vs annotated scores (none with fewer than 2
    scores). Spearman's ρ is left out when it is undefined (the annotated or the predicted scores are all
    equal, e.g. an aspect every held-out response satisfies): a NaN would be no number to compare and is
    not valid JSON."""
    if len(gold) < 2:
        return {}
    out = {f"{aspect}.mse": sum((a - b) ** 2 for a, b in zip(pred, gold, strict=True)) / len(gold)}
    rho = spearman(pred, gold)
    if not math.isnan(rho):
        out[f"{aspect}.spearman"] = rho
    return out


def aspect_pair_accuracy(
    aspect: str, pred: Sequence[tuple[float, float]], gold: Sequence[tuple[float, float]]
) -> dict[str, float]:
    """``<aspect>.pair_accuracy``: over the pairs whose two responses have *different* annotated scores,
    the share whose predicted scores order them the same way (a predicted tie counts as wrong), and
    ``<aspect>.pairs``, how many such pairs there were; nothing when there are none.

    Unlike Spearman's ρ over all responses it is not capped by ties in the annotations: when most
    responses share one score (e.g. full coverage), ρ stays far below 1 even for a model that orders every
    differing pair correctly, because it never predicts exact ties."""
    differing = [(p, g) for p, g in zip(pred, gold, strict=True) if g[0] != g[1]]
    if not differing:
        return {}
    right = sum((p[0] - p[1]) * (g[0] - g[1]) > 0 for p, g in differing)
    return {f"{aspect}.pair_accuracy": right / len(differing), f"{aspect}.pairs": float(len(differing))}


def calibration(
    chosen: Sequence[float], rejected: Sequence[float], n_bins: int = 5
) -> tuple[list[dict[str, float]], float]:
    """Bins of the predicted P(chosen ≻ rejected) over both orders of every pair, and the ECE.

    Each pair contributes (p, 1) and (1 − p, 0), so a constant predictor of 0.5 is perfectly calibrated.
    Returns ``[{"lo", "hi", "n", "confidence", "accuracy"}]`` for non-empty bins and the ECE.
    """
    probs = torch.sigmoid(
        torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
    )
    points = [(float(p), 1.0) for p in probs] + [(1.0 - float(p), 0.0) for p in probs]
    bins: list[dict[str, float]] = []
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [(p, y) for p, y in points if lo <= p < hi or (b == n_bins - 1 and p == 1.0)]
        if not inside:
            continue
        conf = sum(p for p, _ in inside) / len(inside)
        acc = sum(y for _, y in inside) / len(inside)
        bins.append({"lo": lo, "hi": hi, "n": float(len(inside)), "confidence": conf, "accuracy": acc})
        ece += len(inside) / len(points) * abs(acc - conf)
    return bins, ece


def invented_shapes(scene: Scene, text: str) -> set[str]:
    """Shapes ``text`` mentions that are not in ``scene`` (object hallucinations, exact judge)."""
    return {m.mention.shape for m in judge_exact(scene, text).mentions if m.status == "hallucination"}


def critique_names_error(critique: str, shapes: set[str]) -> bool:
    """Does the critique name one of the invented ``shapes`` (as a word, singular or plural)?"""
    words = set(critique.lower().replace(".", " ").replace(",", " ").split())
    return any(s in words or f"{s}s" in words or f"{s}es" in words for s in shapes)


def group_of(pair: PreferencePair) -> str:
    """The Acc+ group of a pair: ``meta["group"]``, else its prompt text and image references."""
    if "group" in pair.meta:
        return str(pair.meta["group"])
    images = [ref.path or str(hash(ref.png)) for ref in pair.images]
    return "|".join([*(m.text for m in pair.prompt), *images])


def evaluate_rm(
    reward: ModelReward,
    pairs: Sequence[PreferencePair],
    *,
    base_dir: Any = None,
    n_bins: int = 5,
) -> Result:
    """Score both sides of every pair with ``reward`` and compute the metrics of the module docstring."""
    images = [[ref.load(base_dir) for ref in p.images] for p in pairs]
    truths = [
        {"facts": p.facts or [], **({"scene": p.meta["scene"]} if "scene" in p.meta else {})} for p in pairs
    ]
    sides = {}
    for side in ("chosen", "rejected"):
        batch = RewardBatch(
            prompts=[list(p.prompt) for p in pairs],
            responses=[getattr(p, side) for p in pairs],
            images=images,
            truths=truths,
        )
        sides[side] = reward.score(batch)
    rc, rr = sides["chosen"].scores.tolist(), sides["rejected"].scores.tolist()
    metrics = pair_accuracy(rc, rr, [group_of(p) for p in pairs])
    bins, ece = calibration(rc, rr, n_bins)
    metrics.update({"ece": ece, "mean_margin": sum(c - r for c, r in zip(rc, rr, strict=True)) / len(rc)})

    # per-aspect regression quality, over both responses of pairs with annotated scores
    for aspect in reward.model.aspects or ():
        pred, gold = [], []
        pair_pred: list[tuple[float, float]] = []
        pair_gold: list[tuple[float, float]] = []
        for i, p in enumerate(pairs):
            both = []
            for side in ("chosen", "rejected"):
                value = (p.scores or {}).get(side, {}).get(aspect)  # type: ignore[call-overload]
                if value is not None:
                    pred.append(float(sides[side].aspects[aspect][i]))
                    gold.append(float(value))
                    both.append((pred[-1], gold[-1]))
            if len(both) == 2:
                pair_pred.append((both[0][0], both[1][0]))
                pair_gold.append((both[0][1], both[1][1]))
        metrics.update(aspect_quality(aspect, pred, gold))
        metrics.update(aspect_pair_accuracy(aspect, pair_pred, pair_gold))

    # critique RMs: does the critique of a hallucinated response name the invented object?
    records: list[dict[str, Any]] = []
    named: list[bool] = []
    for i, p in enumerate(pairs):
        rec: dict[str, Any] = {"id": p.id, "chosen_reward": rc[i], "rejected_reward": rr[i]}
        for side in ("chosen", "rejected"):
            info = sides[side].info
            if info:
                rec[f"{side}_critique"] = info[i].get("critique", "")
        if "rejected_critique" in rec and "scene" in p.meta:
            shapes = invented_shapes(Scene.from_dict(p.meta["scene"]), p.rejected)
            if shapes:
                rec["invented"] = sorted(shapes)
                rec["critique_names_error"] = critique_names_error(rec["rejected_critique"], shapes)
                named.append(rec["critique_names_error"])
        records.append(rec)
    if named:
        metrics["critique_names_error"] = sum(named) / len(named)
        metrics["n_hallucinated"] = float(len(named))
    return Result(
        benchmark="rm",
        metrics=metrics,
        records=records,
        settings={"kind": reward.kind, "calibration": bins, "n_bins": n_bins},
    )
