"""Oracle pair builders: exact chosen/rejected texts, spans, scores and margins on hand-made scenes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from mmalign.data.schema import ImageRef, Message
from mmalign.errors import DataError
from mmalign.world.corpus import eval_scenes
from mmalign.world.grammar import (
    CAPTION_PROMPT,
    DETAILED_CAPTION_PROMPT,
    caption,
    caption_sentences,
    object_sentence,
)
from mmalign.world.oracle import POSITIVE_CRITIQUE, Oracle
from mmalign.world.pairs import corrected_pair, inject_midcaption_errors, ranked_pair, ranking_record, task_of
from mmalign.world.parse import parse_response
from mmalign.world.scene import Scene, SceneObject, WorldConfig

CIRCLE = SceneObject("circle", "red", "large", "top left")
SQUARE = SceneObject("square", "blue", "small", "top right")
STAR = SceneObject("star", "yellow", "small", "bottom right")
SCENE = Scene(objects=(CIRCLE, SQUARE, STAR), background="gray", text="cat")
PROMPT = [Message.user(CAPTION_PROMPT, n_images=1)]
IMAGE = ImageRef(path="images/scene.png")

TRUE = (
    "There is a large red circle in the top left. There is a small blue square in the top right. "
    "There is a small yellow star in the bottom right."
)
# a false triangle between true sentences and a wrong colour (with its article) on the middle object
MIDDLE_ERRORS = (
    "There is a large red circle in the top left. There is a green triangle in the bottom left. "
    "There is an orange square in the top right. There is a small yellow star in the bottom right."
)
ONLY_CIRCLE = "There is a large red circle in the top left."


def test_corrected_pair_rejects_the_response_and_chooses_the_minimal_correction() -> None:
    pair = corrected_pair(SCENE, PROMPT, MIDDLE_ERRORS, id="p0", image_ref=IMAGE)
    assert pair is not None
    assert pair.rejected == MIDDLE_ERRORS
    assert pair.chosen == (
        "There is a large red circle in the top left. There is a blue square in the top right. "
        "There is a small yellow star in the bottom right."
    )
    # rejected: the whole false sentence, then the article and the colour word
    assert pair.rejected_spans == [(45, 90), (100, 102), (103, 109)]
    assert [MIDDLE_ERRORS[a:b] for a, b in pair.rejected_spans] == [
        "There is a green triangle in the bottom left.",
        "an",
        "orange",
    ]
    # chosen: only the rewritten words (the deletion leaves no span)
    assert pair.chosen_spans == [(54, 55), (56, 60)]
    assert [pair.chosen[a:b] for a, b in pair.chosen_spans] == ["a", "blue"]
    assert pair.images == [IMAGE] and pair.prompt == PROMPT and pair.source == "oracle-corrected"


def test_corrected_pair_carries_scores_critiques_facts_and_the_reward_margin() -> None:
    oracle = Oracle()
    pair = corrected_pair(SCENE, PROMPT, MIDDLE_ERRORS, id="p0", image_ref=IMAGE, oracle=oracle)
    assert pair is not None and pair.scores is not None and pair.critique is not None
    assert pair.scores["chosen"] == dict.fromkeys(pair.scores["chosen"], 4.0)
    # 4 claims, 2 wrong; 3 of 4 sentences useful; circle and star accurately described
    assert pair.scores["rejected"] == {
        "correctness": 2.0,
        "coverage": 4.0,
        "conciseness": 3.0,
        "helpfulness": 2.0,
        "instruction_following": 4.0,
    }
    # reward = (2·2 + 1·4 + 0.5·3 + 1·2 + 0.5·4) / 5 = 2.7 for rejected, 4.0 for chosen
    assert pair.margin == pytest.approx(1.3)
    assert pair.margin == pytest.approx(
        oracle.reward(SCENE, pair.chosen) - oracle.reward(SCENE, MIDDLE_ERRORS)
    )
    assert pair.critique == {
        "chosen": POSITIVE_CRITIQUE,
        "rejected": "The response mentions a green triangle, which is not in the image. "
        "The square is blue, not orange.",
    }
    assert pair.facts == oracle.facts(SCENE)
    assert pair.meta["scene"] == SCENE.to_dict() and pair.meta["task"] == "caption"


def test_corrected_pair_is_none_for_a_correct_an_empty_or_an_unsalvageable_response() -> None:
    assert corrected_pair(SCENE, PROMPT, TRUE, id="p", image_ref=IMAGE) is None
    # an incomplete but correct response has nothing to correct either
    assert corrected_pair(SCENE, PROMPT, ONLY_CIRCLE, id="p", image_ref=IMAGE) is None
    assert corrected_pair(SCENE, PROMPT, "", id="p", image_ref=IMAGE) is None
    # every sentence deleted -> the correction is empty, which a pair cannot hold
    assert corrected_pair(SCENE, PROMPT, "in in in. There is a heart.", id="p", image_ref=IMAGE) is None


def test_corrected_pair_scores_a_detailed_prompt_as_a_detailed_caption() -> None:
    detailed = [Message.user(DETAILED_CAPTION_PROMPT, n_images=1)]
    assert task_of(detailed) == "detailed" and task_of(PROMPT) == "caption"
    response = TRUE + " The background is white."
    pair = corrected_pair(SCENE, detailed, response, id="d", image_ref=IMAGE)
    assert pair is not None and pair.scores is not None
    assert pair.chosen == TRUE + " The background is gray."
    assert pair.meta["task"] == "detailed"
    # the word "cat" is never mentioned: coverage 4 of 5 items (3 objects, background, word)
    assert pair.scores["chosen"]["coverage"] == pytest.approx(4.0 * 4 / 5)


def test_ranked_pair_picks_the_best_and_the_worst_and_their_reward_difference() -> None:
    oracle = Oracle()
    responses = [ONLY_CIRCLE, MIDDLE_ERRORS, TRUE, "in in in.", ""]
    pair = ranked_pair(SCENE, PROMPT, responses, id="r0", image_ref=IMAGE, oracle=oracle)
    assert pair is not None and pair.scores is not None
    assert (pair.chosen, pair.rejected) == (TRUE, "in in in.")
    assert pair.margin == pytest.approx(4.0)  # rewards 4.0 and 0.0
    assert pair.meta["chosen_index"] == 2 and pair.meta["rejected_index"] == 3 and pair.meta["k"] == 5
    assert pair.scores["rejected"] == dict.fromkeys(pair.scores["rejected"], 0.0)
    assert pair.source == "oracle-ranked" and pair.chosen_spans is None

    pair = ranked_pair(SCENE, PROMPT, [ONLY_CIRCLE, MIDDLE_ERRORS], id="r1", image_ref=IMAGE, oracle=oracle)
    assert pair is not None
    # coverage 1/3 without errors (2.9333) beats full coverage with two errors (2.7)
    assert (pair.chosen, pair.rejected) == (ONLY_CIRCLE, MIDDLE_ERRORS)
    assert pair.margin == pytest.approx(
        oracle.reward(SCENE, ONLY_CIRCLE) - oracle.reward(SCENE, MIDDLE_ERRORS)
    )
    assert pair.margin == pytest.approx(44 / 15 - 2.7)


def test_ranked_pair_is_none_when_all_responses_tie_or_fewer_than_two_are_usable() -> None:
    terse = "There is a red circle in the top left. There is a blue square. There is a star."
    assert Oracle().reward(SCENE, terse) == Oracle().reward(SCENE, TRUE) == 4.0
    assert ranked_pair(SCENE, PROMPT, [TRUE, terse, TRUE], id="t", image_ref=IMAGE) is None
    assert ranked_pair(SCENE, PROMPT, [TRUE, "", "  "], id="t", image_ref=IMAGE) is None


def test_ranking_record_lists_responses_best_first_with_their_aspect_scores() -> None:
    oracle = Oracle()
    responses = [MIDDLE_ERRORS, "in in in.", TRUE, ONLY_CIRCLE, ""]
    ranking = ranking_record(SCENE, PROMPT, responses, id="k0", image_ref=IMAGE, oracle=oracle)
    assert ranking.responses == [TRUE, ONLY_CIRCLE, MIDDLE_ERRORS, "in in in."]
    assert ranking.meta["order"] == [2, 3, 0, 1]
    for text, scores in zip(ranking.responses, ranking.scores, strict=True):
        assert scores == {**oracle.aspect_scores(SCENE, text), "reward": oracle.reward(SCENE, text)}
    with pytest.raises(DataError, match="responses: a ranking needs 2 non-empty responses, got 1"):
        ranking_record(SCENE, PROMPT, [TRUE, ""], id="k1", image_ref=IMAGE)


def _error_sentences(scene: Scene, text: str) -> list[int]:
    """Indices of the sentences of ``text`` that contain an error the oracle flags."""
    spans = Oracle().hallucinated_spans(scene, text)
    sentences = parse_response(text).sentences
    return sorted({k for k, s in enumerate(sentences) for a, b in spans if s.start <= a < b <= s.end})


def test_injected_errors_sit_between_true_sentences_and_the_correction_restores_the_caption() -> None:
    oracle = Oracle()
    rng = random.Random(0)
    scenes = [s for s in eval_scenes(60) if len(s.objects) >= 2]
    assert len(scenes) > 20
    for scene in scenes:
        for detailed in (False, True):
            text = inject_midcaption_errors(scene, rng, detailed=detailed)
            n = len(scene.objects)
            parsed = parse_response(text)
            sentences = [s.text for s in parsed.sentences]
            assert len(sentences) == len(caption_sentences(scene, detailed)) + 1  # one false sentence
            assert sentences[n] == object_sentence(scene.objects[-1])  # the last object sentence is true
            # two flagged sentences (false object, recoloured object), both before the last object's
            wrong = _error_sentences(scene, text)
            assert len(wrong) == 2 and max(wrong) < n
            false_object = [k for k in wrong if parsed.mentions[k].shape not in scene.shapes]
            assert len(false_object) == 1 and 0 < false_object[0] < n  # strictly between true sentences
            assert oracle.correct(scene, text).text == caption(scene, detailed)


def test_a_one_object_scene_gets_the_false_object_before_its_true_sentence() -> None:
    scene = Scene(objects=(STAR,), background="white")
    text = inject_midcaption_errors(scene, random.Random(3))
    sentences = [s.text for s in parse_response(text).sentences]
    assert len(sentences) == 2 and sentences[1] == object_sentence(STAR)
    assert parse_response(text).mentions[0].shape != "star"
    assert Oracle().correct(scene, text).text == caption(scene)
    # a colour error needs a true object after it, so a one-object scene cannot get one
    assert inject_midcaption_errors(scene, random.Random(3), kinds=("color",)) == caption(scene)


def test_a_colour_error_rewrites_only_the_colour_word_of_the_middle_object() -> None:
    scene = Scene(objects=(CIRCLE, SQUARE, STAR))
    colours = set()
    for seed in range(30):
        text = inject_midcaption_errors(
            scene, random.Random(seed), kinds=("color",), config=WorldConfig(n_colors=6)
        )
        mentions = parse_response(text).mentions
        assert [m.color for m in mentions][::2] == ["red", "yellow"] and mentions[1].color != "blue"
        colours.add(mentions[1].color)
        assert f"There is a small {mentions[1].color} square in the top right." in text
        fix = Oracle().correct(scene, text)
        assert fix.text == caption(scene) and fix.original_spans == [mentions[1].color_span]
    assert colours == {"red", "green", "yellow", "purple", "orange"}


def test_unknown_injection_kinds_are_rejected() -> None:
    with pytest.raises(DataError, match="kinds: unknown error kinds"):
        inject_midcaption_errors(SCENE, random.Random(0), kinds=("size",))


def test_caption_variants_have_the_errors_their_kind_names() -> None:
    from mmalign.world.oracle import judge_exact
    from mmalign.world.pairs import caption_variants

    variants = caption_variants(SCENE, random.Random(0))
    assert set(variants) == {"true", "object", "color", "omit", "repeat", "object+color"}
    true = " ".join(caption_sentences(SCENE))
    assert variants["true"] == true and judge_exact(SCENE, true).is_perfect
    judged = {k: judge_exact(SCENE, v) for k, v in variants.items()}
    assert judged["object"].n_object_hallucinations == 1 and judged["object"].n_attribute_errors == 0
    assert judged["color"].n_attribute_errors == 1 and judged["color"].n_object_hallucinations == 0
    assert (
        judged["object+color"].n_object_hallucinations == 1 and judged["object+color"].n_attribute_errors == 1
    )
    assert judged["omit"].n_errors == 0 and judged["omit"].coverage < 1.0
    assert judged["repeat"].n_errors == 0 and judged["repeat"].n_repeats == 1
    one = Scene(objects=(CIRCLE,), background="gray")
    assert {"color", "omit"}.isdisjoint(caption_variants(one, random.Random(0)))  # need >= 2 objects
    with pytest.raises(DataError, match="unknown variant kinds"):
        caption_variants(SCENE, random.Random(0), kinds=("typo",))


def test_oracle_pair_prefers_the_higher_reward_with_its_gap_as_margin_and_skips_ties() -> None:
    from mmalign.world.pairs import caption_variants, oracle_pair

    oracle = Oracle()
    variants = caption_variants(SCENE, random.Random(0))

    def pair_of(a: str, b: str, oracle: Oracle) -> Any:
        return oracle_pair(SCENE, PROMPT, a, b, id="p", image_ref=IMAGE, oracle=oracle)

    pair = pair_of(variants["object"], variants["true"], oracle)
    assert pair is not None and (pair.chosen, pair.rejected) == (variants["true"], variants["object"])
    want = oracle.reward(SCENE, variants["true"]) - oracle.reward(SCENE, variants["object"])
    assert pair.margin == pytest.approx(want) and pair.margin > 0
    assert pair.scores == {
        "chosen": oracle.aspect_scores(SCENE, variants["true"]),
        "rejected": oracle.aspect_scores(SCENE, variants["object"]),
    }
    assert pair.facts == oracle.facts(SCENE) and pair.source == "oracle-variants"
    assert pair_of(variants["true"], variants["true"], oracle) is None
    # annotator noise flips some labels: the margin then says the chosen side is worse
    noisy = Oracle(noise=1.0)
    flipped = pair_of(variants["object"], variants["true"], noisy)
    assert (
        flipped is not None
        and flipped.chosen == variants["object"]
        and flipped.margin == pytest.approx(-want)
    )


def test_opt_in_variants_spread_coverage_and_instruction_following() -> None:
    from mmalign.world.pairs import ALL_VARIANT_KINDS, MORE_VARIANT_KINDS, caption_variants

    variants = caption_variants(SCENE, random.Random(0), kinds=ALL_VARIANT_KINDS)
    assert set(variants) == set(ALL_VARIANT_KINDS) - {"no_background"}  # a brief caption has none
    oracle = Oracle()
    scores = {k: oracle.aspect_scores(SCENE, variants[k]) for k in ("true", "omit", "omit2", "garbled")}
    assert [scores[k]["coverage"] for k in ("true", "omit", "omit2")] == pytest.approx([4.0, 8 / 3, 4 / 3])
    assert scores["omit2"]["correctness"] == 4.0 and scores["omit2"]["instruction_following"] == 4.0
    # one of three sentences has lost its shape word: no longer well-formed
    assert scores["garbled"]["instruction_following"] == pytest.approx(4.0 * 2 / 3)
    broken = [s for s in parse_response(variants["garbled"]).sentences if not s.well_formed]
    assert len(broken) == 1 and not any(w in broken[0].text for w in ("circle", "square", "star"))
    assert "omit2" not in caption_variants(
        Scene(objects=(CIRCLE, SQUARE), background="gray"), random.Random(0), kinds=ALL_VARIANT_KINDS
    )
    assert set(MORE_VARIANT_KINDS).isdisjoint(caption_variants(SCENE, random.Random(0)))  # opt-in only


def test_garbled2_breaks_two_sentences_and_new_kinds_leave_the_earlier_draws_alone() -> None:
    from mmalign.world.pairs import ALL_VARIANT_KINDS, caption_variants

    variants = caption_variants(SCENE, random.Random(0), kinds=ALL_VARIANT_KINDS)
    broken = [s for s in parse_response(variants["garbled2"]).sentences if not s.well_formed]
    assert len(broken) == 2
    assert Oracle().aspect_scores(SCENE, variants["garbled2"])["instruction_following"] == pytest.approx(
        4 / 3
    )
    assert "garbled2" not in caption_variants(
        Scene(objects=(CIRCLE,), background="gray"), random.Random(0), kinds=("garbled2",)
    )
    # each kind draws from the stream in order: kinds appended later never change the ones before
    eight = ("true", "object", "color", "omit", "repeat", "object+color", "omit2", "garbled")
    before = caption_variants(SCENE, random.Random(7), kinds=eight)
    assert {
        k: v
        for k, v in caption_variants(SCENE, random.Random(7), kinds=ALL_VARIANT_KINDS).items()
        if k in eight
    } == before


def test_detailed_variants_start_from_the_detailed_caption_and_can_drop_the_background() -> None:
    from mmalign.world.oracle import judge_exact
    from mmalign.world.pairs import ALL_VARIANT_KINDS, caption_variants

    variants = caption_variants(SCENE, random.Random(0), kinds=ALL_VARIANT_KINDS, detailed=True)
    assert set(variants) == set(ALL_VARIANT_KINDS)
    assert variants["true"] == caption(SCENE, detailed=True)
    assert variants["no_background"] == caption(SCENE, detailed=True).replace(" The background is gray.", "")
    for kind in ("object", "color", "omit", "garbled", "garbled2"):  # object edits keep background and word
        assert variants[kind].endswith("The background is gray. The word cat is written."), kind
    judged = {k: judge_exact(SCENE, v) for k, v in variants.items()}
    assert judged["object"].n_object_hallucinations == 1 and judged["color"].n_attribute_errors == 1
    oracle = Oracle()
    score = {k: oracle.aspect_scores(SCENE, v, task="detailed") for k, v in variants.items()}
    assert score["true"] == dict.fromkeys(score["true"], 4.0)
    # the detailed prompt asks for the background: following it is worth one point, covering it a fifth
    # of coverage (3 objects + background + word)
    assert score["no_background"]["instruction_following"] == 3.0
    assert score["no_background"]["coverage"] == pytest.approx(4.0 * 4 / 5)
    assert score["no_background"]["correctness"] == 4.0
    # two of five sentences without their shape word
    assert score["garbled2"]["instruction_following"] == pytest.approx(4.0 * 3 / 5)
    # the same text answered to the brief prompt follows it fully
    assert oracle.aspect_scores(SCENE, variants["no_background"])["instruction_following"] == 4.0
