"""Exact hallucination / QA metrics on hand-made scenes, responses and confusion matrices."""

from __future__ import annotations

import pytest

from mmalign.errors import DataError
from mmalign.eval.metrics import (
    accuracy_by_kind,
    chair,
    deceptive_accuracy,
    pope_metrics,
    well_formedness,
    yes_no,
)
from mmalign.world.oracle import Oracle
from mmalign.world.scene import Scene, SceneObject

THREE = Scene(
    objects=(
        SceneObject("circle", "red", "large", "top left"),
        SceneObject("square", "blue", "small", "top right"),
        SceneObject("circle", "green", "small", "bottom left"),
    ),
    background="white",
)
ONE = Scene(objects=(SceneObject("square", "blue", "small", "top right"),), background="gray")
# 3 mentions: correct, hallucinated star, square with a wrong colour; covers 2 of 3 objects
HALLUCINATING = (
    "There is a large red circle in the top left. There is a yellow star. "
    "There is a small orange square in the top right."
)
# 2 mentions of the one square (the second a repeat): no error, covers 1 of 1
REPEATING = "There is a blue square. There is a blue square in the top right."


def test_chair_counts_mentions_responses_coverage_and_attribute_errors_exactly() -> None:
    result = chair([THREE, ONE], [HALLUCINATING, REPEATING])
    assert result == {
        "chair_i": 1 / 5,
        "chair_s": 1 / 2,
        "coverage": 3 / 4,
        "attribute_error": 1 / 5,
        "well_formed": 1.0,
        "n_mentions": 5.0,
        "n_responses": 2.0,
    }


def test_chair_counts_a_surplus_object_of_a_present_shape_as_hallucinated() -> None:
    result = chair([ONE], ["There is a blue square. There is a red square."])
    assert (result["chair_i"], result["chair_s"], result["coverage"]) == (0.5, 1.0, 1.0)


def test_collapsed_responses_have_zero_chair_but_zero_coverage_and_well_formedness() -> None:
    result = chair([THREE, ONE], ["in in in in", ""])
    assert (result["chair_i"], result["chair_s"], result["coverage"], result["well_formed"]) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert result["n_mentions"] == 0.0


def test_chair_uses_the_given_oracle_so_missed_errors_lower_it() -> None:
    result = chair([THREE], [HALLUCINATING], oracle=Oracle(missed_error_rate=1.0))
    assert (result["chair_i"], result["attribute_error"]) == (0.0, 0.0)


def test_chair_rejects_mismatched_lengths() -> None:
    with pytest.raises(DataError, match="texts: lengths differ: 2 vs 1"):
        chair([THREE, ONE], [REPEATING])


def test_pope_metrics_on_a_hand_confusion_matrix() -> None:
    labels = ["yes"] * 4 + ["no"] * 4
    answers = [
        "Yes.", "yes, there is a red circle.", "No", "maybe",  # TP, TP, FN, FN (unknown)
        "No.", "There is no star in the image.", "Yes", "no",  # TN, TN, FP, TN
    ]  # fmt: skip
    result = pope_metrics(labels, answers)
    assert result == pytest.approx(
        {
            "accuracy": 5 / 8,
            "precision": 2 / 3,
            "recall": 2 / 4,
            "f1": 4 / 7,
            "yes_ratio": 3 / 8,
            "unknown_ratio": 1 / 8,
            "n": 8.0,
        }
    )


def test_pope_metrics_with_no_predicted_yes_has_zero_precision_not_a_crash() -> None:
    result = pope_metrics(["yes", "no"], ["no", "no"])
    assert (result["accuracy"], result["precision"], result["recall"], result["f1"]) == (0.5, 0.0, 0.0, 0.0)
    with pytest.raises(DataError, match=r"labels\[1\]: label must be yes or no"):
        pope_metrics(["yes", "perhaps"], ["yes", "no"])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Yes.", "yes"),
        ("  YES", "yes"),
        ("yes, there is a red circle.", "yes"),
        ("No", "no"),
        ("no, there is not.", "no"),
        ("There is a green star.", "yes"),
        ("There is no green star in the image.", "no"),
        ("There isn't a star.", "no"),
        ("The circle is red.", None),
        ("", None),
        ("in in in", None),
    ],
)
def test_yes_no_reads_free_form_answers(answer: str, expected: str | None) -> None:
    assert yes_no(answer) == expected


def test_well_formedness_is_the_share_of_parseable_sentences() -> None:
    assert well_formedness([HALLUCINATING, "in in. There is a star.", ""]) == 4 / 6


def test_accuracy_by_kind_and_overall() -> None:
    result = accuracy_by_kind(["count", "color", "count", "position"], [True, False, False, True])
    assert result == {"color": 0.0, "count": 0.5, "position": 1.0, "overall": 0.5}
    with pytest.raises(DataError, match="lengths differ"):
        accuracy_by_kind(["count"], [])


def test_deceptive_accuracy_per_category_and_overall() -> None:
    categories = ["count", "nonexistent", "nonexistent", "scene", "text"]
    result = deceptive_accuracy(categories, [True, True, False, False, True])
    assert result == {"count": 1.0, "nonexistent": 0.5, "scene": 0.0, "text": 1.0, "overall": 3 / 5}
    assert deceptive_accuracy([], []) == {"overall": 0.0}
