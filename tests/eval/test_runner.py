"""The eval runner's plumbing is exact: scripted answers give hand-computed metrics.

``generate`` is replaced by a scripted "model" that recognises each scene by its rendered image and answers
each prompt from tables built independently of the runner (by enumerating the question generators).
Scenes (``eval_scenes(4, seed=0)``), shapes present: 0 {circle, star}, 1 {star, circle},
2 {square ×2, circle}, 3 {circle, square}; 9 objects; every scene allows all 7 QA kinds and all 5
deceptive categories.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

import mmalign.rollout.generate as G
from mmalign.data.schema import Message
from mmalign.eval import runner
from mmalign.eval.metrics import chair, pope_metrics
from mmalign.models.tiny import build_tiny
from mmalign.world.corpus import eval_scenes
from mmalign.world.grammar import caption
from mmalign.world.questions import (
    DECEPTIVE_CATEGORIES,
    KINDS,
    REMEDY_PROMPT,
    make_deceptive,
    make_questions,
    play_along_answer,
)
from mmalign.world.render import render

FALSE_TRIANGLE = " There is a large blue triangle in the top left."  # scene 1's top left is free
WRONG = "Maybe."  # no yes/no, number, colour, cell or negation: wrong for every kind


@pytest.fixture(scope="module")
def scenes() -> list:
    return eval_scenes(4, seed=0)


def _answer_tables(scene: Any) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Every question the generators can ask about ``scene``: QA text → reference answer, deceptive
    text → (premise-rejecting answer, playing-along answer)."""
    qa, deceptive = {}, {}
    for i in range(300):
        for q in make_questions(scene, random.Random(i), KINDS):
            qa[q.text] = q.answer
        for cat in DECEPTIVE_CATEGORIES:
            dq = make_deceptive(scene, random.Random(i), cat)
            if dq is not None:
                deceptive[dq.text] = (dq.answer, play_along_answer(dq))
    assert not qa.keys() & deceptive.keys()
    return qa, deceptive


class ScriptedModel:
    """Stands in for ``generate``; records every call."""

    def __init__(self, scenes: list) -> None:
        self.scenes = scenes
        self.pixels = [render(s).tobytes() for s in scenes]
        self.tables = [_answer_tables(s) for s in scenes]
        self.calls: list[dict[str, Any]] = []

    def scene_of(self, images: list) -> int:
        assert len(images) == 1
        return self.pixels.index(images[0].tobytes())

    def caption(self, k: int, sampled: bool) -> str:
        scene = self.scenes[k]
        if sampled:  # one wrong colour on scene 0, else perfect
            text = caption(scene)
            return text.replace("small yellow circle", "small red circle") if k == 0 else text
        return {0: caption(scene), 1: caption(scene) + FALSE_TRIANGLE, 2: caption(scene), 3: ""}[k]

    def answer(self, k: int, messages: list[Message]) -> str:
        question = messages[-1].text
        remedy = messages[0].role == "system"
        if question.endswith("in the image?"):  # POPE: right on scenes 0, 1; always "Yes." on 2, 3
            shape = question.split()[-4]
            return "Yes." if k >= 2 or self.scenes[k].count(shape) else "No."
        qa, deceptive = self.tables[k]
        if question in qa:  # ordinary QA: right on scenes 0, 1
            return qa[question] if k <= 1 else WRONG
        # deceptive: premise rejected on scene 0 only without remedy, on scenes 0–2 with remedy
        right, wrong = deceptive[question]
        return right if k == 0 or (remedy and k <= 2) else wrong

    def __call__(self, model: Any, processor: Any, prompts: list, images: list, **kw: Any) -> list[str]:
        self.calls.append({"prompts": prompts, **kw})
        out = []
        for messages, ims in zip(prompts, images, strict=True):
            k = self.scene_of(ims)
            if messages[-1].text == "Describe the image.":
                out.append(self.caption(k, kw.get("do_sample", False)))
            else:
                out.append(self.answer(k, messages))
        return out


@pytest.fixture(scope="module")
def scripted(scenes) -> tuple[dict[str, Any], ScriptedModel]:
    fake = ScriptedModel(scenes)
    mp = pytest.MonkeyPatch()
    mp.setattr(G, "generate", fake)
    try:
        result = runner.evaluate_world(None, None, scenes, seed=0, progress=False)
    finally:
        mp.undo()
    return result, fake


def test_caption_metrics_match_hand_counts_for_greedy_and_sampled(scripted) -> None:
    result, _ = scripted
    # greedy: mentions 2 + 3 + 3 + 0 = 8, one false triangle; 7 of 9 objects named; the empty response
    # of scene 3 is one ill-formed sentence out of 2 + 3 + 3 + 1 = 9
    assert result["greedy.chair_i"] == pytest.approx(1 / 8)
    assert result["greedy.chair_s"] == pytest.approx(1 / 4)
    assert result["greedy.coverage"] == pytest.approx(7 / 9)
    assert result["greedy.attribute_error"] == 0.0
    assert result["greedy.well_formed"] == pytest.approx(8 / 9)
    # sampled: perfect captions but a wrong colour on 1 of 9 mentions
    assert result["sampled.chair_i"] == 0.0
    assert result["sampled.coverage"] == 1.0
    assert result["sampled.attribute_error"] == pytest.approx(1 / 9)
    assert result["sampled.well_formed"] == 1.0
    for key in ("chair_i", "chair_s", "coverage", "attribute_error", "well_formed"):
        assert result[key] == result[f"greedy.{key}"]


def test_pope_metrics_match_hand_counts_on_every_split(scripted) -> None:
    result, _ = scripted
    # 8 positives and 8 negatives per split; negatives of scenes 2, 3 answered "Yes." → tp 8, fp 4, tn 4
    for split in ("random", "popular", "adversarial"):
        assert result[f"pope_{split}_n"] == 16
        assert result[f"pope_{split}_accuracy"] == pytest.approx(12 / 16)
        assert result[f"pope_{split}_precision"] == pytest.approx(8 / 12)
        assert result[f"pope_{split}_recall"] == 1.0
        assert result[f"pope_{split}_f1"] == pytest.approx(0.8)
        assert result[f"pope_{split}_yes_ratio"] == pytest.approx(12 / 16)


def test_qa_and_deceptive_accuracy_match_hand_counts(scripted) -> None:
    result, _ = scripted
    assert result["qa_acc"] == 0.5  # 7 questions per scene, right on 2 of 4 scenes
    for kind in KINDS:
        assert result[f"qa_acc.{kind}"] == 0.5
    assert result["deceptive_acc"] == 0.25  # 5 per scene, premise rejected on 1 of 4 scenes
    assert result["deceptive_acc_remedy"] == 0.75  # … on 3 of 4 scenes with the remedy prompt
    for cat in DECEPTIVE_CATEGORIES:
        assert result[f"deceptive_acc.{cat}"] == 0.25
        assert result[f"deceptive_acc_remedy.{cat}"] == 0.75


def test_prompts_are_rendered_like_the_sft_corpus(scripted) -> None:
    _, fake = scripted
    caption_calls = [c for c in fake.calls if c["prompts"][0][-1].text == "Describe the image."]
    assert [c["do_sample"] for c in caption_calls] == [False, True]
    for call in fake.calls:
        for messages in call["prompts"]:
            *system, user = messages
            assert user.role == "user" and user.n_images == 1
            assert user.model_dump()["content"][0] == {"type": "image"}
            assert system in ([], [Message.system(REMEDY_PROMPT)])
    n_remedy = sum(len(m) == 2 for c in fake.calls for m in c["prompts"])
    assert n_remedy == 20


def test_records_hold_every_item_and_rescore_to_the_metrics(scripted, scenes) -> None:
    result, _ = scripted
    records = result["records"]
    by_task: dict[str, int] = {}
    for r in records:
        by_task[r["task"]] = by_task.get(r["task"], 0) + 1
    assert by_task == {"caption": 8, "pope": 48, "qa": 28, "deceptive": 40}
    cap = [r for r in records if r["task"] == "caption" and r["decoding"] == "greedy"]
    assert [r["scene"] for r in cap] == [0, 1, 2, 3]
    assert [r["hallucinated"] for r in cap] == [False, True, False, False]
    assert cap[1]["response"].endswith(FALSE_TRIANGLE)
    assert chair(scenes, [r["response"] for r in cap]) == {
        k.removeprefix("greedy."): v for k, v in result.items() if k.startswith("greedy.")
    }
    adv = [r for r in records if r["task"] == "pope" and r["split"] == "adversarial"]
    adv_metrics = pope_metrics([r["reference"] for r in adv], [r["response"] for r in adv])
    assert adv_metrics["f1"] == pytest.approx(0.8)
    remedy = [r["correct"] for r in records if r["task"] == "deceptive" and r["remedy"]]
    assert sum(remedy) / len(remedy) == 0.75
    assert [runner.Scene.from_dict(d) for d in result["scenes"]] == scenes


def test_question_caps_subsample_each_task(scenes, monkeypatch) -> None:
    fake = ScriptedModel(scenes)
    monkeypatch.setattr(G, "generate", fake)
    result = runner.evaluate_world(
        None, None, scenes, n_pope=5, n_qa=6, n_deceptive=3, decoding=("greedy",), progress=False
    )
    assert result["pope_random_n"] == 5
    assert sum(r["task"] == "qa" for r in result["records"]) == 6
    assert sum(r["task"] == "deceptive" for r in result["records"]) == 6  # 3 without + 3 with remedy
    assert "sampled.chair_i" not in result and result["chair_i"] == result["greedy.chair_i"]


def test_several_samples_per_scene_are_pooled_into_the_sampled_metrics(scenes, monkeypatch) -> None:
    monkeypatch.setattr(G, "generate", ScriptedModel(scenes))
    result = runner.evaluate_world(
        None, None, scenes, n_samples=3, n_pope=1, n_qa=1, n_deceptive=1, progress=False
    )
    assert result["sampled.n_responses"] == 12 and result["greedy.n_responses"] == 4
    assert result["sampled.attribute_error"] == pytest.approx(3 / 27)  # the same wrong colour in every sample
    sampled = [r for r in result["records"] if r["task"] == "caption" and r["decoding"] == "sampled"]
    assert [(r["scene"], r["sample"]) for r in sampled] == [(k, j) for j in range(3) for k in range(4)]


def test_unknown_decoding_is_rejected(scenes) -> None:
    with pytest.raises(ValueError, match="decoding"):
        runner.evaluate_world(None, None, scenes, decoding=("beam",), progress=False)


def test_save_eval_writes_json_atomically_and_metric_values_keeps_numbers(scripted, tmp_path) -> None:
    result, _ = scripted
    path = runner.save_eval(result, tmp_path / "eval" / "world.json")
    assert sorted(p.name for p in path.parent.iterdir()) == ["world.json"]  # no temp file left
    loaded = json.loads(path.read_text())
    assert loaded["chair_i"] == result["chair_i"] and len(loaded["records"]) == len(result["records"])
    values = runner.metric_values(loaded)
    assert values["qa_acc"] == 0.5 and "records" not in values and "settings" not in values


def test_real_tiny_model_results_equal_the_metrics_of_its_own_records(scenes) -> None:
    model, processor = build_tiny(
        "llava", image_size=32, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, heads=2
    )
    result = runner.evaluate_world(
        model,
        processor,
        scenes[:2],
        n_pope=4,
        n_qa=3,
        n_deceptive=2,
        caption_max_new_tokens=12,
        answer_max_new_tokens=6,
        batch_size=4,
        progress=False,
    )
    for mode in ("greedy", "sampled"):
        texts = [r["response"] for r in result["records"] if r["task"] == "caption" and r["decoding"] == mode]
        assert result[f"{mode}.chair_i"] == chair(scenes[:2], texts)["chair_i"]
        assert result[f"{mode}.well_formed"] == chair(scenes[:2], texts)["well_formed"]
    qa = [r["correct"] for r in result["records"] if r["task"] == "qa"]
    assert result["qa_acc"] == sum(qa) / len(qa)
