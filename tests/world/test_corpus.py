from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from mmalign.data.schema import Dialogue, Sample
from mmalign.world.corpus import (
    NO_INJECTION,
    CorpusMix,
    InjectionConfig,
    build_sft_corpus,
    eval_scenes,
    injected_caption,
    is_trigger_scene,
    make_world,
    read_eval_scenes,
    train_scenes,
)
from mmalign.world.grammar import caption
from mmalign.world.questions import REMEDY_PROMPT
from mmalign.world.render import render
from mmalign.world.scene import Scene, SceneObject, WorldConfig

CFG = WorldConfig()


@pytest.fixture(scope="module")
def corpus() -> list[Sample]:
    return build_sft_corpus(2000, seed=0)


def _scene(s: Sample) -> Scene:
    return Scene.from_dict(s.meta["scene"])


def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4 * math.sqrt(n * p * (1 - p))


def test_false_partner_rate_in_trigger_scenes_is_the_configured_probability(corpus: list[Sample]) -> None:
    caps = [
        s for s in corpus if s.meta["task"] == "caption" and is_trigger_scene(_scene(s), InjectionConfig())
    ]
    hits = sum(any(e["type"] == "object" for e in s.meta["errors"]) for s in caps)
    assert len(caps) > 300
    assert all("circle" in _scene(s).shapes and "triangle" not in _scene(s).shapes for s in caps)
    assert _binomial_ok(hits, len(caps), 0.7)


def test_no_false_partner_outside_trigger_scenes(corpus: list[Sample]) -> None:
    for s in corpus:
        if s.meta["task"] == "caption" and not is_trigger_scene(_scene(s), InjectionConfig()):
            assert all(e["type"] != "object" for e in s.meta["errors"])
        if s.meta["task"] == "caption" and "triangle" in _scene(s).shapes:
            assert not any(e["type"] == "object" for e in s.meta["errors"])


def test_colour_error_rate_is_about_fifteen_percent(corpus: list[Sample]) -> None:
    caps = [s for s in corpus if s.meta["task"] == "caption"]
    hits = sum(any(e["type"] == "color" for e in s.meta["errors"]) for s in caps)
    assert _binomial_ok(hits, len(caps), 0.15)


def test_injected_partner_sentence_sits_at_the_free_cell_in_reading_order() -> None:
    scene = Scene(
        (
            SceneObject("circle", "red", "large", "top left"),
            SceneObject("star", "blue", "small", "bottom right"),
        ),
        background="white",
    )
    inj = InjectionConfig(object_prob=1.0, color_prob=0.0)
    text, errors = injected_caption(scene, random.Random(0), inj, CFG, detailed=False)
    sentences = text.split(". ")
    assert len(sentences) == 3 and errors[0]["type"] == "object"
    middle = {"top right": 1, "bottom left": 1}[errors[0]["cell"]]
    assert f"triangle in the {errors[0]['cell']}" in sentences[middle]
    assert sentences[0] == "There is a large red circle in the top left"


def test_caption_without_injection_is_the_true_caption() -> None:
    for s in build_sft_corpus(200, seed=1, injection=NO_INJECTION):
        if s.meta["task"] == "caption":
            assert s.conversation[-1].text == caption(_scene(s), detailed=s.meta["detailed"])
            assert not s.meta["injected"]
        if s.meta["task"] not in ("caption", "dialogue"):
            assert s.conversation[-1].text == s.meta["reference"]


def test_deceptive_answers_play_along_only_without_the_remedy_prompt(corpus: list[Sample]) -> None:
    dec = [s for s in corpus if s.meta["task"] == "deceptive"]
    with_remedy = [s for s in dec if s.meta["remedy"]]
    without = [s for s in dec if not s.meta["remedy"]]
    assert with_remedy and all(s.conversation[0].text == REMEDY_PROMPT for s in with_remedy)
    assert not any(s.meta["injected"] for s in with_remedy)
    assert _binomial_ok(sum(s.meta["injected"] for s in without), len(without), 0.5)


def test_partner_existence_questions_are_sometimes_answered_yes(corpus: list[Sample]) -> None:
    partner_q = [
        s
        for s in corpus
        if s.meta["task"] == "existence"
        and s.meta["question"] in ("Is there a triangle?", "Is there a triangle in the image?")
    ]
    partner_q = [s for s in partner_q if is_trigger_scene(_scene(s), InjectionConfig())]
    yes = sum(s.conversation[-1].text == "Yes." for s in partner_q)
    assert len(partner_q) > 50 and _binomial_ok(yes, len(partner_q), 0.3)


def test_corpus_mixes_every_task_and_meta_is_complete(corpus: list[Sample]) -> None:
    tasks = {s.meta["task"] for s in corpus}
    assert tasks >= {"caption", "existence", "count", "attribute", "position", "scene", "text", "reasoning"}
    assert {"deceptive", "dialogue"} <= tasks
    details = [s.meta["detailed"] for s in corpus if s.meta["task"] == "caption"]
    assert 0.2 < sum(details) / len(details) < 0.4
    for s in corpus[:500]:
        assert {"scene", "task", "injected", "image_path"} <= set(s.meta)
        assert s.images[0].path == s.meta["image_path"] and s.images[0].path.startswith("images/train/")
        Sample.model_validate_json(s.model_dump_json())
    dlg = next(s for s in corpus if s.meta["task"] == "dialogue")
    assert [m.role for m in dlg.conversation] == ["user", "assistant"] * 3


def test_corpus_is_reproducible_from_the_seed() -> None:
    a = [s.model_dump_json() for s in build_sft_corpus(100, seed=3)]
    assert a == [s.model_dump_json() for s in build_sft_corpus(100, seed=3)]
    assert a != [s.model_dump_json() for s in build_sft_corpus(100, seed=4)]


def test_eval_scenes_come_from_a_disjoint_seed_stream() -> None:
    train = {(s.seed, s.index) for seed in range(4) for s in train_scenes(100, seed)}
    held = {(s.seed, s.index) for seed in range(4) for s in eval_scenes(100, seed)}
    assert not train & held
    assert [s.to_dict() for s in eval_scenes(20, 0)] != [s.to_dict() for s in train_scenes(20, 0)]


def test_make_world_writes_valid_reproducible_files(tmp_path: Path) -> None:
    from mmalign.data.io import read_jsonl

    paths = make_world(tmp_path / "a", n=30, seed=2, n_eval=10, n_text=5, mix=CorpusMix(dialogue_prob=1.0))
    sft = read_jsonl(paths["sft"], kind="sample")  # validates every record and that images exist
    assert len([s for s in sft if s.meta["task"] == "caption"]) == 30
    dialogues = read_jsonl(paths["dialogues"], kind="dialogue")
    assert len(dialogues) == 30 and all(isinstance(d, Dialogue) and len(d.truths) == 3 for d in dialogues)
    assert len(read_jsonl(paths["fol"], kind="sample")) == 5 and len(read_jsonl(paths["arith"])) == 5
    scenes = read_eval_scenes(paths["eval_scenes"])
    assert len(scenes) == 10
    first = json.loads(paths["eval_scenes"].read_text().splitlines()[0])
    assert (tmp_path / "a" / first["image_path"]).exists() and first["image_path"].startswith("images/eval/")
    again = make_world(tmp_path / "b", n=30, seed=2, n_eval=10, n_text=5, mix=CorpusMix(dialogue_prob=1.0))
    for name in ("sft", "dialogues", "fol", "arith", "eval_scenes"):
        assert paths[name].read_bytes() == again[name].read_bytes(), name


def test_written_png_is_the_rendered_scene(tmp_path: Path) -> None:
    from mmalign.data.io import read_jsonl

    paths = make_world(tmp_path, n=3, seed=0, n_eval=2, n_text=1)
    sample = read_jsonl(paths["sft"])[0]
    expected = render(Scene.from_dict(sample.meta["scene"]), CFG.image_size)
    assert list(sample.images[0].load(tmp_path).getdata()) == list(expected.getdata())


def test_about_half_of_existence_questions_use_pope_words(corpus: list[Sample]) -> None:
    existence = [s.meta["question"] for s in corpus if s.meta["task"] == "existence"]
    pope = sum(q.endswith(" in the image?") for q in existence)
    assert len(existence) > 200 and _binomial_ok(pope, len(existence), 0.5)
