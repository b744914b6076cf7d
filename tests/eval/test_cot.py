"""CoT: answer extraction on tricky responses, exact few-shot prompts, exact accuracy of scripted answers."""

from __future__ import annotations

import pytest

from mmalign.data.answers import extract_answer, is_correct, normalize_number
from mmalign.data.schema import EvalItem, Message
from mmalign.errors import DataError
from mmalign.eval.bench import Result
from mmalign.eval.cot import (
    CoTBench,
    Shot,
    few_shot_prompt,
    shots_from_items,
    world_cot_items,
    world_cot_shots,
)
from mmalign.models.tiny import build_tiny
from mmalign.world.textworld import arith_answer

OPTIONS = ["London", "Paris", "Rome", "Berlin"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 1,234.", "1234"),
        ("Janet sells 9 eggs.\n#### -5", "-5"),
        ("She pays $12.50 in total.", "12.5"),
        ("The answer is 12.0", "12"),
        ("16 - 3 - 4 = 9 eggs, so she makes 9 * 2 = 18", "18"),  # "- 3" is not minus three
        ("The answer is 3. (Ana had 5 circles and gave away 2.)", "3"),  # question echo after the marker
        ("A box has 5 circles and 4 squares. The answer is 9, not 5.", "9"),
        ("The answer is the sum of 3 and 4, which is 7.", "7"),
        ("The answer is seven.", "7"),
        (
            "The answer is 8.\n\nQ: A bag has 12 stars. How many?\nA: The answer is 12.",
            "8",
        ),  # continuation cut
        ("-30 / 3 = -10 degrees", "-10"),
        ("**Final answer:** 42", "42"),
        ("so the total is \\boxed{2,125}", "2125"),
        ("Answer = −4", "-4"),
        ("It grew by 50%.", "50"),
        ("Version 1.2.3 has no answer", None),
        ("I cannot tell.", None),
    ],
)
def test_number_extraction(text: str, expected: str | None) -> None:
    assert extract_answer(text, "number") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("answer: (B)", "B"),
        ("B) Paris", "B"),
        ("(C)", "C"),
        ("D", "D"),
        ("the correct option is c", "C"),
        ("Therefore, the answer is B because Paris is the capital.", "B"),
        ("The answer is [d].", "D"),
        ("The answer is Paris.", "B"),  # the option's text
        ("It must be Berlin, I am sure.", "D"),  # the one option named anywhere
        ("(A) is wrong, so it is (C)", "C"),  # the last bracketed letter
        ("The answer is a city in France.", None),  # "a" is an article, not option A
        ("Rome or Berlin?", None),  # two options named: ambiguous
        ("The answer is (E)", None),  # only A-D exist
        ("A box has three sides.", None),  # a leading article is no letter
    ],
)
def test_choice_extraction(text: str, expected: str | None) -> None:
    assert extract_answer(text, "choice", OPTIONS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is (B).", "B"),
        ("The answer is I think 5", "5"),  # a pronoun is no letter without known options
        ("A box has 5 circles. The answer is 5.", "5"),
    ],
)
def test_auto_extraction_prefers_a_marked_letter_then_a_number(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_numbers_are_normalised_and_compared_by_value() -> None:
    assert [normalize_number(s) for s in ("1,234", "$12.50", "12.0", "−5", "-0", "1e3", "x")] == [
        "1234", "12.5", "12", "-5", "0", "1000", None,
    ]  # fmt: skip
    assert is_correct("12", "12.0", "number")
    assert is_correct("1234", "1,234", "number")
    assert not is_correct("12.5", "12", "number")
    assert is_correct("b", "(B)", "choice")
    assert not is_correct(None, "3")
    assert is_correct("Paris", "paris")  # auto, not numbers: case-folded text
    with pytest.raises(DataError, match="kind must be"):
        extract_answer("1", "letter")  # type: ignore[arg-type]


# ---- prompts -----------------------------------------------------------------------------------------------
SHOTS = [
    Shot("Ana has 3 stars and gets 2 more. How many stars?", "3 + 2 = 5.", "5"),
    Shot("Ben has 4 boxes of 2 hearts. How many hearts?", "4 × 2 = 8.", "8"),
    Shot("Which shape is round?\n(A) circle\n(B) square", "", "(A)"),
]


def test_few_shot_prompt_exact_text() -> None:
    assert few_shot_prompt(SHOTS, "Tom has 9 circles and gives away 4. How many are left?", k=2) == (
        "Q: Ana has 3 stars and gets 2 more. How many stars?\n"
        "A: 3 + 2 = 5. The answer is 5.\n"
        "\n"
        "Q: Ben has 4 boxes of 2 hearts. How many hearts?\n"
        "A: 4 × 2 = 8. The answer is 8.\n"
        "\n"
        "Q: Tom has 9 circles and gives away 4. How many are left?\n"
        "A:"
    )
    assert few_shot_prompt(SHOTS[2:], "Q?") == (
        "Q: Which shape is round?\n(A) circle\n(B) square\nA: The answer is (A).\n\nQ: Q?\nA:"
    )
    assert few_shot_prompt(SHOTS, "Q?", k=0) == "Q: Q?\nA:"
    with pytest.raises(DataError, match="k=4 shots requested but 3 examples given"):
        few_shot_prompt(SHOTS, "Q?", k=4)


def test_world_items_and_shots_come_from_disjoint_streams() -> None:
    items = world_cot_items(3, seed=0)
    shots = world_cot_shots(2, seed=0)
    assert [it.id for it in items] == ["cot-00000", "cot-00001", "cot-00002"]
    for it in items:
        assert it.truth["solution"] == f"{it.truth['reasoning']} The answer is {it.answer}."
        assert arith_answer(it.truth["solution"]) == int(str(it.answer))
        assert it.prompt[0].text == it.truth["question"]
        assert it.category in {"add", "sub", "mul", "two_step"}
    assert not {s.question for s in shots} & {it.truth["question"] for it in items}
    assert shots_from_items(items[:1]) == [
        Shot(items[0].truth["question"], items[0].truth["reasoning"], str(items[0].answer))
    ]


def _choice_item() -> EvalItem:
    question = "Which is the capital of France?\n(A) London\n(B) Paris\n(C) Rome\n(D) Berlin"
    return EvalItem(
        id="mc-1",
        benchmark="cot",
        prompt=[Message.system("Be brief."), Message.user(question)],
        answer="B",
        category="geography",
        truth={"question": question, "choices": OPTIONS, "kind": "choice"},
    )


def test_requests_are_greedy_and_few_shot_prompts_skip_the_items_own_question() -> None:
    items = world_cot_items(2, seed=0)
    own = shots_from_items(items[:1])  # the first item's own question is among the shots
    bench = CoTBench([*items, _choice_item()], shots=[*own, *SHOTS], k_shots=2, max_new_tokens=33)
    reqs = bench.requests()
    assert [r.variant for r in reqs] == ["plain"] * 3
    assert all(not r.decoding.do_sample and r.decoding.max_new_tokens == 33 for r in reqs)
    first = reqs[0].messages[-1].text
    assert first == few_shot_prompt(SHOTS, items[0].truth["question"], 2)
    assert reqs[1].messages[-1].text == few_shot_prompt([*own, *SHOTS], items[1].truth["question"], 2)
    assert [m.role for m in reqs[2].messages] == ["system", "user"]  # earlier turns are kept
    zero = CoTBench(items).requests()
    assert zero[0].messages == items[0].prompt  # zero-shot: the item's own prompt, as SFT data asks
    with pytest.raises(DataError, match="k_shots=3 but 2 shots given"):
        CoTBench(items, shots=SHOTS[:2], k_shots=3)


def test_score_counts_accuracy_per_category_and_extraction_failures() -> None:
    items = [
        EvalItem(id="n1", benchmark="cot", prompt=[Message.user("a")], answer="1234", category="add",
                 truth={"kind": "number"}),
        EvalItem(id="n2", benchmark="cot", prompt=[Message.user("b")], answer="-7", category="sub",
                 truth={"kind": "number"}),
        EvalItem(id="n3", benchmark="cot", prompt=[Message.user("c")], answer="3", category="sub",
                 truth={"kind": "number"}),
        _choice_item(),
    ]  # fmt: skip
    responses = {
        "n1": {"plain": "1,000 + 234 = 1,234. The answer is 1,234."},
        "n2": {"plain": "4 - 11 = -7.\n#### -7"},
        "n3": {"plain": "I do not know."},
        "mc-1": {"plain": "The answer is (C)."},
    }
    result = CoTBench(items).score(responses)
    assert isinstance(result, Result)
    assert result.metrics == {
        "accuracy": 2 / 4,
        "accuracy.add": 1.0,
        "accuracy.geography": 0.0,
        "accuracy.sub": 0.5,
        "extraction_failure": 1 / 4,
        "n": 4.0,
    }
    assert [(r["prediction"], r["correct"]) for r in result.records] == [
        ("1234", True), ("-7", True), (None, False), ("C", False),
    ]  # fmt: skip


def test_run_with_a_tiny_text_llama_scores_its_own_generations() -> None:
    model, processor = build_tiny("llama", text_hidden=32, text_layers=1, heads=2)
    items = world_cot_items(3, seed=0)
    bench = CoTBench(items, shots=world_cot_shots(2, seed=0), k_shots=1, max_new_tokens=12)
    result = bench.run(model, processor, batch_size=2)
    assert result.benchmark == "cot" and result.settings["k_shots"] == 1
    assert [r["id"] for r in result.records] == [it.id for it in items]
    for record, item in zip(result.records, items, strict=True):
        assert record["response"]  # the random model says something
        assert record["prediction"] == extract_answer(record["response"], "number")
        assert record["correct"] == is_correct(record["prediction"], str(item.answer), "number")
    assert result.metrics["accuracy"] == sum(r["correct"] for r in result.records) / 3
    assert result.metrics["extraction_failure"] == sum(r["prediction"] is None for r in result.records) / 3
