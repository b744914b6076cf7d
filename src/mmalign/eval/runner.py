"""Evaluate a model on held-out shapes-world scenes: captions, POPE, QA and deceptive questions.

``evaluate_world`` generates with :func:`mmalign.rollout.generate.generate` and scores with the pure
functions of :mod:`mmalign.eval.metrics`, so every number can be recomputed from the stored responses.
Prompts are rendered exactly as the SFT corpus renders them (``Question.messages``: one user turn with one
image part followed by the question text; the remedy variant adds the ``REMEDY_PROMPT`` system message).

Result (flat, JSON-serialisable)::

    greedy.chair_i, greedy.chair_s, greedy.coverage, greedy.attribute_error, greedy.well_formed, …
    sampled.<same keys>                      (temperature-``temperature`` samples)
    chair_i, chair_s, coverage, attribute_error, well_formed   aliases of the first decoding (greedy)
    pope_<split>_<accuracy|precision|recall|f1|yes_ratio|unknown_ratio|n>   for random/popular/adversarial
    qa_acc, qa_acc.<kind>                    QA accuracy, overall and per question kind
    deceptive_acc, deceptive_acc.<category>  premise rejected, no system prompt
    deceptive_acc_remedy, deceptive_acc_remedy.<category>   with the remedy system prompt
    n_scenes, records (per-item), scenes (``Scene.to_dict`` of every scene), settings

CHAIR is never reported without coverage and the well-formedness rate: a collapsed model that says
nothing "hallucinates" nothing.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.atomic import atomic_write_json
from mmalign.data.schema import Message
from mmalign.eval import metrics as M
from mmalign.rollout import generate as G
from mmalign.world.grammar import CAPTION_PROMPT
from mmalign.world.oracle import Oracle
from mmalign.world.prior import CooccurrencePrior
from mmalign.world.questions import (
    DECEPTIVE_CATEGORIES,
    KINDS,
    POPE_SPLITS,
    REMEDY_PROMPT,
    Question,
    make_deceptive,
    make_questions,
    pope_questions,
)
from mmalign.world.render import render
from mmalign.world.scene import Scene, WorldConfig

DECODINGS = ("greedy", "sampled")
CAPTION_KEYS = ("chair_i", "chair_s", "coverage", "attribute_error", "well_formed")
"""Caption metrics that also get a flat alias (greedy decoding)."""

Record = dict[str, Any]


def caption_messages() -> list[Message]:
    """The caption prompt of the SFT corpus: one user turn, one image, ``Describe the image.``"""
    return [Message.user(CAPTION_PROMPT, n_images=1)]


def _subsample(items: list[Question], n: int | None, rng: random.Random) -> list[Question]:
    """At most ``n`` items, chosen at random but kept in their original order."""
    if n is None or n >= len(items):
        return items
    return [items[i] for i in sorted(rng.sample(range(len(items)), n))]


class _Progress:
    """A rich progress bar over all generations (or nothing)."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        self._task: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()

    def phase(self, name: str, total: int) -> G.ProgressFn | None:
        if self._bar is None:
            return None
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(name, total=total)
        bar, task = self._bar, self._task
        return lambda done, total: bar.update(task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def evaluate_world(
    model: Any,
    processor: Any,
    scenes: Sequence[Scene],
    *,
    n_pope: int | None = None,
    n_qa: int | None = None,
    n_deceptive: int | None = None,
    decoding: Sequence[str] = DECODINGS,
    n_samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    caption_max_new_tokens: int = 96,
    answer_max_new_tokens: int = 48,
    qa_kinds: Sequence[str] = KINDS,
    deceptive_categories: Sequence[str] = DECEPTIVE_CATEGORIES,
    prior: CooccurrencePrior | None = None,
    oracle: Oracle | None = None,
    config: WorldConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every shapes-world evaluation on ``scenes`` and return the flat result (module docstring).

    ``n_pope`` / ``n_qa`` / ``n_deceptive`` cap the questions per POPE split / QA / deceptive variant
    (None: all — one question per allowed kind and per allowed deceptive category of every scene).
    ``decoding`` lists the caption decodings (``greedy`` and/or ``sampled``); questions use greedy only.
    ``n_samples`` sampled captions per scene are pooled into the ``sampled.*`` metrics.
    """
    unknown = [d for d in decoding if d not in DECODINGS]
    if unknown or not decoding:
        raise ValueError(f"evaluate_world: decoding: expected some of {DECODINGS}, got {tuple(decoding)}")
    if not scenes:
        raise ValueError("evaluate_world: scenes: no scenes to evaluate")
    if n_samples < 1:
        raise ValueError(f"evaluate_world: n_samples: must be >= 1, got {n_samples}")
    oracle = oracle or Oracle()
    images = [render(s, config.image_size if config else None) for s in scenes]
    position = {id(s): k for k, s in enumerate(scenes)}
    bar = _Progress(progress)

    def run(phase: str, messages: list[list[Message]], scene_ids: list[int], **kw: Any) -> list[str]:
        ims = [[images[k]] for k in scene_ids]
        return G.generate(
            model,
            processor,
            messages,
            ims,
            batch_size=batch_size,
            progress=bar.phase(phase, len(messages)),
            **kw,
        )

    result: dict[str, Any] = {"n_scenes": len(scenes)}
    records: list[Record] = []
    try:
        # ---- captions: CHAIR_i / CHAIR_s / coverage / attribute error / well-formedness
        for mode in decoding:
            sampled = mode == "sampled"
            ids = [k for _ in range(n_samples if sampled else 1) for k in range(len(scenes))]
            texts = run(
                f"captions ({mode})",
                [caption_messages() for _ in ids],
                ids,
                max_new_tokens=caption_max_new_tokens,
                do_sample=sampled,
                temperature=temperature,
                seed=seed,
            )
            for key, value in M.chair([scenes[k] for k in ids], texts, oracle).items():
                result[f"{mode}.{key}"] = value
            for j, (k, text) in enumerate(zip(ids, texts, strict=True)):
                one = M.chair([scenes[k]], [text], oracle)
                records.append(
                    {
                        "task": "caption",
                        "decoding": mode,
                        "scene": k,
                        "sample": j // len(scenes),
                        "prompt": CAPTION_PROMPT,
                        "response": text,
                        "hallucinated": one["chair_s"] > 0,
                        "correct": one["chair_s"] == 0 and one["attribute_error"] == 0,
                    }
                )
        for key in CAPTION_KEYS:
            result[key] = result[f"{decoding[0]}.{key}"]

        def ask(phase: str, questions: list[Question], system: str | None) -> list[str]:
            msgs = [q.messages(n_images=1, system=system) for q in questions]
            qids = [position[id(q.scene)] for q in questions]
            return run(phase, msgs, qids, max_new_tokens=answer_max_new_tokens)

        def question_records(task: str, questions: list[Question], answers: list[str], correct: list[bool],
                             **extra: Any) -> None:  # fmt: skip
            for q, a, ok in zip(questions, answers, correct, strict=True):
                records.append(
                    {
                        "task": task,
                        "decoding": "greedy",
                        "scene": position[id(q.scene)],
                        "kind": q.category or q.kind,
                        "prompt": q.text,
                        "response": a,
                        "reference": q.answer,
                        "correct": bool(ok),
                        **extra,
                    }
                )

        # ---- POPE: yes/no probes for present / absent shapes, three negative-sampling splits
        for split in POPE_SPLITS:
            rng = random.Random(f"mmalign-eval-pope-{split}-{seed}")
            qs = _subsample(pope_questions(scenes, split, prior, seed), n_pope, rng)
            answers = ask(f"POPE {split}", qs, None)
            for key, value in M.pope_metrics([q.answer for q in qs], answers).items():
                result[f"pope_{split}_{key}"] = value
            correct = [M.yes_no(a) == M.yes_no(q.answer) for q, a in zip(qs, answers, strict=True)]
            question_records("pope", qs, answers, correct, split=split)

        # ---- QA accuracy per question kind
        rng = random.Random(f"mmalign-eval-qa-{seed}")
        qs = [q for s in scenes for q in make_questions(s, rng, qa_kinds, config)]
        qs = _subsample(qs, n_qa, rng)
        answers = ask("QA", qs, None)
        correct = [q.check(a) for q, a in zip(qs, answers, strict=True)]
        _grouped(result, "qa_acc", M.accuracy_by_kind([q.kind for q in qs], correct))
        question_records("qa", qs, answers, correct)

        # ---- deceptive (false-premise) questions, without and with the remedy system prompt
        rng = random.Random(f"mmalign-eval-deceptive-{seed}")
        qs = [
            q
            for s in scenes
            for c in deceptive_categories
            if (q := make_deceptive(s, rng, c, config)) is not None
        ]
        qs = _subsample(qs, n_deceptive, rng)
        for name, system in (("deceptive_acc", None), ("deceptive_acc_remedy", REMEDY_PROMPT)):
            answers = ask(name.replace("_acc", ""), qs, system)
            correct = [q.check(a) for q, a in zip(qs, answers, strict=True)]
            _grouped(result, name, M.deceptive_accuracy([str(q.category) for q in qs], correct))
            question_records("deceptive", qs, answers, correct, remedy=system is not None)
    finally:
        bar.close()

    result["records"] = records
    result["scenes"] = [s.to_dict() for s in scenes]
    result["settings"] = {
        "decoding": list(decoding),
        "n_samples": n_samples,
        "temperature": temperature,
        "seed": seed,
        "n_pope": n_pope,
        "n_qa": n_qa,
        "n_deceptive": n_deceptive,
        "caption_max_new_tokens": caption_max_new_tokens,
        "answer_max_new_tokens": answer_max_new_tokens,
    }
    return result


evaluate = evaluate_world
"""The name docs/CONTRACTS.md uses."""


def _grouped(result: dict[str, Any], name: str, accuracy: dict[str, float]) -> None:
    """``overall`` → ``name``; every group → ``name.<group>``."""
    for group, value in accuracy.items():
        result[name if group == "overall" else f"{name}.{group}"] = value


def metric_values(result: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of an eval result (drops records, scenes and settings)."""
    return {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def save_eval(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON atomically (temp file in the same folder, then ``os.replace``)."""
    return atomic_write_json(path, result)


def load_eval(path: str | Path) -> dict[str, Any]:
    """Read a result written by :func:`save_eval`."""
    return dict(json.loads(Path(path).read_text(encoding="utf-8")))
