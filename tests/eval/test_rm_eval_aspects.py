"""Per-aspect quality of a multi-aspect reward model: exact MSE and Spearman values, and no NaN when an
aspect is constant on the held-out responses."""

from __future__ import annotations

import json
import math

import pytest

from mmalign.eval.rm_eval import aspect_pair_accuracy, aspect_quality


def test_aspect_quality_gives_mse_and_spearman() -> None:
    out = aspect_quality("coverage", [0.1, 0.4, 0.35, 0.8], [0.0, 0.5, 0.25, 1.0])
    # squared errors 0.01, 0.01, 0.01, 0.04 → mean 0.0175; ranks agree exactly → ρ = 1
    assert out == pytest.approx({"coverage.mse": 0.0175, "coverage.spearman": 1.0})


def test_a_constant_aspect_has_an_mse_but_no_spearman_and_stays_valid_json() -> None:
    out = aspect_quality("instruction_following", [0.9, 1.1, 1.0], [1.0, 1.0, 1.0])
    assert set(out) == {"instruction_following.mse"}
    assert out["instruction_following.mse"] == pytest.approx((0.01 + 0.01 + 0.0) / 3)
    json.loads(json.dumps(out, allow_nan=False))  # raises on NaN
    assert aspect_quality("x", [1.0], [1.0]) == {} and not any(math.isnan(v) for v in out.values())


def test_aspect_pair_accuracy_counts_only_pairs_with_different_gold_scores() -> None:
    pred = [(0.9, 0.1), (0.2, 0.8), (0.5, 0.5), (0.3, 0.7), (0.4, 0.6)]
    gold = [(1.0, 0.5), (1.0, 0.5), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    # differing gold: pairs 0, 1, 2, 4 → right, wrong, predicted tie (wrong), right
    want = {"coverage.pair_accuracy": 0.5, "coverage.pairs": 4.0}
    assert aspect_pair_accuracy("coverage", pred, gold) == want
    assert aspect_pair_accuracy("coverage", [(0.1, 0.2)], [(1.0, 1.0)]) == {}


def test_ties_cap_spearman_but_not_pair_accuracy() -> None:
    """Most responses at the top score: a model that orders every differing pair right still gets ρ < 1."""
    gold = [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0]
    pred = [4.1, 4.0, 3.9, 4.05, 3.95, 4.02, 3.0, 2.0]
    assert aspect_quality("coverage", pred, gold)["coverage.spearman"] < 0.8
    pairs_pred = [(pred[i], pred[6]) for i in range(6)] + [(pred[6], pred[7])]
    pairs_gold = [(gold[i], gold[6]) for i in range(6)] + [(gold[6], gold[7])]
    assert aspect_pair_accuracy("coverage", pairs_pred, pairs_gold)["coverage.pair_accuracy"] == 1.0
