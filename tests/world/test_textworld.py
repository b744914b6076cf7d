from __future__ import annotations

import re

from mmalign.world.scene import WorldConfig
from mmalign.world.textworld import (
    FOL_PROMPT,
    arith_answer,
    arith_samples,
    fol_samples,
    make_arith_problems,
    make_fol_pairs,
)


def _pair(template: str, n: int = 400) -> list[tuple[str, str]]:
    return [(p.sentence, p.formula) for p in make_fol_pairs(n, seed=0) if p.template == template]


_EXPECTED = [  # sentence pattern → formula built from the captured words (capitalised)
    (r"Every (\w+) shape is an? (\w+)\.", "∀x ({0}(x) → {1}(x))"),
    (r"Some (\w+) is (\w+)\.", "∃x ({0}(x) ∧ {1}(x))"),
    (r"No (\w+) is (\w+)\.", "¬∃x ({0}(x) ∧ {1}(x))"),
    (r"Every (\w+) is (\w+)\.", "∀x ({0}(x) → {1}(x))"),
    (r"There is an? (\w+) (\w+)\.", "∃x ({0}(x) ∧ {1}(x))"),
    (r"Some (\w+) (\w+) is (\w+)\.", "∃x ({0}(x) ∧ {1}(x) ∧ {2}(x))"),
]


def test_fol_templates_translate_exactly() -> None:
    pairs = make_fol_pairs(400, seed=0)
    checked = 0
    for p in pairs:
        for pattern, formula in _EXPECTED:
            if m := re.fullmatch(pattern, p.sentence):
                assert p.formula == formula.format(*(w.capitalize() for w in m.groups())), p
                checked += 1
                break
    assert checked > 200
    assert len({p.template for p in pairs}) == 9
    assert ("Every red shape is a circle.", "∀x (Red(x) → Circle(x))") in {
        (p.sentence, p.formula) for p in pairs
    }


def test_every_fol_formula_has_balanced_parentheses_and_matching_predicates() -> None:
    for p in make_fol_pairs(300, seed=3, config=WorldConfig(n_shapes=6, n_colors=6)):
        assert p.formula.count("(") == p.formula.count(")")
        predicates = re.findall(r"([A-Z][a-z]+)\(x\)", p.formula)
        words = {w.lower() for w in re.findall(r"[a-z]+", p.sentence.lower())}
        assert all(pred.lower() in words for pred in predicates), p
        assert p.formula[0] in "∀∃¬"


def test_specific_templates() -> None:
    s, f = _pair("every_shape_is_color_or_color")[0]
    c1, c2 = re.match(r"Every \w+ is (\w+) or (\w+)\.", s).groups()  # type: ignore[union-attr]
    assert f.endswith(f"({c1.capitalize()}(x) ∨ {c2.capitalize()}(x)))")
    s, f = _pair("if_shape_then_not_color")[0]
    assert "→ ¬" in f and ", then it is not " in s


def test_fol_is_deterministic_by_seed() -> None:
    assert make_fol_pairs(50, seed=1) == make_fol_pairs(50, seed=1)
    assert make_fol_pairs(50, seed=1) != make_fol_pairs(50, seed=2)


def test_arithmetic_answers_are_correct_and_end_the_chain_of_thought() -> None:
    for p in make_arith_problems(500, seed=0):
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert arith_answer(p.solution) == p.answer
        assert 0 <= p.answer <= 200
        # every "a op b = c" step in the chain of thought is true
        for a, op, b, c in re.findall(r"(\d+) ([-+×]) (\d+) = (\d+)", p.solution):
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
            assert value == int(c), p.solution


def test_arith_answer_takes_the_last_stated_answer() -> None:
    assert arith_answer("The answer is 3. No wait, the answer is 5.") == 5
    assert arith_answer("It is 5.") is None


def test_text_samples_validate_and_carry_the_task() -> None:
    fol = fol_samples(make_fol_pairs(5, seed=0))
    arith = arith_samples(make_arith_problems(5, seed=0))
    assert fol[0].conversation[0].text.startswith(FOL_PROMPT + " ")
    assert fol[0].conversation[1].text == make_fol_pairs(5, seed=0)[0].formula
    assert {s.meta["task"] for s in fol} == {"fol"} and {s.meta["task"] for s in arith} == {"arith"}
    assert all(not s.images for s in fol + arith)
    assert arith[0].meta["answer"] == make_arith_problems(5, seed=0)[0].answer
