from __future__ import annotations

from mmalign.world.grammar import article, caption, caption_sentences, number_word, object_sentence, plural
from mmalign.world.scene import Scene, SceneObject

RED = SceneObject("circle", "red", "large", "top left")
ORANGE = SceneObject("star", "orange", "small", "bottom right")


def test_object_sentence_follows_the_fixed_grammar() -> None:
    assert object_sentence(RED) == "There is a large red circle in the top left."


def test_article_is_an_before_a_vowel_initial_word() -> None:
    assert article("orange") == "an"
    assert article("red") == "a"
    assert article("Orange") == "an"


def test_plural_and_number_words() -> None:
    assert [plural(s) for s in ("circle", "cross", "star")] == ["circles", "crosses", "stars"]
    assert [number_word(n) for n in (0, 2, 12, 13)] == ["zero", "two", "twelve", "13"]


def test_brief_caption_joins_object_sentences_in_scene_order_with_single_spaces() -> None:
    scene = Scene((RED, ORANGE), background="gray", text="cat")
    assert caption(scene) == (
        "There is a large red circle in the top left. There is a small orange star in the bottom right."
    )


def test_detailed_caption_adds_background_then_word() -> None:
    scene = Scene((RED,), background="gray", text="cat")
    assert caption(scene, detailed=True) == (
        "There is a large red circle in the top left. The background is gray. The word cat is written."
    )


def test_detailed_caption_without_word_has_no_text_sentence() -> None:
    scene = Scene((ORANGE,), background="black")
    assert caption_sentences(scene, detailed=True) == [
        "There is a small orange star in the bottom right.",
        "The background is black.",
    ]
