"""The oracle annotator: judgements, spans, minimal corrections, scores, critiques, preferences, noise."""

from __future__ import annotations

import random

import pytest

from mmalign.errors import DataError
from mmalign.world.grammar import caption, object_sentence
from mmalign.world.oracle import POSITIVE_CRITIQUE, Oracle, feedback_texts, judge_exact, match_mentions
from mmalign.world.parse import parse_response
from mmalign.world.scene import Scene, SceneObject, WorldConfig, make_scene

RED_CIRCLE = SceneObject("circle", "red", "large", "top left")
BLUE_SQUARE = SceneObject("square", "blue", "small", "top right")
GREEN_CIRCLE = SceneObject("circle", "green", "small", "bottom left")
SCENE = Scene(objects=(RED_CIRCLE, BLUE_SQUARE, GREEN_CIRCLE), background="white", text="cat")
NO_WORD = Scene(objects=(BLUE_SQUARE,), background="gray", text=None)
PERFECT = caption(SCENE)
MIXED = (
    "There is a large red circle in the top left. There is a yellow star. "
    "There is a small orange square in the top right. in in in."
)


def test_perfect_caption_gets_no_spans_no_changes_and_top_scores() -> None:
    oracle = Oracle()
    assert oracle.hallucinated_spans(SCENE, PERFECT) == []
    fixed = oracle.correct(SCENE, PERFECT)
    assert (fixed.text, fixed.original_spans, fixed.corrected_spans) == (PERFECT, [], [])
    assert oracle.aspect_scores(SCENE, PERFECT) == dict.fromkeys(
        ["correctness", "coverage", "conciseness", "helpfulness", "instruction_following"], 4.0
    )
    assert oracle.aspect_scores(SCENE, caption(SCENE, detailed=True), task="detailed")["coverage"] == 4.0
    assert oracle.reward(SCENE, PERFECT) == 4.0
    assert oracle.rating_0_6(SCENE, PERFECT) == 6
    assert oracle.critique(SCENE, PERFECT) == POSITIVE_CRITIQUE


def test_judge_classifies_each_mention_and_records_coverage() -> None:
    j = judge_exact(SCENE, MIXED)
    assert [m.status for m in j.mentions] == ["correct", "hallucination", "attribute"]
    assert j.mentions[2].obj == BLUE_SQUARE and j.mentions[2].wrong == ("color",)
    assert j.covered == (True, True, False)
    assert [s.text for s in j.unparsed] == ["in in in."]
    assert (j.n_object_hallucinations, j.n_attribute_errors, j.n_errors, j.n_claims) == (1, 1, 2, 3)


def test_hallucinated_spans_are_whole_sentences_for_objects_and_single_words_for_attributes() -> None:
    spans = Oracle().hallucinated_spans(SCENE, MIXED)
    assert spans == [(45, 68), (86, 92)]
    assert [MIXED[a:b] for a, b in spans] == ["There is a yellow star.", "orange"]


def test_correction_deletes_hallucinated_and_garbage_sentences_and_rewrites_only_wrong_words() -> None:
    fixed = Oracle().correct(SCENE, MIXED)
    assert (
        fixed.text
        == "There is a large red circle in the top left. There is a small blue square in the top right."
    )
    assert fixed.original_spans == [(45, 68), (86, 92), (118, 127)]
    assert [MIXED[a:b] for a, b in fixed.original_spans] == ["There is a yellow star.", "orange", "in in in."]
    assert fixed.corrected_spans == [(62, 66)]
    assert fixed.text[62:66] == "blue"


def test_correction_fixes_the_article_when_the_first_word_changes() -> None:
    text = "There is an orange circle in the top left."
    fixed = Oracle().correct(SCENE, text)
    assert fixed.text == "There is a red circle in the top left."
    assert [text[a:b] for a, b in fixed.original_spans] == ["an", "orange"]
    assert fixed.corrected_spans == [(9, 10), (11, 14)]


def test_correction_of_a_word_in_an_image_without_text_deletes_the_sentence() -> None:
    text = "The word fish is written. There is a small blue square in the top right."
    oracle = Oracle()
    assert oracle.hallucinated_spans(NO_WORD, text) == [(0, 25)]
    fixed = oracle.correct(NO_WORD, text)
    assert (fixed.text, fixed.original_spans, fixed.corrected_spans) == (
        "There is a small blue square in the top right.",
        [(0, 25)],
        [],
    )


def test_wrong_background_and_word_are_rewritten_in_place() -> None:
    text = "The background is black.  The word sun is written."
    oracle = Oracle()
    assert [text[a:b] for a, b in oracle.hallucinated_spans(SCENE, text)] == ["black", "sun"]
    fixed = oracle.correct(SCENE, text)
    assert fixed.text == "The background is white.  The word cat is written."
    assert [fixed.text[a:b] for a, b in fixed.corrected_spans] == ["white", "cat"]


def test_correction_of_an_all_wrong_response_is_empty() -> None:
    fixed = Oracle().correct(SCENE, "There is a star. in in in")
    assert (fixed.text, fixed.original_spans) == ("", [(0, 16), (17, 25)])


def test_matching_is_one_to_one_and_prefers_the_best_total_match_over_greedy() -> None:
    # greedy would give the unlocated red circle the top-left one and leave the located one 2 errors
    text = "There is a red circle. There is a red circle in the top left."
    j = judge_exact(SCENE, text)
    assert [(m.obj, m.wrong) for m in j.mentions] == [(GREEN_CIRCLE, ("color",)), (RED_CIRCLE, ())]
    assert (
        Oracle().correct(SCENE, text).text
        == "There is a green circle. There is a red circle in the top left."
    )
    mentions = parse_response(text).mentions
    assert match_mentions(mentions, [RED_CIRCLE, GREEN_CIRCLE]) == [1, 0]
    assert match_mentions(mentions, [RED_CIRCLE]) == [0, None]  # tie: the earlier mention


def test_a_surplus_contradicting_mention_is_an_extra_object_and_a_consistent_one_a_repeat() -> None:
    text = "There is a blue square. There is a red square. There is a square in the top right."
    j = judge_exact(NO_WORD, text)
    assert [m.status for m in j.mentions] == ["correct", "extra", "repeat"]
    assert j.n_object_hallucinations == 1 and j.n_repeats == 1
    oracle = Oracle()
    assert oracle.critique(NO_WORD, text) == (
        "The response mentions a red square, but there is only one square in the image. "
        "The response mentions the square more than once."
    )
    assert oracle.correct(NO_WORD, text).text == "There is a blue square. There is a square in the top right."


def test_aspect_scores_of_a_mixed_response_are_exact() -> None:
    oracle = Oracle()
    scores = oracle.aspect_scores(SCENE, MIXED)
    # 3 claims (1 correct) + 1 unparseable; 2 of 3 objects covered, 1 accurately; 2 of 4 sentences useful
    assert scores == pytest.approx(
        {
            "correctness": 1.0,
            "coverage": 8 / 3,
            "conciseness": 2.0,
            "helpfulness": 4 * (1 / 3) * (2 / 4),
            "instruction_following": 3.0,
        }
    )
    assert oracle.reward(SCENE, MIXED) == pytest.approx((2 * 1 + 8 / 3 + 0.5 * 2 + 2 / 3 + 0.5 * 3) / 5)
    detailed = oracle.aspect_scores(SCENE, PERFECT, task="detailed")
    assert detailed["coverage"] == pytest.approx(4 * 3 / 5)
    assert detailed["instruction_following"] == 3.0  # no background sentence
    with pytest.raises(DataError, match="task"):
        oracle.aspect_scores(SCENE, PERFECT, task="poem")


@pytest.mark.parametrize("text", ["", "in in in in", "the the the. a a a a."])
def test_empty_or_garbage_responses_are_unhelpful_and_never_correct(text: str) -> None:
    oracle = Oracle()
    scores = oracle.aspect_scores(SCENE, text)
    assert scores["correctness"] <= 2 and scores["helpfulness"] == 0.0 and max(scores.values()) < 4
    assert oracle.reward(SCENE, text) < oracle.reward(SCENE, "There is a red circle.")
    assert oracle.rating_0_6(SCENE, text) == 3


def test_correctness_is_at_most_three_with_any_error() -> None:
    text = PERFECT + " There is a red star."
    assert Oracle().aspect_scores(SCENE, text)["correctness"] == 3.0


def test_rating_follows_mmhal_levels() -> None:
    oracle = Oracle()
    cases = {
        PERFECT: 6,
        PERFECT + " in in.": 5,
        "There is a red circle.": 4,
        PERFECT + " There is a star.": 2,
        MIXED: 1,
        "There is a star.": 0,
    }
    assert {text: oracle.rating_0_6(SCENE, text) for text in cases} == cases


def test_critique_names_every_error_in_order() -> None:
    assert Oracle().critique(SCENE, MIXED) == (
        "The response mentions a yellow star, which is not in the image. "
        "The square is blue, not orange. "
        "The response contains 1 sentence that is not well-formed. "
        "The response does not mention the small green circle in the bottom left."
    )
    # one wrong cell is a closer match to the red circle than wrong colour and size to the green one
    text = "There is a large red circle in the bottom left. The background is gray. The word cat is written."
    assert Oracle().critique(SCENE, text) == (
        "The red circle is in the top left, not in the bottom left. "
        "The background is white, not gray. "
        "The response does not mention the small blue square in the top right. "
        "The response does not mention the small green circle in the bottom left."
    )
    assert (
        Oracle()
        .critique(SCENE, "There is a small red circle in the bottom left.")
        .startswith("The circle in the bottom left is green, not red. ")
    )
    assert Oracle().critique(
        NO_WORD, "The word cat is written. There is a small blue square in the top right."
    ) == ("The response mentions the word cat, but no word is written in the image.")


def test_prefer_and_rank_order_by_reward_with_deterministic_ties() -> None:
    oracle = Oracle()
    partial = "There is a large red circle in the top left."
    assert oracle.prefer(SCENE, PERFECT, MIXED) == 0
    assert oracle.prefer(SCENE, MIXED, PERFECT) == 1
    # equal reward: the shorter response wins, in either argument order
    tie_a, tie_b = "There is a red circle. in.", "There is a red circle. in in."
    assert oracle.reward(SCENE, tie_a) == oracle.reward(SCENE, tie_b)
    assert (oracle.prefer(SCENE, tie_a, tie_b), oracle.prefer(SCENE, tie_b, tie_a)) == (0, 1)
    assert oracle.prefer(SCENE, PERFECT, PERFECT) == 0
    order, scores = oracle.rank(SCENE, [MIXED, "", PERFECT, partial])
    assert order == [2, 3, 0, 1]
    assert scores[2]["reward"] == 4.0 and scores[1]["reward"] == 0.0 and set(scores[0]) >= {"correctness"}


def test_noise_flips_labels_deterministically() -> None:
    always = Oracle(noise=1.0)
    assert always.prefer(SCENE, PERFECT, MIXED) == 1
    noisy = Oracle(noise=0.3, seed=5)
    pairs = [(caption(make_scene(1, i)), "There is a star.") for i in range(200)]
    scenes = [make_scene(1, i) for i in range(200)]
    labels = [noisy.prefer(s, a, b) for s, (a, b) in zip(scenes, pairs, strict=True)]
    assert labels == [
        Oracle(noise=0.3, seed=5).prefer(s, a, b) for s, (a, b) in zip(scenes, pairs, strict=True)
    ]
    assert 0.2 < sum(labels) / len(labels) < 0.4
    with pytest.raises(DataError, match="noise"):
        Oracle(noise=1.5)


def test_missed_errors_are_overlooked_at_the_given_rate_and_deterministically() -> None:
    assert Oracle(missed_error_rate=1.0).hallucinated_spans(SCENE, MIXED) == []
    assert Oracle(missed_error_rate=1.0).correct(SCENE, MIXED).original_spans == [(118, 127)]  # garbage only
    half = Oracle(missed_error_rate=0.5, seed=3)
    texts = [f"There is a red star in the top left. There is a small purple square. #{i}" for i in range(300)]
    found = [len(half.hallucinated_spans(NO_WORD, t)) for t in texts]
    assert found == [len(Oracle(missed_error_rate=0.5, seed=3).hallucinated_spans(NO_WORD, t)) for t in texts]
    assert 0.4 < sum(found) / (2 * len(texts)) < 0.6


def test_facts_are_the_detailed_caption_sentences_and_an_object_list() -> None:
    assert Oracle().facts(SCENE) == [
        "There is a large red circle in the top left.",
        "There is a small blue square in the top right.",
        "There is a small green circle in the bottom left.",
        "The background is white.",
        "The word cat is written.",
        "The objects are a large red circle, a small blue square and a small green circle.",
    ]
    assert Oracle().facts(NO_WORD)[-1] == "The objects are a small blue square."


def test_corrections_of_randomly_corrupted_captions_are_error_free_and_keep_coverage() -> None:
    rng = random.Random(0)
    cfg = WorldConfig(grid=3, n_shapes=6, n_colors=6, max_objects=4)
    oracle = Oracle()
    for index in range(150):
        scene = make_scene(11, index, cfg)
        sentences = [object_sentence(o) for o in scene.objects]
        k = rng.randrange(len(sentences))
        obj = scene.objects[k]
        sentences[k] = object_sentence(SceneObject(obj.shape, rng.choice(cfg.colors), obj.size, obj.cell))
        absent = [s for s in cfg.shapes if s not in scene.shapes]
        sentences.insert(rng.randrange(len(sentences) + 1), f"There is a {absent[0]}.")
        text = " ".join(sentences)
        fixed = oracle.correct(scene, text)
        assert fixed.text == caption(scene)
        after = judge_exact(scene, fixed.text)
        assert after.n_errors == 0 and after.coverage == 1.0
        assert oracle.rating_0_6(scene, fixed.text) == 6 > oracle.rating_0_6(scene, text)


def test_feedback_texts_use_every_critique_template_for_vocabulary_building() -> None:
    joined = " ".join(feedback_texts())
    for template in [
        POSITIVE_CRITIQUE,
        "which is not in the image.",
        "but there is only one square",
        "but there are only two squares",
        "more than once.",
        "The circle is red, not green.",
        "not in the bottom left.",
        "The background is white, not gray.",
        "The word written is cat, not sun.",
        "but no word is written in the image.",
        "1 sentence that is not well-formed.",
        "2 sentences that are not well-formed.",
        "The response does not mention",
        "The response is empty.",
        "The objects are",
    ]:
        assert template in joined


def test_misidentified_object_is_rewritten_to_the_true_object_of_its_cell() -> None:
    scene = Scene(
        (
            SceneObject("circle", "red", "small", "top left"),
            SceneObject("star", "blue", "large", "bottom right"),
        )
    )
    wrong = "There is a small red square in the top left. There is a large blue star in the bottom right."
    fixed = Oracle().correct(scene, wrong)
    assert (
        fixed.text
        == "There is a small red circle in the top left. There is a large blue star in the bottom right."
    )
    assert fixed.original_spans == [(0, 44)] and fixed.corrected_spans == [(0, 44)]


def test_invented_object_in_an_empty_or_already_described_cell_is_deleted() -> None:
    scene = Scene((SceneObject("circle", "red", "small", "top left"),))
    extra = "There is a small red circle in the top left. There is a green triangle in the top right."
    assert Oracle().correct(scene, extra).text == "There is a small red circle in the top left."
    twice = "There is a small red square in the top left. There is a small red circle in the top left."
    fixed = Oracle().correct(scene, twice)
    assert fixed.text == "There is a small red circle in the top left." and fixed.original_spans == [(0, 44)]
