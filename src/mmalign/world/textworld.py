"""Text-only tasks of the shapes world for LM-only methods.

- NL → first-order logic: ``Every red shape is a circle.`` → ``∀x (Red(x) → Circle(x))``.
- Arithmetic word problems about shapes with a chain-of-thought answer ending in ``The answer is N.``

Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from mmalign.data.schema import Message, Sample
from mmalign.world.grammar import article, plural
from mmalign.world.scene import WorldConfig

FOL_PROMPT = "Translate the sentence into first-order logic:"
ARITH_NAMES = ("Ana", "Ben", "Mia", "Tom")
ARITH_CONTAINERS = ("box", "bag")


@dataclass(frozen=True)
class FolPair:
    """A sentence and its first-order-logic formula."""

    sentence: str
    formula: str
    template: str


@dataclass(frozen=True)
class ArithProblem:
    """A word problem, its chain-of-thought solution and the integer answer."""

    question: str
    solution: str
    answer: int
    template: str


def _p(word: str) -> str:
    """Predicate name: ``red -> Red``."""
    return word.capitalize()


# Each FOL template draws (a, b, c) = (colour, shape, other) words and returns (sentence, formula).
_FolTemplate = Callable[[str, str, str, str], tuple[str, str]]
_FOL_TEMPLATES: dict[str, _FolTemplate] = {
    "every_color_is_shape": lambda c, s, c2, z: (
        f"Every {c} shape is {article(s)} {s}.",
        f"∀x ({_p(c)}(x) → {_p(s)}(x))",
    ),
    "every_shape_is_color": lambda c, s, c2, z: (f"Every {s} is {c}.", f"∀x ({_p(s)}(x) → {_p(c)}(x))"),
    "some_shape_is_color": lambda c, s, c2, z: (f"Some {s} is {c}.", f"∃x ({_p(s)}(x) ∧ {_p(c)}(x))"),
    "no_shape_is_color": lambda c, s, c2, z: (f"No {s} is {c}.", f"¬∃x ({_p(s)}(x) ∧ {_p(c)}(x))"),
    "every_size_is_shape": lambda c, s, c2, z: (
        f"Every {z} shape is {article(s)} {s}.",
        f"∀x ({_p(z)}(x) → {_p(s)}(x))",
    ),
    "some_color_shape_is_size": lambda c, s, c2, z: (
        f"Some {c} {s} is {z}.",
        f"∃x ({_p(c)}(x) ∧ {_p(s)}(x) ∧ {_p(z)}(x))",
    ),
    "every_shape_is_color_or_color": lambda c, s, c2, z: (
        f"Every {s} is {c} or {c2}.",
        f"∀x ({_p(s)}(x) → ({_p(c)}(x) ∨ {_p(c2)}(x)))",
    ),
    "if_shape_then_not_color": lambda c, s, c2, z: (
        f"If a shape is {article(s)} {s}, then it is not {c}.",
        f"∀x ({_p(s)}(x) → ¬{_p(c)}(x))",
    ),
    "there_is_color_shape": lambda c, s, c2, z: (
        f"There is {article(c)} {c} {s}.",
        f"∃x ({_p(c)}(x) ∧ {_p(s)}(x))",
    ),
}


def make_fol_pairs(n: int, seed: int = 0, config: WorldConfig | None = None) -> list[FolPair]:
    """``n`` sentence/formula pairs over the world's colours, shapes and sizes."""
    cfg = config or WorldConfig()
    rng = random.Random(f"mmalign-fol-{seed}")
    names = sorted(_FOL_TEMPLATES)
    out = []
    for _ in range(n):
        name = rng.choice(names)
        c, c2 = rng.sample(cfg.colors, 2)
        sentence, formula = _FOL_TEMPLATES[name](
            c, rng.choice(cfg.shapes), c2, rng.choice(("small", "large"))
        )
        out.append(FolPair(sentence, formula, name))
    return out


def _add(rng: random.Random, s1: str, s2: str) -> tuple[str, str, int]:
    a, b = rng.randint(1, 60), rng.randint(1, 60)
    box = rng.choice(ARITH_CONTAINERS)
    q = f"A {box} has {a} {plural(s1)} and {b} {plural(s2)}. How many shapes are in the {box}?"
    return q, f"There are {a} {plural(s1)} and {b} {plural(s2)}. {a} + {b} = {a + b}.", a + b


def _sub(rng: random.Random, s1: str, s2: str) -> tuple[str, str, int]:
    a = rng.randint(2, 99)
    b = rng.randint(1, a)
    name = rng.choice(ARITH_NAMES)
    q = f"{name} has {a} {plural(s1)}. {name} gives away {b} {plural(s1)}. How many {plural(s1)} are left?"
    return q, f"{name} starts with {a} {plural(s1)} and gives away {b}. {a} - {b} = {a - b}.", a - b


def _mul(rng: random.Random, s1: str, s2: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    box = rng.choice(ARITH_CONTAINERS)
    q = f"There are {a} {plural(box)} with {b} {plural(s1)} in each {box}. How many {plural(s1)} are there?"
    return q, f"There are {a} {plural(box)} of {b} {plural(s1)}. {a} × {b} = {a * b}.", a * b


def _two_step(rng: random.Random, s1: str, s2: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a * b)
    name = rng.choice(ARITH_NAMES)
    q = (
        f"{name} has {a} boxes with {b} {plural(s1)} in each box. "
        f"{name} gives away {c} {plural(s1)}. How many {plural(s1)} are left?"
    )
    sol = f"{name} has {a} × {b} = {a * b} {plural(s1)}. {a * b} - {c} = {a * b - c}."
    return q, sol, a * b - c


_ARITH_TEMPLATES = {"add": _add, "sub": _sub, "mul": _mul, "two_step": _two_step}


def make_arith_problems(n: int, seed: int = 0, config: WorldConfig | None = None) -> list[ArithProblem]:
    """``n`` word problems (add, subtract, multiply, two steps) with answers in 0..200."""
    cfg = config or WorldConfig()
    rng = random.Random(f"mmalign-arith-{seed}")
    names = sorted(_ARITH_TEMPLATES)
    out = []
    for _ in range(n):
        name = rng.choice(names)
        s1, s2 = rng.sample(cfg.shapes, 2)
        q, steps, ans = _ARITH_TEMPLATES[name](rng, s1, s2)
        out.append(ArithProblem(q, f"{steps} The answer is {ans}.", ans, name))
    return out


def arith_answer(response: str) -> int | None:
    """The integer after the last ``The answer is`` in a response (None if absent)."""
    found = re.findall(r"answer is\s+(-?\d+)", response)
    return int(found[-1]) if found else None


def fol_samples(pairs: list[FolPair], id_prefix: str = "fol") -> list[Sample]:
    """Text-only SFT samples (``FOL_PROMPT`` + sentence → formula)."""
    return [
        Sample(
            id=f"{id_prefix}-{k:06d}",
            conversation=[Message.user(f"{FOL_PROMPT} {p.sentence}"), Message.assistant(p.formula)],
            meta={"task": "fol", "template": p.template, "sentence": p.sentence, "formula": p.formula},
        )
        for k, p in enumerate(pairs)
    ]


def arith_samples(problems: list[ArithProblem], id_prefix: str = "arith") -> list[Sample]:
    """Text-only SFT samples (problem → chain of thought ending in ``The answer is N.``)."""
    return [
        Sample(
            id=f"{id_prefix}-{k:06d}",
            conversation=[Message.user(p.question), Message.assistant(p.solution)],
            meta={"task": "arith", "template": p.template, "answer": p.answer},
        )
        for k, p in enumerate(problems)
    ]
