"""Online iterative DPO: pairs are exactly each prompt's best vs worst sample with the reward gap as margin
(ties skipped), each iteration runs DPO from the current policy against the configured reference, logs its
row and writes its directory, the best validated iteration becomes final/, and a real oracle run with
validation inside the DPO runs completes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _online_kit import TableReward, read_lines, same_weights, sft_captioner, tiny_llava

from mmalign.config import dump_config, load_config
from mmalign.data.schema import ImageRef, Message
from mmalign.losses.dpo import LossType
from mmalign.recipes.dpo import DPOConfig
from mmalign.recipes.online import Prompt, Rollout
from mmalign.recipes.online_dpo import (
    OnlineDPOConfig,
    best_vs_worst,
    load_online_dpo_config,
    preference_pairs,
    run_online_dpo,
)
from mmalign.recipes.run import OptimConfig, read_metrics
from mmalign.recipes.sft import CONFIG_DIR

ONE_THREAD = True  # see tests/conftest.py


# ----------------------------------------------------------------------------------------------- pure parts
def test_best_vs_worst_pairs_the_argmax_with_the_argmin_and_skips_ties_and_empty_responses() -> None:
    scores = torch.tensor(
        [[1.0, 3.0, 3.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 9.0], [4.0, 0.0, 4.0, 0.0]]
    )
    texts = [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "b", "c", ""], ["a", "b", "c", "d"]]
    assert best_vs_worst(scores, texts) == [(1, 0), None, (1, 0), (0, 1)]
    assert best_vs_worst(torch.tensor([[1.0, 2.0]]), [["same", "same "]]) == [None]
    assert best_vs_worst(torch.tensor([[1.0, 2.0]]), [["", " "]]) == [None]


def test_pairs_carry_the_reward_gap_as_margin_and_both_sides_scores(tmp_path: Path) -> None:
    image = tmp_path / "images" / "a.png"
    prompt = Prompt("p0", [Message.user("Describe the image.", n_images=1)], [], [ImageRef(path=str(image))],
                    {"scene": {"x": 1}})  # fmt: skip
    scores = torch.tensor([[1.0, 3.5, 0.5]])
    rollout = Rollout([["one", " three ", "half"]], scores, {"correctness": scores * 2})
    (pair,) = preference_pairs([prompt], rollout, [(1, 2)], 4, tmp_path / "iter_04", "online-dpo:table")
    assert (pair.id, pair.chosen, pair.rejected, pair.margin) == ("odpo-4-p0", "three", "half", 3.0)
    assert pair.scores == {
        "chosen": {"reward": 3.5, "correctness": 7.0},
        "rejected": {"reward": 0.5, "correctness": 1.0},
    }
    assert pair.images[0].path == "../images/a.png" and pair.source == "online-dpo:table"
    assert pair.meta == {"scene": {"x": 1}, "iteration": 4, "chosen_sample": 1, "rejected_sample": 2}
    assert preference_pairs([prompt], rollout, [None], 4, tmp_path, "x") == []


def test_shipped_config_parses_with_the_papers_defaults_and_picks_the_reference(tmp_path: Path) -> None:
    cfg = load_online_dpo_config(CONFIG_DIR / "online_dpo.yaml", ["loss=mmdpo", "reference=previous"])
    assert (cfg.k, cfg.iterations, cfg.beta, cfg.loss, cfg.reference) == (
        8,
        3,
        0.1,
        LossType.MMDPO,
        "previous",
    )
    assert load_config(OnlineDPOConfig, dump_config(cfg, tmp_path / "c.yaml")) == cfg
    defaults = OnlineDPOConfig(model="m")
    assert (defaults.k, defaults.iterations, defaults.beta, defaults.reference) == (8, 3, 0.1, "initial")
    it_dir = tmp_path / "iter_02"
    dpo = defaults.dpo_config("runs/x/iter_01/dpo/final", it_dir, 2, tmp_path / "val.jsonl")
    assert (dpo.model, dpo.ref_model, dpo.data) == (
        "runs/x/iter_01/dpo/final",
        "m",
        str(it_dir / "pairs.jsonl"),
    )
    assert (dpo.eval_every, dpo.val_scenes, dpo.sft_weight) == (0, "", 0.2)
    previous = OnlineDPOConfig(model="m", reference="previous", eval_every=5, patience=2)
    dpo = previous.dpo_config("p", it_dir, 2, tmp_path / "val.jsonl")
    assert (dpo.ref_model, dpo.eval_every, dpo.patience, dpo.val_scenes) == (
        None,
        5,
        2,
        str(tmp_path / "val.jsonl"),
    )
    with pytest.raises(ValueError, match="k must be >= 2"):
        OnlineDPOConfig(k=1)
    with pytest.raises(ValueError, match="eval_every needs validation scenes"):
        OnlineDPOConfig(eval_every=2, n_val=0)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llava(tmp_path_factory.mktemp("online_dpo") / "policy")


@pytest.fixture(scope="module")
def captioner(policy: Path) -> Path:
    return sft_captioner(policy)


def scripted_validation(scores: list[float], calls: list[dict[str, Any]]) -> Any:
    """An ``evaluate`` whose k-th call has val_score ``scores[k]`` (both decodings)."""

    def evaluate(model: Any, processor: Any, scenes: list[Any], **settings: Any) -> dict[str, Any]:
        score = scores[len(calls)]
        calls.append({"n_scenes": len(scenes), **settings})
        values = {"chair_i": score, "chair_s": 0.0, "coverage": 1.0, "well_formed": 1.0}
        return {f"{mode}.{key}": v for mode in ("greedy", "sampled") for key, v in values.items()}

    return evaluate


# ----------------------------------------------------------------------------------------------- runs
def test_online_dpo_pairs_best_with_worst_and_final_is_the_best_validated_iteration(
    policy: Path, tmp_path: Path
) -> None:
    reward = TableReward([
        [[1, 3, 3], [2, 2, 2], [0, 5, 1], [4, 0, 4]],  # iteration 1: prompt 1 ties -> no pair
        [[0, 1, 2], [3, 1, 2], [1, 1, 0], [0, 0, 0]],  # iteration 2: prompt 3 ties
    ])  # fmt: skip
    calls: list[dict[str, Any]] = []
    cfg = OnlineDPOConfig(
        model=str(policy), out_dir=str(tmp_path / "run"), n_prompts=4, k=3, max_new_tokens=12, iterations=2,
        reference="previous", steps=2, batch_size=3, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0), n_val=2,
        score_final_policy=False, progress_bar=False,
    )  # fmt: skip
    result = run_online_dpo(cfg, evaluate=scripted_validation([0.5, 0.6, 0.3], calls), reward=reward)

    run = result.run_dir
    ids = [f"scene-0-{i:06d}" for i in range(4)]
    for it, expected in ((1, [(0, 1, 0, 2.0), (2, 1, 0, 5.0), (3, 0, 1, 4.0)]),
                         (2, [(0, 2, 0, 2.0), (1, 0, 1, 2.0), (2, 0, 2, 1.0)])):  # fmt: skip
        rollouts = read_lines(run / f"iter_{it:02d}" / "rollouts.jsonl")
        pairs = read_lines(run / f"iter_{it:02d}" / "pairs.jsonl")
        assert [p["id"] for p in pairs] == [f"odpo-{it}-{ids[i]}" for i, *_ in expected]
        for pair, (i, best, worst, margin) in zip(pairs, expected, strict=True):
            assert pair["chosen"] == rollouts[i]["responses"][best].strip()
            assert pair["rejected"] == rollouts[i]["responses"][worst].strip()
            assert (
                pair["margin"] == margin and pair["scores"]["chosen"]["reward"] == rollouts[i]["scores"][best]
            )
            assert pair["meta"]["scene"]["index"] == i

    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (rows[1]["pairs/n"], rows[1]["pairs/share"], rows[1]["pairs/mean_margin"]) == (3, 0.75, 11 / 3)
    assert rows[1]["reward/mean"] == pytest.approx(27 / 12)
    dpo_keys = ["loss", "preference_loss", "sft_nll", "reward_margin", "accuracy", "drift_chosen", "steps"]
    val_keys = ["greedy.coverage", "sampled.chair_i", "val_score"]
    for key in [f"dpo/{k}" for k in dpo_keys] + [f"val/{k}" for k in val_keys] + ["guard/warned"]:
        assert key in rows[1] and key in rows[2], key
    assert rows[1]["dpo/steps"] == 2 and "dpo/best_step" not in rows[1]  # no validation inside the DPO runs
    assert [r["val/val_score"] for r in rows] == pytest.approx([0.5, 0.6, 0.3])
    assert [r["val/best_iteration"] for r in rows] == [0, 0, 2]
    assert len(calls) == 3 and all(c["n_scenes"] == 2 for c in calls)

    # each DPO run starts from the previous policy, with it as the reference (reference=previous)
    second = load_config(DPOConfig, run / "iter_02" / "dpo" / "config.yaml")
    assert second.model == str(run / "iter_01" / "dpo" / "final") and second.ref_model is None
    assert result.best_iteration == 2 and same_weights(result.model_dir, run / "iter_02" / "dpo" / "final")
    assert not same_weights(run / "iter_01" / "dpo" / "final", policy)


def test_a_real_oracle_run_with_validation_inside_each_dpo_run_completes(
    captioner: Path, tmp_path: Path
) -> None:
    cfg = OnlineDPOConfig(
        model=str(captioner), out_dir=str(tmp_path / "run"), n_prompts=6, k=3, max_new_tokens=24,
        iterations=2, steps=2, batch_size=6, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0), n_val=2,
        val_max_new_tokens=24,
        eval_every=1, progress_bar=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a barely trained policy may trip the guardrail
        result = run_online_dpo(cfg)
    rewards = result.series("reward/mean")
    assert len(rewards) == 3 and all(0.0 <= r <= 4.0 for r in rewards)
    rows = read_metrics(result.run_dir)
    assert rows[1]["pairs/n"] > 0 and rows[1]["pairs/mean_margin"] > 0
    trained = [r for r in rows if r["step"] in (1, 2) and not r["skipped"]]
    assert trained and all("dpo/best_step" in r and "val/val_score" in r for r in trained)
    # the iteration's validation is the DPO run's best one (no second evaluation of the same model)
    for row in trained:
        it_dir = result.run_dir / f"iter_{int(row['step']):02d}" / "dpo"
        logged = [
            r for r in read_metrics(it_dir) if r["step"] == row["dpo/best_step"] and "val/val_score" in r
        ]
        assert logged[0]["val/val_score"] == pytest.approx(row["val/val_score"])
    assert (result.model_dir / "model.safetensors").is_file()
