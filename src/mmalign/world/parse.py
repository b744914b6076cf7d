"""Parser of the shapes-world grammar: turns any response into sentences and object mentions.

The grammar (docs/CONTRACTS.md, shared with ``grammar.py``):

- object sentence: ``There is a {size} {color} {shape} in the {cell}.`` — size, colour and
  ``in the {cell}`` are optional; the article may be ``a`` or ``an``;
- background sentence: ``The background is {background}.``;
- text sentence: ``The word {word} is written.``.

Sentences are split on ``.``, ``?`` and ``!`` with exact character offsets; runs of spaces inside or
between sentences are tolerated. A sentence is *well-formed* when it ends in ``.`` and matches one of
the three forms with words from the ``scene.py`` vocabularies (all shapes, colours, sizes, backgrounds,
words, 2×2 and 3×3 cells); anything else (including degenerate text such as ``in in in in``) is not
well-formed and gets ``kind=None``. Matching ignores letter case; attribute values are lower-cased.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from mmalign.world.grammar import noun_phrase
from mmalign.world.scene import BACKGROUNDS, CELLS_2X2, CELLS_3X3, COLORS_ALL, SHAPES_ALL, SIZES, WORDS

Span = tuple[int, int]
SentenceKind = Literal["object", "background", "text"]

_CELLS = frozenset(CELLS_2X2) | frozenset(CELLS_3X3)
_SENTENCE = re.compile(r"[^.?!]*[.?!]|[^.?!]+\Z")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Mention:
    """One object mentioned by a sentence; attributes the sentence omits are ``None``.

    ``start``/``end`` are the character offsets of the whole sentence in the response; the ``*_span``
    fields are the offsets of the single attribute words (``cell_span`` covers e.g. ``top left``), so
    a correction can rewrite exactly the wrong word.
    """

    shape: str
    color: str | None
    size: str | None
    cell: str | None
    start: int
    end: int
    shape_span: Span
    color_span: Span | None = None
    size_span: Span | None = None
    cell_span: Span | None = None
    article_span: Span | None = None

    def span_of(self, attribute: str) -> Span | None:
        """The character span of ``attribute`` ("shape", "color", "size", "cell" or "article")."""
        span: Span | None = getattr(self, f"{attribute}_span")
        return span

    def describe(self, with_cell: bool = False) -> str:
        """The mention as a noun phrase with its article, e.g. ``a large red circle``."""
        phrase = noun_phrase(self.shape, self.color, self.size)
        return f"{phrase} in the {self.cell}" if with_cell and self.cell else phrase


@dataclass(frozen=True)
class ParsedSentence:
    """One sentence of a response: its text, offsets ``[start, end)`` (terminator included) and meaning.

    ``value_span`` is the span of the background colour or of the written word for background/text
    sentences.
    """

    text: str
    start: int
    end: int
    kind: SentenceKind | None
    well_formed: bool
    mention: Mention | None = None
    background: str | None = None
    word: str | None = None
    value_span: Span | None = None


@dataclass(frozen=True)
class ParsedResponse:
    """All sentences of one response, in order."""

    text: str
    sentences: tuple[ParsedSentence, ...]

    @property
    def mentions(self) -> list[Mention]:
        return [s.mention for s in self.sentences if s.mention is not None]

    @property
    def n_well_formed(self) -> int:
        return sum(s.well_formed for s in self.sentences)

    @property
    def well_formed_rate(self) -> float:
        """Well-formed sentences / sentences; an empty response counts as one bad sentence (0.0)."""
        return self.n_well_formed / len(self.sentences) if self.sentences else 0.0


def parse_response(text: str) -> ParsedResponse:
    """Split ``text`` into sentences and parse each against the world grammar."""
    sentences = []
    for m in _SENTENCE.finditer(text):
        raw = m.group()
        lead = len(raw) - len(raw.lstrip())
        if not raw.strip():
            continue
        start = m.start() + lead
        end = m.start() + len(raw.rstrip())
        sentences.append(parse_sentence(text, start, end))
    return ParsedResponse(text=text, sentences=tuple(sentences))


def parse_sentence(text: str, start: int, end: int) -> ParsedSentence:
    """Parse ``text[start:end]`` (one sentence, terminator included) with offsets relative to ``text``."""
    sentence = text[start:end]
    bad = ParsedSentence(text=sentence, start=start, end=end, kind=None, well_formed=False)
    if not sentence.endswith("."):
        return bad
    words = [(w.group().lower(), (start + w.start(), start + w.end())) for w in _WORD.finditer(sentence[:-1])]
    return (
        _parse_object(sentence, start, end, words)
        or _parse_background(sentence, start, end, words)
        or _parse_text(sentence, start, end, words)
        or bad
    )


_Words = list[tuple[str, Span]]


def _parse_object(sentence: str, start: int, end: int, words: _Words) -> ParsedSentence | None:
    if len(words) < 4 or [w for w, _ in words[:2]] != ["there", "is"] or words[2][0] not in ("a", "an"):
        return None
    i = 3
    size = color = None
    if words[i][0] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i][0] in COLORS_ALL:
        color, i = words[i], i + 1
    if i >= len(words) or words[i][0] not in SHAPES_ALL:
        return None
    shape, i = words[i], i + 1
    cell = None
    if i < len(words):
        rest = words[i:]
        if len(rest) < 3 or [w for w, _ in rest[:2]] != ["in", "the"]:
            return None
        name = " ".join(w for w, _ in rest[2:])
        if name not in _CELLS:
            return None
        cell = (name, (rest[2][1][0], rest[-1][1][1]))
    mention = Mention(
        shape=shape[0],
        color=color[0] if color else None,
        size=size[0] if size else None,
        cell=cell[0] if cell else None,
        start=start,
        end=end,
        shape_span=shape[1],
        color_span=color[1] if color else None,
        size_span=size[1] if size else None,
        cell_span=cell[1] if cell else None,
        article_span=words[2][1],
    )
    return ParsedSentence(sentence, start, end, kind="object", well_formed=True, mention=mention)


def _parse_background(sentence: str, start: int, end: int, words: _Words) -> ParsedSentence | None:
    tokens = [w for w, _ in words]
    if len(tokens) != 4 or tokens[:3] != ["the", "background", "is"] or tokens[3] not in BACKGROUNDS:
        return None
    return ParsedSentence(
        sentence,
        start,
        end,
        kind="background",
        well_formed=True,
        background=tokens[3],
        value_span=words[3][1],
    )


def _parse_text(sentence: str, start: int, end: int, words: _Words) -> ParsedSentence | None:
    tokens = [w for w, _ in words]
    if len(tokens) != 5 or tokens[:2] != ["the", "word"] or tokens[3:] != ["is", "written"]:
        return None
    if tokens[2] not in WORDS:
        return None
    return ParsedSentence(
        sentence, start, end, kind="text", well_formed=True, word=tokens[2], value_span=words[2][1]
    )


def well_formed_rate(texts: Iterable[str]) -> float:
    """Well-formed sentences / all sentences over ``texts``; an empty response counts as 1 bad sentence."""
    good = total = 0
    for text in texts:
        parsed = parse_response(text)
        good += parsed.n_well_formed
        total += max(len(parsed.sentences), 1)
    return good / total if total else 0.0
