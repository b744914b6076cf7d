"""Per-aspect quality of a multi-aspect reward model: exact MSE and Spearman values, and no NaN when an
aspect is constant on the held-out responses."""

from __future__ import annotations

import json
import math

import pytest

from mmalign.eval.rm_eval import aspect_quality


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
