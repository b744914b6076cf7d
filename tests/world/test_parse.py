"""The world-grammar parser: sentence offsets, mentions with attribute spans, well-formedness."""

from __future__ import annotations

import pytest

from mmalign.world.grammar import caption
from mmalign.world.parse import parse_response, well_formed_rate
from mmalign.world.scene import BACKGROUNDS, CELLS_3X3, SHAPES_ALL, WORDS, WorldConfig, make_scene


def test_full_object_sentence_gives_every_attribute_and_its_exact_span() -> None:
    text = "There is a large red circle in the top left."
    (s,) = parse_response(text).sentences
    m = s.mention
    assert (s.kind, s.well_formed, s.start, s.end) == ("object", True, 0, 44)
    assert m is not None
    assert (m.shape, m.color, m.size, m.cell, m.start, m.end) == ("circle", "red", "large", "top left", 0, 44)
    assert m.size_span == (11, 16) and text[11:16] == "large"
    assert m.color_span == (17, 20) and text[17:20] == "red"
    assert m.shape_span == (21, 27) and text[21:27] == "circle"
    assert m.cell_span == (35, 43) and text[35:43] == "top left"
    assert m.article_span == (9, 10)


def test_size_color_and_cell_are_optional_and_none_when_omitted() -> None:
    parsed = parse_response(
        "There is a star. There is an orange heart. There is a small cross in the center."
    )
    got = [(m.shape, m.color, m.size, m.cell) for m in parsed.mentions]
    assert got == [
        ("star", None, None, None),
        ("heart", "orange", None, None),
        ("cross", None, "small", "center"),
    ]
    assert parsed.mentions[0].color_span is None and parsed.mentions[1].cell_span is None


def test_sentence_offsets_are_exact_with_extra_and_missing_spaces() -> None:
    text = "  There is a red circle.There is a blue square.   The background is gray.  "
    parsed = parse_response(text)
    assert [(s.start, s.end) for s in parsed.sentences] == [(2, 24), (24, 47), (50, 73)]
    assert [text[s.start : s.end] for s in parsed.sentences] == [s.text for s in parsed.sentences]
    assert [s.kind for s in parsed.sentences] == ["object", "object", "background"]
    assert parsed.well_formed_rate == 1.0


def test_background_and_text_sentences_record_the_value_and_its_span() -> None:
    text = "The background is black. The word moon is written."
    bg, word = parse_response(text).sentences
    assert (bg.kind, bg.background, bg.value_span) == ("background", "black", (18, 23))
    assert (word.kind, word.word, word.value_span, word.start) == ("text", "moon", (34, 38), 25)
    assert bg.mention is None and word.mention is None


@pytest.mark.parametrize(
    "sentence",
    [
        "in in in in",  # degenerate repetition, no terminator
        "in in in in.",
        "There is a red circle in in the top left.",
        "There is a red circle in the middle.",  # not a cell name
        "There is a red hexagon.",  # unknown shape
        "There is red circle.",  # article missing
        "There is a circle red.",
        "Is there a red circle?",
        "There is a red circle!",
        "The background is pink.",
        "The word dog is written.",
        "The word is written.",
        ".",
    ],
)
def test_text_outside_the_grammar_is_not_well_formed_and_has_no_kind(sentence: str) -> None:
    (s,) = parse_response(sentence).sentences
    assert (s.kind, s.well_formed, s.mention) == (None, False, None)


def test_unterminated_tail_is_its_own_sentence_and_not_well_formed() -> None:
    parsed = parse_response("There is a red circle. There is a blue")
    assert [(s.start, s.end, s.well_formed) for s in parsed.sentences] == [(0, 22, True), (23, 38, False)]
    assert parsed.well_formed_rate == 0.5
    assert len(parsed.mentions) == 1


def test_well_formed_rate_counts_an_empty_response_as_one_bad_sentence() -> None:
    texts = ["There is a red circle. in in in.", "", "The background is white."]
    # sentences: 2 (1 good) + 1 empty (bad) + 1 good -> 2 / 4
    assert well_formed_rate(texts) == 0.5
    assert parse_response("").sentences == ()
    assert parse_response("   ").well_formed_rate == 0.0


def test_every_vocabulary_word_and_3x3_cell_parses() -> None:
    for shape in SHAPES_ALL:
        for cell in CELLS_3X3:
            (m,) = parse_response(f"There is a small {shape} in the {cell}.").mentions
            assert (m.shape, m.cell) == (shape, cell)
    assert [parse_response(f"The background is {b}.").sentences[0].background for b in BACKGROUNDS] == list(
        BACKGROUNDS
    )
    assert [parse_response(f"The word {w} is written.").sentences[0].word for w in WORDS] == list(WORDS)


def test_parser_reads_back_every_generated_detailed_caption() -> None:
    for grid in (2, 3):
        cfg = WorldConfig(grid=grid, n_shapes=6, n_colors=6, max_objects=4, text_prob=0.5)
        for index in range(200):
            scene = make_scene(7, index, cfg)
            parsed = parse_response(caption(scene, detailed=True))
            assert parsed.well_formed_rate == 1.0
            got = [(m.shape, m.color, m.size, m.cell) for m in parsed.mentions]
            assert got == [(o.shape, o.color, o.size, o.cell) for o in scene.objects]
            assert [s.background for s in parsed.sentences if s.kind == "background"] == [scene.background]
            assert [s.word for s in parsed.sentences if s.kind == "text"] == (
                [scene.text] if scene.text else []
            )


def test_mention_describe_uses_the_right_article() -> None:
    (m,) = parse_response("There is a large orange star in the top right.").mentions
    assert m.describe() == "a large orange star"
    assert m.describe(with_cell=True) == "a large orange star in the top right"
    (m,) = parse_response("There is a orange star.").mentions
    assert m.describe() == "an orange star"
