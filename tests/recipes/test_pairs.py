"""sample_pairs with a scripted generate: exact pair counts, images, JSONL round trip; pair_stats."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

import mmalign.rollout.generate as G
from mmalign.data.io import read_jsonl
from mmalign.data.schema import Message, PreferencePair
from mmalign.errors import DataError
from mmalign.recipes.pairs import (
    has_midresponse_change,
    injected_pairs,
    pair_stats,
    sample_pairs,
    write_pairs,
)
from mmalign.world.corpus import eval_scenes
from mmalign.world.grammar import CAPTION_PROMPT, caption
from mmalign.world.oracle import Oracle
from mmalign.world.render import render
from mmalign.world.scene import Scene, SceneObject

CIRCLE = SceneObject("circle", "red", "large", "top left")
SQUARE = SceneObject("square", "blue", "small", "top right")
STAR = SceneObject("star", "yellow", "small", "bottom right")
THREE = Scene(objects=(CIRCLE, SQUARE, STAR), background="gray", seed=7, index=0)
ONE = Scene(objects=(CIRCLE,), background="white", seed=7, index=1)
CLEAN = Scene(objects=(STAR,), background="black", seed=7, index=2)

THREE_TRUE = (
    "There is a large red circle in the top left. There is a small blue square in the top right. "
    "There is a small yellow star in the bottom right."
)
THREE_MID = (
    "There is a large red circle in the top left. There is a green triangle in the bottom left. "
    "There is an orange square in the top right. There is a small yellow star in the bottom right."
)
ONE_TRUE = "There is a large red circle in the top left."
ONE_TAIL = ONE_TRUE + " There is a small blue star in the bottom right."
CLEAN_TRUE = "There is a small yellow star in the bottom right."
# k = 3 samples per scene, scene-major
SCRIPT = [
    [THREE_TRUE, THREE_MID, THREE_MID],  # one distinct hallucinated sample
    ["in in in.", ONE_TAIL, ONE_TRUE],  # garbage (nothing left after correction), a tail error
    [CLEAN_TRUE, CLEAN_TRUE, "There is a star."],  # all correct
]


class ScriptedGenerate:
    """Stands in for ``generate``: checks the call would be valid for the real one, returns SCRIPT."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model: Any, processor: Any, prompts: Any, images: Any, **kwargs: Any) -> list[str]:
        inspect.signature(G.generate).bind(model, processor, prompts, images, **kwargs)
        self.calls.append({"prompts": prompts, "images": images, **kwargs})
        return [text for scene in SCRIPT for text in scene]


def test_corrected_pairs_come_from_every_distinct_hallucinated_sample() -> None:
    fake = ScriptedGenerate()
    pairs = sample_pairs(
        "model",
        "processor",
        [THREE, ONE, CLEAN],
        k=3,
        temperature=0.7,
        seed=5,
        batch_size=4,
        generate_fn=fake,
    )
    assert [p.id for p in pairs] == ["corrected-7-000000-1", "corrected-7-000001-1"]
    assert [(p.rejected, p.chosen) for p in pairs] == [
        (
            THREE_MID,
            "There is a large red circle in the top left. There is a blue square in the top right. "
            "There is a small yellow star in the bottom right.",
        ),
        (ONE_TAIL, ONE_TRUE),
    ]
    assert pairs[0].margin == pytest.approx(1.3)
    assert pairs[1].rejected_spans == [(45, len(ONE_TAIL))] and pairs[1].chosen_spans == []
    assert pairs[0].meta == {"scene": THREE.to_dict(), "task": "caption", "sample": 1, "temperature": 0.7}

    (call,) = fake.calls
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["seed"] == 5
    assert call["batch_size"] == 4
    assert call["prompts"] == [[Message.user(CAPTION_PROMPT, n_images=1)]] * 9
    assert [im.tobytes() for (im,) in call["images"]] == [
        render(s).tobytes() for s in (THREE, ONE, CLEAN) for _ in range(3)
    ]
    # embedded images are the rendered scenes
    assert pairs[1].images[0].load().tobytes() == render(ONE).tobytes()


def test_ranked_pairs_take_best_and_worst_per_scene_and_skip_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        G, "generate", ScriptedGenerate()
    )  # the default generate_fn is looked up at call time
    oracle = Oracle()
    pairs = sample_pairs(None, None, [THREE, ONE, CLEAN], k=3, kind="ranked", oracle=oracle)
    assert [p.id for p in pairs] == ["ranked-7-000000", "ranked-7-000001"]
    assert [(p.chosen, p.rejected) for p in pairs] == [(THREE_TRUE, THREE_MID), (ONE_TRUE, "in in in.")]
    assert [p.margin for p in pairs] == pytest.approx([4.0 - 2.7, 4.0])
    assert pairs[1].meta["chosen_index"] == 2 and pairs[1].meta["rejected_index"] == 0
    assert all(p.source == "oracle-ranked" for p in pairs)


def test_pairs_with_image_files_validate_and_round_trip_through_jsonl(tmp_path: Path) -> None:
    pairs = sample_pairs(
        None,
        None,
        [THREE, ONE, CLEAN],
        k=3,
        image_dir=tmp_path / "images",
        relative_to=tmp_path,
        generate_fn=ScriptedGenerate(),
    )
    assert [p.images[0].path for p in pairs] == ["images/7-000000.png", "images/7-000001.png"]
    # only scenes that produced pairs get an image file
    assert sorted(f.name for f in (tmp_path / "images").iterdir()) == ["7-000000.png", "7-000001.png"]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    back = read_jsonl(tmp_path / "pairs.jsonl", kind="pair")
    assert back == pairs
    assert back[0].images[0].load(tmp_path).tobytes() == render(THREE).tobytes()

    embedded = sample_pairs(None, None, [THREE, ONE], k=3, kind="ranked", generate_fn=_first_six)
    write_pairs(tmp_path / "ranked.jsonl", embedded)
    assert read_jsonl(tmp_path / "ranked.jsonl") == embedded and len(embedded) == 2


def _first_six(*args: Any, **kwargs: Any) -> list[str]:
    return ScriptedGenerate()(*args, **kwargs)[:6]


def test_sample_pairs_rejects_a_bad_kind_too_few_samples_and_a_short_generation() -> None:
    with pytest.raises(DataError, match="kind: expected 'corrected' or 'ranked', got 'best'"):
        sample_pairs(None, None, [THREE], kind="best", generate_fn=ScriptedGenerate())  # type: ignore[arg-type]
    with pytest.raises(DataError, match="k: need at least 2 samples per scene, got 1"):
        sample_pairs(None, None, [THREE], k=1, kind="ranked", generate_fn=ScriptedGenerate())
    with pytest.raises(DataError, match="generate returned 9 responses for 3 prompts"):
        sample_pairs(None, None, [THREE], k=3, generate_fn=ScriptedGenerate())


def test_injected_pairs_correct_mid_caption_errors_back_to_the_true_caption(tmp_path: Path) -> None:
    scenes = eval_scenes(40, seed=3)
    pairs = injected_pairs(scenes, seed=1, detailed=True)
    assert len(pairs) == 40  # an absent shape always exists, so every scene gets a false object
    assert [p.chosen for p in pairs] == [caption(s, detailed=True) for s in scenes]
    assert all(p.source == "oracle-injected" and p.margin is not None and p.margin > 0 for p in pairs)
    assert pair_stats(pairs)["mid_share"] == 1.0
    assert injected_pairs(scenes[:3], seed=1, detailed=True) == pairs[:3]  # deterministic per scene
    # colour errors need two objects: one-object scenes then give no pair
    only_colour = injected_pairs([THREE, ONE], kinds=("color",), image_dir=tmp_path, relative_to=tmp_path)
    assert [p.id for p in only_colour] == ["injected-7-000000"]
    assert [f.name for f in tmp_path.iterdir()] == ["7-000000.png"]


def _pair(
    chosen: str, rejected: str, margin: float | None, spans: list[tuple[int, int]] | None
) -> PreferencePair:
    return PreferencePair(
        id="x",
        prompt=[Message.user(CAPTION_PROMPT)],
        chosen=chosen,
        rejected=rejected,
        rejected_spans=spans,
        margin=margin,
    )


def test_pair_stats_counts_pairs_whose_change_is_followed_by_an_untouched_sentence() -> None:
    mid = _pair("A is. C is.", "A is. B is. C is.", 1.0, [(6, 11)])
    tail = _pair("A is.", "A is. B is.", 2.0, [(6, 11)])
    # a changed word inside the last sentence is still a change at the end
    last_word = _pair("There is a red circle.", "There is a blue circle.", None, [(11, 15)])
    # without spans: the common suffix ". C is." follows the change ("B" vs nothing)
    no_spans = _pair("A is. C is.", "A is. B is. C is.", 0.5, None)
    assert [has_midresponse_change(p) for p in (mid, tail, last_word, no_spans)] == [True, False, False, True]
    assert pair_stats([mid, tail, last_word, no_spans]) == {"n": 4, "mean_margin": 3.5 / 3, "mid_share": 0.5}
    assert pair_stats([]) == {"n": 0, "mean_margin": None, "mid_share": 0.0}


def test_variant_pairs_ask_a_seeded_share_of_scenes_for_a_detailed_caption() -> None:
    from mmalign.recipes.pairs import variant_pairs
    from mmalign.world.grammar import DETAILED_CAPTION_PROMPT
    from mmalign.world.pairs import ALL_VARIANT_KINDS, task_of

    scenes = eval_scenes(12, seed=5)

    def by_scene(pairs: list[PreferencePair]) -> dict[str, list[PreferencePair]]:
        out: dict[str, list[PreferencePair]] = {}
        for pair in pairs:
            out.setdefault(pair.meta["group"], []).append(pair)
        return out

    brief = by_scene(variant_pairs(scenes, seed=1, kinds=ALL_VARIANT_KINDS))
    assert by_scene(variant_pairs(scenes, seed=1, kinds=ALL_VARIANT_KINDS, detailed_share=0.0)) == brief
    mixed = by_scene(variant_pairs(scenes, seed=1, kinds=ALL_VARIANT_KINDS, detailed_share=0.5))
    tasks = {g: {task_of(p.prompt) for p in ps} for g, ps in mixed.items()}
    assert all(len(t) == 1 for t in tasks.values())  # one prompt per scene
    detailed = {g for g, t in tasks.items() if t == {"detailed"}}
    assert 0 < len(detailed) < len(mixed)
    for group, pairs in mixed.items():  # the brief scenes keep exactly their variants and labels
        if group not in detailed:
            assert pairs == brief[group]
    for group in detailed:
        pairs = mixed[group]
        assert pairs[0].prompt[-1].text == DETAILED_CAPTION_PROMPT
        assert any("no_background" in p.meta["kinds"] for p in pairs)
        # the oracle scored them as detailed captions: the true one covers background and word too
        true = next(p for p in pairs if p.meta["kinds"][0] == "true")
        assert "The background is" in true.chosen and true.scores["chosen"]["coverage"] == 4.0
    again = by_scene(variant_pairs(scenes, seed=1, kinds=ALL_VARIANT_KINDS, detailed_share=0.5))
    assert again == mixed
    with pytest.raises(DataError, match="detailed_share"):
        variant_pairs(scenes, detailed_share=1.5)
