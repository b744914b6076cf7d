"""Hallucination and accuracy metrics computed exactly from ground truth (pure functions, no models).

- ``chair``: CHAIR_i / CHAIR_s, coverage and attribute-error rate of captions, via the oracle's judgement
  (so metrics and training feedback can never disagree);
- ``pope_metrics``: POPE accuracy / precision / recall / F1 / yes-ratio with robust yes/no extraction;
- ``well_formedness``: share of sentences that parse (the guard against collapsed models);
- ``accuracy_by_kind`` / ``deceptive_accuracy``: QA accuracy per question kind / deceptive category.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mmalign.errors import DataError
from mmalign.world.oracle import Oracle
from mmalign.world.parse import well_formed_rate
from mmalign.world.scene import Scene

_YES = frozenset({"yes", "yeah", "yep", "true", "correct"})
_NO = frozenset({"no", "nope", "false", "incorrect"})
_NEGATIONS = frozenset({"no", "not", "none", "isn't", "aren't", "nothing"})


def _check_lengths(field: str, a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise DataError(f"lengths differ: {len(a)} vs {len(b)}", field=field)


def chair(scenes: Sequence[Scene], texts: Sequence[str], oracle: Oracle | None = None) -> dict[str, float]:
    """CHAIR-style object hallucination metrics of ``texts[k]`` describing ``scenes[k]``.

    - ``chair_i``: hallucinated object mentions / object mentions (0.0 when nothing is mentioned);
    - ``chair_s``: responses with ≥ 1 hallucinated object / responses (Object HalBench response rate);
    - ``coverage``: true objects mentioned / true objects (shows a collapsed model that says nothing);
    - ``attribute_error``: mentions with a wrong colour/size/cell / object mentions;
    - ``well_formed``: well-formed sentences / sentences; ``n_mentions``, ``n_responses``.

    A hallucinated object is a mention of a shape the scene lacks or one object too many (``extra``).
    """
    _check_lengths("texts", scenes, texts)
    judge = (oracle or Oracle()).judge
    n_mentions = n_hallucinated = n_attribute = n_bad_responses = n_objects = n_covered = 0
    for scene, text in zip(scenes, texts, strict=True):
        j = judge(scene, text)
        n_mentions += len(j.mentions)
        n_hallucinated += j.n_object_hallucinations
        n_attribute += j.n_attribute_errors
        n_bad_responses += j.n_object_hallucinations > 0
        n_objects += len(scene.objects)
        n_covered += sum(j.covered)
    return {
        "chair_i": n_hallucinated / n_mentions if n_mentions else 0.0,
        "chair_s": n_bad_responses / len(texts) if texts else 0.0,
        "coverage": n_covered / n_objects if n_objects else 1.0,
        "attribute_error": n_attribute / n_mentions if n_mentions else 0.0,
        "well_formed": well_formed_rate(texts),
        "n_mentions": float(n_mentions),
        "n_responses": float(len(texts)),
    }


def yes_no(answer: str) -> str | None:
    """``"yes"``, ``"no"`` or None (neither) for a free-form answer to a yes/no question.

    The first word decides ("Yes.", "no, there is not"); otherwise a "There is/are …" sentence is yes
    unless negated ("There is no star."). Anything else is None.
    """
    words = re.findall(r"[a-z']+", answer.lower())
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    if words[0] == "there" and len(words) > 1 and words[1] in ("is", "are", "isn't", "aren't"):
        return "no" if _NEGATIONS & set(words) else "yes"
    return None


def pope_metrics(labels: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE metrics; "yes" is the positive class. An unreadable answer is wrong and not a yes.

    Returns accuracy, precision, recall, f1, yes_ratio (answers read as yes / all), unknown_ratio
    (answers read as neither / all) and n.
    """
    _check_lengths("answers", labels, answers)
    gold = []
    for i, label in enumerate(labels):
        g = yes_no(label)
        if g is None:
            raise DataError(f"label must be yes or no, got {label!r}", field=f"labels[{i}]")
        gold.append(g)
    pred = [yes_no(a) for a in answers]
    tp = sum(g == "yes" and p == "yes" for g, p in zip(gold, pred, strict=True))
    fp = sum(g == "no" and p == "yes" for g, p in zip(gold, pred, strict=True))
    fn = sum(g == "yes" and p != "yes" for g, p in zip(gold, pred, strict=True))
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    n = len(gold)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": correct / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": pred.count("yes") / n if n else 0.0,
        "unknown_ratio": pred.count(None) / n if n else 0.0,
        "n": float(n),
    }


def well_formedness(texts: Sequence[str]) -> float:
    """Well-formed sentences / sentences over ``texts`` (an empty response is one bad sentence)."""
    return well_formed_rate(texts)


def _grouped_accuracy(field: str, groups: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    _check_lengths(field, groups, correct)
    totals: dict[str, list[int]] = {}
    for group, ok in zip(groups, correct, strict=True):
        totals.setdefault(group, [0, 0])
        totals[group][0] += bool(ok)
        totals[group][1] += 1
    result = {group: right / n for group, (right, n) in sorted(totals.items())}
    result["overall"] = sum(map(bool, correct)) / len(correct) if correct else 0.0
    return result


def accuracy_by_kind(kinds: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """QA accuracy per question kind (sorted) plus ``overall`` (pooled over all questions)."""
    return _grouped_accuracy("correct", kinds, correct)


def deceptive_accuracy(categories: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """MAD-style accuracy (the premise was rejected) per deceptive category plus ``overall``."""
    return _grouped_accuracy("correct", categories, correct)
