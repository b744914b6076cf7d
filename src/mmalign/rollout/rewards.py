"""Rewards behind one call: ``reward.score(batch) -> RewardOutput``.

Every consumer (PPO, rejection sampling, online DPO, MM-DPO margins, RM evaluation) scores responses
through the :class:`Reward` protocol, so a trained reward model, the shapes-world oracle and an exact-answer
verifier are interchangeable:

- :class:`ModelReward` wraps a :class:`~mmalign.models.heads.RewardModel` and builds its input the way it
  was trained (``kind``): ``bt``/``aspects``/``pairwise``: prompt + response; ``fact``: facts appended to the
  prompt (:func:`~mmalign.data.rm_inputs.with_facts`); ``critique``: the RM first *generates* a critique of
  the response, then scores (prompt, response, critique) — the critiques are returned in ``info``;
- :class:`OracleReward`: the world oracle's weighted aspect score (0–4) of the response against the scene;
- :class:`ExactAnswerReward`: 1 if the response's final answer equals the reference answer, else 0.

Scoring is batched and runs under ``torch.no_grad()``; scores are float32 tensors on the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from mmalign.data.answers import extract_answer
from mmalign.data.collate import SFTCollator
from mmalign.data.rm_inputs import FactsPlacement, critique_conversation, with_facts
from mmalign.data.schema import Message
from mmalign.errors import DataError
from mmalign.models.heads import RewardModel
from mmalign.rollout.generate import generate
from mmalign.world.oracle import ASPECTS, Oracle
from mmalign.world.scene import Scene


@dataclass
class RewardBatch:
    """B responses to score, with what each reward may need about its prompt.

    ``truths[i]`` holds per-item ground truth: ``scene`` (``Scene.to_dict()``, oracle reward), ``facts``
    (list of sentences, fact-augmented RM), ``answer`` (reference answer, exact-answer reward), ``task``.
    """

    prompts: list[list[Message]]
    responses: list[str]
    images: list[list[Any]] = field(default_factory=list)
    """PIL images of each prompt, in order of its image parts (empty lists for text prompts)."""
    truths: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if not self.images:
            self.images = [[] for _ in range(n)]
        if not self.truths:
            self.truths = [{} for _ in range(n)]
        for name in ("responses", "images", "truths"):
            if len(getattr(self, name)) != n:
                raise DataError(f"{len(getattr(self, name))} entries for {n} prompts", field=name)

    def __len__(self) -> int:
        return len(self.prompts)

    def truth(self, i: int, key: str) -> Any:
        if key not in self.truths[i]:
            raise DataError(f"item {i} has no {key!r} in its truths", field=f"truths.{i}.{key}")
        return self.truths[i][key]


@dataclass
class RewardOutput:
    scores: torch.Tensor  # (B,) float32: higher is better
    aspects: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B,)
    info: list[dict[str, Any]] = field(default_factory=list)  # per item (e.g. the generated critique)


@runtime_checkable
class Reward(Protocol):
    """Anything that scores a :class:`RewardBatch`."""

    name: str

    def score(self, batch: RewardBatch) -> RewardOutput: ...


class OracleReward:
    """The shapes-world oracle: weighted mean of its 0–4 aspect scores (``truths[i]["scene"]``)."""

    name = "oracle"

    def __init__(self, oracle: Oracle | None = None, task: str = "caption") -> None:
        self.oracle = oracle or Oracle()
        self.task = task

    def score(self, batch: RewardBatch) -> RewardOutput:
        per_aspect: dict[str, list[float]] = {a: [] for a in ASPECTS}
        scores = []
        for i, text in enumerate(batch.responses):
            scene = Scene.from_dict(batch.truth(i, "scene"))
            task = batch.truths[i].get("task", self.task)
            aspects = self.oracle.aspect_scores(scene, text, task)
            for a in ASPECTS:
                per_aspect[a].append(aspects[a])
            scores.append(self.oracle.weighted(aspects))
        return RewardOutput(
            scores=torch.tensor(scores, dtype=torch.float32),
            aspects={a: torch.tensor(v, dtype=torch.float32) for a, v in per_aspect.items()},
        )


def final_answer(text: str) -> str | None:
    """The final number of ``text`` as :func:`mmalign.data.answers.extract_answer` reads it (GSM8K ``####``,
    ``\\boxed{}``, the number after "the answer is", else the last number; normalised), else its last word
    ``yes``/``no``, lower-cased; None when neither."""
    number = extract_answer(text, "number")
    if number is not None:
        return number
    words = re.findall(r"[a-z]+", text.lower())
    for w in reversed(words):
        if w in ("yes", "no"):
            return w
    return None


class ExactAnswerReward:
    """1.0 when ``extract(response)`` equals ``extract(truths[i]["answer"])``, else 0.0."""

    name = "exact_answer"

    def __init__(self, extract: Callable[[str], str | None] = final_answer) -> None:
        self.extract = extract

    def score(self, batch: RewardBatch) -> RewardOutput:
        hits = []
        for i, text in enumerate(batch.responses):
            gold = self.extract(str(batch.truth(i, "answer")))
            pred = self.extract(text)
            hits.append(float(pred is not None and pred == gold))
        return RewardOutput(scores=torch.tensor(hits, dtype=torch.float32))


RM_KINDS = ("bt", "fact", "critique", "aspects")
EMPTY_RESPONSE = "."
"""What a reward model reads in place of an empty response (a record cannot hold an empty turn)."""


def rm_conversation(
    kind: str,
    prompt: Sequence[Message],
    response: str,
    truth: dict[str, Any],
    critique: str | None = None,
    facts_placement: FactsPlacement = "system",
) -> list[Message]:
    """The conversation a reward model of ``kind`` reads for (prompt, response) — same at train and score
    time. ``fact`` needs ``truth["facts"]`` (placed as ``facts_placement``); ``critique`` needs the
    critique text."""
    if kind == "fact":
        return [*with_facts(prompt, truth.get("facts"), facts_placement), Message.assistant(response)]
    if kind == "critique":
        if critique is None:
            raise DataError("a critique RM scores (prompt, response, critique): critique missing")
        return critique_conversation(prompt, response, critique)
    if kind not in RM_KINDS:
        raise DataError(f"unknown reward-model kind {kind!r}; expected one of {RM_KINDS}", field="kind")
    return [*prompt, Message.assistant(response)]


class ModelReward:
    """A trained :class:`RewardModel` as a :class:`Reward` (see the module docstring).

    ``weights`` combines a multi-aspect head into one score (default: the mean of the aspects).
    ``critique_max_new_tokens`` bounds the critique a critique RM writes before scoring.
    """

    def __init__(
        self,
        model: RewardModel,
        processor: Any,
        *,
        batch_size: int = 16,
        weights: dict[str, float] | None = None,
        critique_max_new_tokens: int = 64,
        max_length: int | None = 1024,
    ) -> None:
        self.model, self.processor = model, processor
        self.kind = model.kind
        self.name = f"rm:{self.kind}"
        self.batch_size = batch_size
        self.critique_max_new_tokens = critique_max_new_tokens
        self.collator = SFTCollator(processor, max_length=max_length)
        aspects = model.aspects or tuple(f"dim{k}" for k in range(model.dim))
        self.aspect_names = aspects
        if weights is not None:
            unknown = set(weights) - set(aspects)
            if unknown:
                raise DataError(f"weights name unknown aspects {sorted(unknown)}", field="weights")
        self.weights = torch.tensor(
            [(weights or {}).get(a, 0.0 if weights else 1.0) for a in aspects], dtype=torch.float32
        )

    def critiques(self, batch: RewardBatch) -> list[str]:
        """The critique the RM writes for each response (greedy)."""
        prompts = [critique_conversation(p, r) for p, r in zip(batch.prompts, batch.responses, strict=True)]
        return generate(
            self.model.backbone,
            self.processor,
            prompts,
            batch.images,
            max_new_tokens=self.critique_max_new_tokens,
            batch_size=self.batch_size,
        )

    @torch.no_grad()
    def raw(self, batch: RewardBatch, critiques: Sequence[str] | None = None) -> torch.Tensor:
        """(B, dim) head outputs for the batch."""
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for start in range(0, len(batch), self.batch_size):
                rows = range(start, min(start + self.batch_size, len(batch)))
                examples = []
                for i in rows:  # the decoded images go straight to the processor
                    messages = rm_conversation(
                        self.kind,
                        batch.prompts[i],
                        batch.responses[i] or EMPTY_RESPONSE,
                        batch.truths[i],
                        critiques[i] if critiques is not None else None,
                        self.model.facts_placement,
                    )
                    ex = self.collator.render_messages(messages, batch.images[i], str(i))
                    if ex is not None:
                        examples.append(ex)
                enc = self.collator.collate(examples)
                if enc is None:
                    raise DataError(
                        "every response of the batch is longer than max_length", field="responses"
                    )
                enc.pop("labels")
                device = next(self.model.parameters()).device
                enc = {k: v.to(device) for k, v in enc.items()}
                out.append(self.model(enc.pop("input_ids"), enc.pop("attention_mask"), **enc).float().cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)

    def score(self, batch: RewardBatch) -> RewardOutput:
        critiques = self.critiques(batch) if self.kind == "critique" else None
        raw = self.raw(batch, critiques)  # (B, dim)
        scores = raw @ (self.weights / self.weights.sum().clamp(min=1e-12))
        aspects = {a: raw[:, k] for k, a in enumerate(self.aspect_names)} if raw.shape[1] > 1 else {}
        info = [{"critique": c} for c in critiques] if critiques is not None else []
        return RewardOutput(scores=scores, aspects=aspects, info=info)
