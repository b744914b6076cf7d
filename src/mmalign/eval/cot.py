"""Chain-of-thought benchmark (CoT Hub style): few-shot prompts, robust final-answer extraction, accuracy.

- :func:`extract_answer` (from :mod:`mmalign.data.answers`) reads the final answer of a free-form
  response: a number (``"The answer is 1,234."`` → ``"1234"``) or an option letter (``"answer: (B)"`` →
  ``"B"``), see its docstring for the order of the rules;
- :func:`is_correct` compares a prediction with the reference (numbers by value: ``12.0 == 12``);
- :func:`few_shot_prompt` renders CoT Hub's format: ``Q: …`` / ``A: <reasoning> The answer is X.``
  blocks, then ``Q: <question>`` / ``A:``;
- :class:`CoTBench` decodes greedily and reports ``accuracy``, ``accuracy.<category>`` and
  ``extraction_failure`` (share of responses with no readable answer).

Items (``EvalItem``): the question is ``truth["question"]`` (else the last user turn's text);
``truth["kind"]`` is ``number`` or ``choice`` (else ``auto``); ``truth["choices"]`` lists the option
texts of a multiple-choice item (letters A, B, … in order); ``answer`` is the reference. They come from
:func:`world_cot_items` (the shapes world's arithmetic word problems) or from the importers
``mmalign.data.importers.cot.load_gsm8k`` / ``load_mmlu``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmalign.data.answers import AnswerKind, extract_answer, is_correct
from mmalign.data.schema import EvalItem, Message
from mmalign.errors import DataError
from mmalign.eval import metrics as M
from mmalign.eval.bench import Benchmark, Decoding, Request, Responses, Result, response_of
from mmalign.world.corpus import eval_stream, train_stream
from mmalign.world.scene import WorldConfig
from mmalign.world.textworld import ArithProblem, make_arith_problems


# ---- few-shot prompts ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shot:
    """A worked example of a few-shot prompt."""

    question: str
    reasoning: str
    """The chain of thought, without the final ``The answer is …`` sentence (may be empty)."""
    answer: str


def few_shot_prompt(examples: Sequence[Shot], question: str, k: int | None = None) -> str:
    """CoT Hub-style prompt: the first ``k`` examples (all when None) as ``Q: …`` / ``A: <reasoning> The
    answer is X.`` blocks separated by a blank line, then ``Q: <question>`` and ``A:``."""
    k = len(examples) if k is None else k
    if not 0 <= k <= len(examples):
        raise DataError(f"k={k} shots requested but {len(examples)} examples given", field="k")
    blocks = []
    for shot in examples[:k]:
        solution = " ".join(p for p in (shot.reasoning.strip(), f"The answer is {shot.answer}.") if p)
        blocks.append(f"Q: {shot.question.strip()}\nA: {solution}")
    blocks.append(f"Q: {question.strip()}\nA:")
    return "\n\n".join(blocks)


def item_question(item: EvalItem) -> str:
    """The question of a CoT item: ``truth["question"]``, else the text of its last user turn."""
    return str(item.truth.get("question") or item.prompt[-1].text)


def item_kind(item: EvalItem) -> AnswerKind:
    kind = item.truth.get("kind")
    return kind if kind in ("number", "choice") else "auto"


def shots_from_items(items: Sequence[EvalItem]) -> list[Shot]:
    """Shots from solved items (their ``truth["reasoning"]`` and ``answer``; option letters as ``(B)``)."""
    out = []
    for item in items:
        if item.answer is None:
            raise DataError("a shot needs a reference answer", field=f"{item.id}.answer")
        answer = f"({item.answer})" if item_kind(item) == "choice" else item.answer
        out.append(Shot(item_question(item), str(item.truth.get("reasoning", "")), answer))
    return out


# ---- benchmark -------------------------------------------------------------------------------------------
class CoTBench(Benchmark):
    """Greedy chain-of-thought answers scored by final-answer extraction (module docstring).

    ``k_shots`` = 0: each item's own prompt as is (how the shapes world's SFT data asks). ``k_shots`` > 0:
    one user turn with :func:`few_shot_prompt` over the first ``k_shots`` of ``shots`` that do not repeat
    the item's question (earlier turns and image parts of the item's prompt are kept).

    Metrics: ``accuracy``, ``accuracy.<category>`` (items with a category), ``extraction_failure``, ``n``.
    """

    name: ClassVar[str] = "cot"

    def __init__(
        self,
        items: Sequence[EvalItem],
        shots: Sequence[Shot] = (),
        k_shots: int = 0,
        *,
        max_new_tokens: int = 256,
        base_dir: str | Path | None = None,
    ) -> None:
        super().__init__(items, base_dir=base_dir)
        if k_shots < 0 or k_shots > len(shots):
            raise DataError(f"k_shots={k_shots} but {len(shots)} shots given", field="k_shots")
        for item in self.items:
            if item.answer is None:
                raise DataError("CoT items need a reference answer", field=f"{item.id}.answer")
        self.shots, self.k_shots, self.max_new_tokens = list(shots), k_shots, max_new_tokens

    def prompt(self, item: EvalItem) -> list[Message]:
        """The messages sent for ``item``."""
        if self.k_shots == 0:
            return list(item.prompt)
        question = item_question(item)
        usable = [s for s in self.shots if s.question.strip() != question.strip()]
        if len(usable) < self.k_shots:
            raise DataError(
                f"only {len(usable)} shots differ from the item's question, {self.k_shots} needed",
                field=f"{item.id}.shots",
            )
        last = item.prompt[-1]
        text = few_shot_prompt(usable, question, self.k_shots)
        return [*item.prompt[:-1], Message.user(text, n_images=last.n_images)]

    def requests(self) -> list[Request]:
        decoding = Decoding(max_new_tokens=self.max_new_tokens, do_sample=False)
        return [self.request(item, decoding, messages=self.prompt(item)) for item in self.items]

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "k_shots": self.k_shots, "max_new_tokens": self.max_new_tokens}

    def score(self, responses: Responses) -> Result:
        records: list[dict[str, Any]] = []
        for item in self.items:
            response = response_of(responses, item)
            kind = item_kind(item)
            choices = item.truth.get("choices")
            pred = extract_answer(response, kind, choices)
            records.append(
                {
                    "id": item.id,
                    "category": item.category,
                    "response": response,
                    "prediction": pred,
                    "answer": item.answer,
                    "correct": is_correct(pred, str(item.answer), kind),
                }
            )
        correct = [bool(r["correct"]) for r in records]
        by_category = M.accuracy_by_kind([str(r["category"]) for r in records], correct)
        metrics = {"accuracy": by_category.pop("overall")}
        metrics.update({f"accuracy.{c}": v for c, v in by_category.items() if c})
        metrics["extraction_failure"] = sum(r["prediction"] is None for r in records) / len(records)
        metrics["n"] = float(len(records))
        return Result(self.name, metrics, records)


# ---- shapes-world items ----------------------------------------------------------------------------------
def _reasoning(problem: ArithProblem) -> str:
    return problem.solution.removesuffix(f"The answer is {problem.answer}.").strip()


def world_cot_items(n: int, seed: int = 0, config: WorldConfig | None = None) -> list[EvalItem]:
    """``n`` arithmetic word problems of the shapes world (``make_arith_problems`` on the held-out stream
    ``eval_stream(seed)``; the SFT corpus of ``seed`` draws from stream ``seed``, so they differ, though a
    short question can recur by chance). Category: the problem template (add, sub, mul, two_step)."""
    return [
        EvalItem(
            id=f"cot-{k:05d}",
            benchmark=CoTBench.name,
            prompt=[Message.user(p.question)],
            answer=str(p.answer),
            category=p.template,
            truth={
                "question": p.question,
                "reasoning": _reasoning(p),
                "solution": p.solution,
                "kind": "number",
                "source": "world",
            },
        )
        for k, p in enumerate(make_arith_problems(n, eval_stream(seed), config))
    ]


def world_cot_shots(k: int, seed: int = 0, config: WorldConfig | None = None) -> list[Shot]:
    """``k`` worked examples from the training stream ``train_stream(seed)`` (disjoint from
    :func:`world_cot_items`' stream)."""
    return [
        Shot(p.question, _reasoning(p), str(p.answer))
        for p in make_arith_problems(k, train_stream(seed), config)
    ]
