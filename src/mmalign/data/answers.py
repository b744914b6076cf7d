"""Final answers of free-form responses: numbers (GSM8K ``####``, ``\\boxed{}``, "the answer is …") and
option letters, robust to echoed question numbers, markdown and few-shot continuations.

Used by the chain-of-thought benchmark (:mod:`mmalign.eval.cot`) and by verifiable rewards
(:class:`mmalign.rollout.rewards.ExactAnswerReward`), so that training rewards and evaluation read an
answer the same way.

- :func:`extract_answer` reads the final answer (see its docstring for the order of the rules);
- :func:`is_correct` compares a prediction with the reference (numbers by value: ``12.0 == 12``);
- :func:`normalize_number` gives a number's canonical string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

from mmalign.errors import DataError

__all__ = [
    "LETTERS",
    "NUMBER_WORDS",
    "AnswerKind",
    "extract_answer",
    "is_correct",
    "normalize_number",
]

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve",
)  # fmt: skip
"""Number words read as numbers after an answer marker (``zero`` … ``twelve``; the shapes world's too)."""

AnswerKind = Literal["number", "choice", "auto"]
LETTERS = "ABCDEFGHIJ"
"""Option letters; a multiple-choice item with ``m`` choices uses the first ``m``."""

_CONTINUATION = re.compile(r"\n\s*(?:Q|Question)\s*:", re.IGNORECASE)
"""A model that keeps following the few-shot pattern starts the next example: cut there."""
_GSM8K_FINAL = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_MARKER = re.compile(
    r"\b(?:(?P<opt>option|choice)|answer)\s*(?:is|:|=|would be|will be|should be|must be)\s*[:=]?\s*",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?!\d|\.\d)")
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number: ``"1,234"`` → ``"1234"``, ``"$12.50"`` → ``"12.5"``, ``"12.0"`` →
    ``"12"``, ``"−5"`` → ``"-5"``, ``"50%"`` → ``"50"``; None when ``text`` is not a number."""
    t = text.strip().replace("−", "-").replace(",", "").replace("$", "").rstrip(".").removesuffix("%")
    try:
        value = Decimal(t.strip())
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _strip_continuation(text: str) -> str:
    match = _CONTINUATION.search(text)
    return text[: match.start()] if match else text


def _first_number(segment: str) -> str | None:
    """The first number (digits, or a number word ``zero`` … ``twelve``) of ``segment``, normalised."""
    digits = _NUMBER.search(segment)
    word = _NUMBER_WORD.search(segment)
    if word is not None and (digits is None or word.start() < digits.start()):
        return str(NUMBER_WORDS.index(word.group(1).lower()))
    return normalize_number(digits.group()) if digits else None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def _extract_number(text: str) -> str | None:
    for pattern in (_GSM8K_FINAL, _BOXED):
        found = pattern.findall(text)
        if found and (value := _first_number(found[-1])) is not None:
            return value
    for marker in reversed(list(_MARKER.finditer(text))):
        if (value := _number_after_marker(text[marker.end() :])) is not None:
            return value
    return _last_number(text)


def _letter_after(segment: str, letters: str, option_context: bool, strict: bool = False) -> str | None:
    """The option letter at the start of ``segment`` (the text after an answer marker).

    ``(c)``, ``[c]``, ``C)``, ``C.``, ``option C`` and a bare ``C`` before a space are letters; a lower-case
    bare letter only after "option"/"choice" or before punctuation / the end (``answer is a circle`` is
    not option A). ``strict`` (no choices known): a bare letter must be bracketed or end the sentence.
    """
    m = re.match(
        r"(?:(?P<kw>option|choice|letter)\s+)?(?P<open>[(\[])?\s*(?P<letter>[A-Za-z])\s*(?P<close>[)\]])?",
        segment,
        re.IGNORECASE,
    )
    if m is None:
        return None
    letter, rest = m.group("letter"), segment[m.end() :]
    bracketed = m.group("open") is not None and m.group("close") is not None
    ends = re.match(r"\s*(?:[.:,;!]|$)", rest) is not None
    if not (bracketed or m.group("close") or ends or re.match(r"\s", rest)):
        return None  # a longer word ("answer is Paris")
    lower_ok = option_context or m.group("kw") is not None
    if not (bracketed or m.group("close") or ends) and (strict or (letter.islower() and not lower_ok)):
        return None  # "answer is a circle", "answer is I think 5"
    return letter.upper() if letter.upper() in letters else None


def _number_after_marker(segment: str) -> str | None:
    """The number right after an answer marker; else the last number of that sentence (``the answer is
    the sum of 3 and 4, which is 7``); else the first number further on."""
    head = segment.lstrip(" \t:=([")
    if (digits := _NUMBER.match(head)) is not None:
        return normalize_number(digits.group())
    if (word := _NUMBER_WORD.match(head)) is not None:
        return str(NUMBER_WORDS.index(word.group(1).lower()))
    end = _SENTENCE_END.search(segment)
    if end is not None and (value := _last_number(segment[: end.start()])) is not None:
        return value
    return _first_number(segment)


def _choice_by_text(segment: str, choices: Sequence[str]) -> str | None:
    """The letter of the one choice whose text occurs in ``segment`` (a choice inside a longer found
    choice does not count); None when none or several do."""
    low = segment.casefold()
    found = [
        k
        for k, c in enumerate(choices)
        if (t := c.strip().casefold().rstrip(".")) and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", low)
    ]
    texts = [choices[k].strip().casefold() for k in found]
    kept = [k for k, t in zip(found, texts, strict=True) if not any(t != o and t in o for o in texts)]
    return LETTERS[kept[0]] if len(kept) == 1 else None


def _extract_choice(text: str, choices: Sequence[str] | None, strict: bool = False) -> str | None:
    letters = LETTERS[: len(choices)] if choices else LETTERS
    for marker in reversed(list(_MARKER.finditer(text))):
        segment = text[marker.end() :]
        letter = _letter_after(segment, letters, marker.group("opt") is not None, strict)
        if letter is None and choices:
            end = _SENTENCE_END.search(segment)
            letter = _choice_by_text(segment[: end.start()] if end else segment, choices)
        if letter is not None:
            return letter
    if strict:
        return None
    bracketed = [x for x in re.findall(r"\(([A-J])\)", text) if x in letters]
    if len(bracketed) >= 2:  # "(A) is wrong, so (C)"
        return bracketed[-1]
    lead = re.match(r"\s*[(\[]?([A-J])(?:[)\].:,]|\s*$)", text)
    if lead and lead.group(1) in letters:
        return lead.group(1)
    if bracketed:
        return bracketed[-1]
    return _choice_by_text(text, choices) if choices else None


def extract_answer(text: str, kind: AnswerKind = "auto", choices: Sequence[str] | None = None) -> str | None:
    """The final answer of ``text``, normalised, or None when none can be read.

    The text is first cut where the model starts a new few-shot example (a line starting ``Q:`` /
    ``Question:``); markdown bold is ignored.

    ``number``: the value after the last ``####`` (GSM8K), else in the last ``\\boxed{}``, else the first
    number after the last answer marker (``answer is`` / ``answer:`` / ``final answer =`` …, so numbers the
    model echoes from the question do not count), else the last number of the text. Numbers are
    normalised by :func:`normalize_number`; ``zero`` … ``twelve`` after a marker count as numbers.

    ``choice``: the option letter after the last marker (``answer: (B)``, ``the correct option is c``),
    or the option whose *text* follows it; else the last ``(B)`` when several are written; else a leading
    ``B)`` / ``(B)`` / ``B.`` / a bare ``B``; else a single ``(B)``; else the one option whose text the
    response contains. With ``choices`` only their
    letters are valid. Returns the upper-case letter.

    ``auto``: ``choice`` when ``choices`` is given; otherwise a letter right after a marker, else a
    number.
    """
    clean = _strip_continuation(text).replace("**", "")
    if kind == "number":
        return _extract_number(clean)
    if kind == "choice":
        return _extract_choice(clean, choices)
    if kind != "auto":
        raise DataError(f"kind must be number, choice or auto, got {kind!r}", field="kind")
    if choices:
        return _extract_choice(clean, choices)
    return _extract_choice(clean, None, strict=True) or _extract_number(clean)


def is_correct(pred: str | None, gold: str, kind: AnswerKind = "auto") -> bool:
    """Whether the extracted ``pred`` matches the reference ``gold``: numbers by value (``"12.0"`` vs
    ``"12"``, ``"1,234"`` vs ``"1234"``), option letters case-insensitively (``"(b)"`` vs ``"B"``),
    anything else (``auto``) as case-folded text. A missing prediction is wrong."""
    if pred is None:
        return False
    p, g = normalize_number(pred), normalize_number(gold)
    if kind == "number" or (kind == "auto" and p is not None and g is not None):
        return p is not None and g is not None and Decimal(p) == Decimal(g)

    def canon(s: str) -> str:
        return s.strip().strip("().[] ").casefold()

    return canon(pred) == canon(gold)
