"""RSF recipe: the kept set is exactly each prompt's best sample at or above the threshold, every iteration
logs its rows and writes its directory, the best validated iteration becomes final/, the guardrail warns,
a real oracle run completes, and the mean reward of a learnable reward rises every iteration."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _online_kit import TableReward, read_lines, same_weights, sft_captioner, tiny_llava

from mmalign.config import dump_config, load_config
from mmalign.errors import ConfigError, DataError
from mmalign.recipes.online import file_prompts, guardrail_warnings, load_reward
from mmalign.recipes.rsf import RSFConfig, load_rsf_config, run_rsf, select_best
from mmalign.recipes.run import OptimConfig, read_metrics
from mmalign.recipes.sft import CONFIG_DIR
from mmalign.rollout.rewards import RewardBatch, RewardOutput

ONE_THREAD = True  # see tests/conftest.py


# ----------------------------------------------------------------------------------------------- pure parts
def test_select_best_keeps_each_prompts_argmax_at_or_above_the_threshold_earliest_on_ties() -> None:
    scores = torch.tensor([[1.0, 3.0, 3.0], [0.0, 1.0, 0.5], [2.0, 5.0, 1.0], [4.0, 0.0, 4.0]])
    texts = [["a", "b", "c"]] * 4
    assert select_best(scores, texts) == [[1], [1], [1], [0]]
    assert select_best(scores, texts, threshold=1.5) == [[1], [], [1], [0]]
    assert select_best(scores, texts, threshold=3.0) == [[1], [], [1], [0]]  # >= threshold is kept
    assert select_best(scores, texts, threshold=4.5) == [[], [], [1], []]


def test_select_best_skips_empty_responses_and_keeps_the_n_best_distinct_ones() -> None:
    scores = torch.tensor([[9.0, 5.0, 4.0, 3.0, 1.0]])
    assert select_best(scores, [[" ", "x", "x", "y", "z"]]) == [[1]]  # empty best: the next one
    assert select_best(scores, [[" ", "x", "x ", "y", "z"]], n_keep=2) == [[1, 3]]  # duplicates once
    assert select_best(scores, [["w", "x", "x", "y", "z"]], n_keep=3, threshold=3.0) == [[0, 1, 3]]


def test_guardrail_warns_when_coverage_or_well_formedness_fall_more_than_the_threshold() -> None:
    base = {"val/greedy.coverage": 0.8, "val/sampled.well_formed": 0.9, "val/greedy.chair_i": 0.1}
    assert guardrail_warnings(base, {**base, "val/greedy.coverage": 0.75}, 0.1) == []
    messages = guardrail_warnings(
        base, {**base, "val/greedy.coverage": 0.6, "val/sampled.well_formed": 0.5, "val/greedy.chair_i": 0.9},
        0.1,
    )  # fmt: skip
    assert len(messages) == 2 and "val/greedy.coverage fell from 0.800 to 0.600" in messages[0]
    assert "val/sampled.well_formed fell from 0.900 to 0.500" in messages[1]


def test_shipped_config_parses_round_trips_and_rejects_bad_values(tmp_path: Path) -> None:
    cfg = load_rsf_config(CONFIG_DIR / "rsf.yaml", ["k=6", "threshold=2.5", "optim.lr=3e-5"])
    assert (cfg.k, cfg.threshold, cfg.optim.lr, cfg.reward) == (6, 2.5, 3e-5, "oracle")
    assert cfg.val_decoding == ("greedy", "sampled") and cfg.top_fraction is None
    assert load_config(RSFConfig, dump_config(cfg, tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError, match="top_fraction must be in"):
        load_rsf_config(CONFIG_DIR / "rsf.yaml", ["top_fraction=1.5"])
    with pytest.raises(ValueError, match="temperature > 0"):
        RSFConfig(temperature=0.0)


def test_file_prompts_take_the_turns_before_the_last_answer_with_their_images_and_truths(
    tmp_path: Path,
) -> None:
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import EvalItem, ImageRef, Message, PreferencePair, Sample
    from mmalign.world.corpus import train_scenes
    from mmalign.world.render import render

    scene = train_scenes(1, 0)[0]
    (tmp_path / "img").mkdir()
    render(scene, 32).save(tmp_path / "img" / "a.png")
    dialogue = [Message.user("Describe the image.", n_images=1), Message.assistant("A star."),
                Message.user("Is it red?"), Message.assistant("Yes.")]  # fmt: skip
    question = [Message.user("Is there a cat?")]
    records: list[Sample | EvalItem] = [
        Sample(id="s", images=[ImageRef(path="img/a.png")], conversation=dialogue,
               meta={"scene": scene.to_dict(), "reference": "Yes.", "detailed": True, "other": 1}),
        EvalItem(id="e", benchmark="pope", prompt=question, answer="no",
                 truth={"label": "no"}),
    ]  # fmt: skip
    write_jsonl(tmp_path / "prompts.jsonl", records)
    sample, item = file_prompts(tmp_path / "prompts.jsonl")
    assert sample.id == "s" and sample.messages == dialogue[:3] and sample.images[0].size == (32, 32)
    assert sample.truth == {"scene": scene.to_dict(), "answer": "Yes.", "task": "detailed"}
    assert sample.image_refs[0].path == str((tmp_path / "img" / "a.png").resolve())
    assert (item.messages, item.images, item.truth) == (
        question,
        [],
        {"label": "no", "answer": "no"},
    )
    assert [p.id for p in file_prompts(tmp_path / "prompts.jsonl", n=1)] == ["s"]
    pair = PreferencePair(id="p", prompt=[Message.user("Hi")], chosen="a", rejected="b")
    write_jsonl(tmp_path / "pairs.jsonl", [pair])
    with pytest.raises(DataError, match="prompts come from sample or eval records, found a 'pair'"):
        file_prompts(tmp_path / "pairs.jsonl")
    with pytest.raises(ConfigError, match="neither 'oracle' nor a reward-model directory"):
        load_reward(str(tmp_path / "missing"), 4)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llava(tmp_path_factory.mktemp("rsf") / "policy")


@pytest.fixture(scope="module")
def captioner(policy: Path) -> Path:
    return sft_captioner(policy)


def scripted_validation(scores: list[float], coverage: list[float], calls: list[dict[str, Any]]) -> Any:
    """An ``evaluate`` whose k-th call has val_score ``scores[k]`` (+ the coverage drop) and coverage
    ``coverage[k]`` for both decodings."""

    def evaluate(model: Any, processor: Any, scenes: list[Any], **settings: Any) -> dict[str, Any]:
        k = len(calls)
        calls.append({"n_scenes": len(scenes), **settings})
        values = {"chair_i": scores[k] - (1 - coverage[k]), "chair_s": 0.0, "coverage": coverage[k]}
        return {
            f"{mode}.{key}": v
            for mode in ("greedy", "sampled")
            for key, v in {**values, "well_formed": 1.0}.items()
        }

    return evaluate


# ----------------------------------------------------------------------------------------------- runs
def test_rsf_keeps_exactly_the_best_sample_per_prompt_and_final_is_the_best_validated_iteration(
    policy: Path, tmp_path: Path
) -> None:
    from mmalign.world.corpus import train_scenes

    reward = TableReward([
        [[1, 3, 3], [0, 1, 0.5], [2, 5, 1], [4, 0, 4]],  # iteration 1: prompt 1 stays below the threshold
        [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]],  # iteration 2: nothing reaches it -> skipped
    ], aspects=True)  # fmt: skip
    calls: list[dict[str, Any]] = []
    cfg = RSFConfig(
        model=str(policy), out_dir=str(tmp_path / "run"), n_prompts=4, k=3, max_new_tokens=12,
        threshold=1.5, iterations=2, steps=2, batch_size=4, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
        n_val=3, guard_max_drop=0.1, progress_bar=False,
    )  # fmt: skip
    evaluate = scripted_validation([0.5, 0.2, 0.4], [0.9, 0.9, 0.6], calls)
    with pytest.warns(UserWarning) as caught:
        result = run_rsf(cfg, evaluate=evaluate, reward=reward)
    messages = [str(w.message) for w in caught]
    assert any("iteration 2: nothing kept" in m for m in messages)
    assert any("iteration 2: val/greedy.coverage fell from 0.900 to 0.600" in m for m in messages)

    # the reward saw every prompt's K responses with its scene and image
    scenes = train_scenes(4, 0)
    batch = reward.batches[0]
    assert len(batch) == 12 and [t["scene"] for t in batch.truths[::3]] == [s.to_dict() for s in scenes]
    assert all(len(ims) == 1 and ims[0].size == (64, 64) for ims in batch.images)
    # the kept set: per prompt the argmax (first of tied ones) with reward >= 1.5; prompt 1 has none
    run = result.run_dir
    rollouts = read_lines(run / "iter_01" / "rollouts.jsonl")
    assert [r["responses"] for r in rollouts] == [batch.responses[i : i + 3] for i in range(0, 12, 3)]
    samples = read_lines(run / "iter_01" / "samples.jsonl")
    ids = [f"scene-0-{i:06d}" for i in range(4)]
    assert [s["id"] for s in samples] == [f"rsf-1-{ids[0]}-1", f"rsf-1-{ids[2]}-1", f"rsf-1-{ids[3]}-0"]
    for sample, (i, j) in zip(samples, [(0, 1), (2, 1), (3, 0)], strict=True):
        assert sample["conversation"][-1]["content"][0]["text"] == rollouts[i]["responses"][j].strip()
        assert sample["meta"]["reward"] == rollouts[i]["scores"][j]
        assert (run / "iter_01" / sample["images"][0]["path"]).is_file()
    assert not (run / "iter_02" / "samples.jsonl").exists() and not (run / "iter_02" / "sft").exists()

    # one row per iteration (0: the initial policy's validation; 3: the last policy's samples)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    one = rows[1]
    assert one["reward/mean"] == pytest.approx(24.5 / 12) and (one["reward/max"], one["reward/min"]) == (5, 0)
    assert one["reward/best_of_k"] == pytest.approx((3 + 1 + 5 + 4) / 4)
    assert one["reward/double"] == pytest.approx(2 * 24.5 / 12)
    assert (one["kept/n"], one["kept/share"], one["kept/mean_reward"]) == (3, 0.75, 4.0)
    assert (one["sft/steps"], one["skipped"]) == (2, 0.0) and rows[2]["skipped"] == 1.0
    assert [r["val/val_score"] for r in rows[:3]] == pytest.approx([0.5, 0.2, 0.4])
    assert [r["val/best_iteration"] for r in rows[:3]] == [0, 1, 1]
    assert [r["guard/warned"] for r in rows[:3]] == [0, 0, 1]
    for key in ("greedy.chair_i", "greedy.coverage", "greedy.well_formed", "sampled.coverage"):
        assert f"val/{key}" in rows[1]
    assert {k for k in rows[3] if k not in ("step", "wall_time")} == {
        k for k in one if k.startswith(("reward/", "oracle/"))
    }
    # world prompts scored by a non-oracle reward: the oracle's reward of the same samples is logged too
    assert 0.0 <= one["oracle/mean"] <= one["oracle/best_of_k"] <= 4.0
    assert (
        result.series("reward/mean")[0] == pytest.approx(24.5 / 12) and len(result.series("reward/mean")) == 3
    )

    # validation: captions of n_val scenes, greedy + sampled; final/ = the iteration-1 policy
    assert [c["n_scenes"] for c in calls] == [3, 3, 3] and calls[0]["decoding"] == ("greedy", "sampled")
    assert result.best_iteration == 1 and same_weights(result.model_dir, run / "iter_01" / "sft" / "final")
    assert not same_weights(result.model_dir, policy)
    assert len(read_metrics(run / "iter_01" / "sft")) == 2  # the SFT run logged its own steps


def test_a_real_oracle_run_completes_and_logs_the_mean_reward_of_every_iteration(
    captioner: Path, tmp_path: Path
) -> None:
    cfg = RSFConfig(
        model=str(captioner), out_dir=str(tmp_path / "run"), n_prompts=6, k=3, max_new_tokens=24,
        iterations=2, steps=2, batch_size=6, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0), n_val=2,
        val_max_new_tokens=24,
        progress_bar=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a barely trained policy may trip the guardrail
        result = run_rsf(cfg)
    rewards = result.series("reward/mean")
    assert len(rewards) == 3 and all(0.0 <= r <= 4.0 for r in rewards)  # oracle rewards are 0-4
    kept = result.series("kept/mean_reward")
    assert len(kept) == 2 and all(k >= r for k, r in zip(kept, rewards, strict=False)) and kept[0] > 0
    assert len(result.series("val/val_score")) == 3 and result.best_iteration in (0, 1, 2)
    assert (result.model_dir / "model.safetensors").is_file()
    assert (result.run_dir / "val_scenes.jsonl").read_text().count("\n") == 2


def test_mean_reward_rises_every_iteration_for_a_reward_the_policy_can_learn(tmp_path: Path) -> None:
    """A tiny text LM, prompts from a JSONL of samples, reward = number of colour/shape words."""
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import Message, Sample
    from mmalign.models.tiny import build_tiny
    from mmalign.world.scene import COLORS_ALL, SHAPES_ALL

    targets = set(COLORS_ALL) | set(SHAPES_ALL)

    class TargetWords:
        name = "target-words"

        def score(self, batch: RewardBatch) -> RewardOutput:
            counts = [sum(w.strip(".,").lower() in targets for w in r.split()) for r in batch.responses]
            return RewardOutput(scores=torch.tensor(counts, dtype=torch.float32))

    build_tiny("llama", tmp_path / "lm", text_hidden=64, text_layers=2)
    questions = ["Say a colour.", "Name a shape.", "What is there?", "How many?", "Is there a star?", "Why?"]
    prompts = [
        Sample(id=f"q{i}", conversation=[Message.user(q), Message.assistant("red")])
        for i, q in enumerate(questions)
    ]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    cfg = RSFConfig(
        model=str(tmp_path / "lm"), out_dir=str(tmp_path / "run"), prompts=str(tmp_path / "prompts.jsonl"),
        n_prompts=0, k=8, max_new_tokens=8, iterations=2, steps=4, batch_size=6,
        optim=OptimConfig(lr=1e-2, warmup_ratio=0.0), n_val=0, progress_bar=False,
    )  # fmt: skip
    result = run_rsf(cfg, reward=TargetWords())
    rewards = result.series("reward/mean")  # policies 0, 1, 2
    assert len(rewards) == 3 and rewards[0] < rewards[1] < rewards[2]
    assert result.best_iteration is None and same_weights(
        result.model_dir, tmp_path / "run/iter_02/sft/final"
    )
