"""The demo pipeline end to end at a miniature size: every stage writes what the next one reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmalign.recipes.demo import SUMMARY_KEYS, DemoSize, run_demo, stage_summary


def test_stage_summary_keeps_headline_numbers_only() -> None:
    result = {"chair_i": 0.25, "coverage": 1, "records": [1, 2], "pope_adversarial_f1": 0.5, "other": 3.0}
    assert stage_summary(result) == {"chair_i": 0.25, "coverage": 1.0, "pope_adversarial_f1": 0.5}


def test_miniature_demo_writes_summary_report_and_run_dirs(tmp_path: Path) -> None:
    size = DemoSize(n_scenes=24, n_eval=4, sft_steps=3, batch_size=4, lr=1e-3)
    summary = run_demo(tmp_path, size=size, seed=1)

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    sft = on_disk["sft"]
    for key in ("chair_i", "coverage", "well_formed", "pope_adversarial_f1", "deceptive_acc"):
        assert key in SUMMARY_KEYS and 0.0 <= sft[key] <= 1.0
    assert sft["steps"] == 3.0
    assert on_disk["settings"]["sft_steps"] == 3 and on_disk["settings"]["seed"] == 1
    metrics = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3
    world = json.loads((tmp_path / "sft" / "eval" / "world.json").read_text())
    assert world["chair_i"] == sft["chair_i"]
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "sft" in html


def test_miniature_demo_with_a_ddpo_stage_evaluates_both_stages(tmp_path: Path) -> None:
    size = DemoSize(
        n_scenes=24, n_eval=4, sft_steps=3, batch_size=4, lr=1e-3, stages=("sft", "ddpo"),
        pair_scenes=20, pair_samples=2, dpo_steps=2, dpo_batch_size=4, dpo_eval_every=1, n_val=2,
    )  # fmt: skip
    summary = run_demo(tmp_path, size=size, seed=0)

    assert set(summary) >= {"sft", "ddpo", "pairs", "settings", "timings"}
    assert summary["pairs"]["n"] >= 16  # an untrained policy's pairs are topped up with injected ones
    for stage in ("sft", "ddpo"):
        world = json.loads((tmp_path / stage / "eval" / "world.json").read_text())
        assert summary[stage]["chair_i"] == world["chair_i"]
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "ddpo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) == 2
    assert (tmp_path / "ddpo" / "final" / "model.safetensors").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "ddpo" in html


def test_miniature_demo_with_rm_and_online_stages_records_each_stage(tmp_path: Path) -> None:
    size = DemoSize(
        n_scenes=24, n_eval=4, sft_steps=3, batch_size=4, lr=1e-3,
        stages=("sft", "rm", "rsf", "online_dpo", "ppo"), n_val=2, rm_scenes=4, rm_val_scenes=2, rm_steps=2,
        online_prompts=3, online_k=2, rsf_iterations=1, rsf_steps=1, odpo_iterations=1, odpo_steps=1,
        ppo_iterations=1, ppo_rollout_batch=2, ppo_eval_every=1,
    )  # fmt: skip
    summary = run_demo(tmp_path, size=size, seed=0)

    assert {"accuracy", "acc_plus", "train_pairs"} <= set(summary["rm"])
    assert (tmp_path / "rm" / "final" / "reward_head.safetensors").is_file()
    # the RM stage keeps the SFT model's image features: vision tower + projector weights unchanged
    from mmalign.models.heads import load_reward_model
    from mmalign.models.load import load_model

    sft = dict(load_model(tmp_path / "sft" / "final", dtype="fp32")[0].named_parameters())
    rm = dict(load_reward_model(tmp_path / "rm" / "final")[0].backbone.named_parameters())
    frozen = [n for n in sft if "vision_tower" in n or "multi_modal_projector" in n]
    trained = [n for n in sft if "language_model.layers" in n]
    assert frozen and all(torch.equal(sft[n], rm[n]) for n in frozen)
    assert any(not torch.equal(sft[n], rm[n]) for n in trained)
    for stage in ("rsf", "online_dpo", "ppo"):
        world = json.loads((tmp_path / stage / "eval" / "world.json").read_text())
        assert summary[stage]["chair_i"] == world["chair_i"]
    assert len(summary["rsf"]["reward/mean"]) >= 1 and len(summary["online_dpo"]["oracle/mean"]) >= 1
    assert len(summary["ppo"]["reward/raw"]) >= 1 and len(summary["ppo"]["kl"]) >= 1
    for stage in ("online_dpo", "ppo"):  # both score with the trained RM
        assert str(tmp_path / "rm" / "final") in (tmp_path / stage / "config.yaml").read_text()


def test_reuse_keeps_finished_stages_and_runs_only_the_new_ones(tmp_path: Path, monkeypatch: Any) -> None:
    size = DemoSize(n_scenes=24, n_eval=4, sft_steps=2, batch_size=4, lr=1e-3, n_val=2, rm_scenes=4,
                    rm_val_scenes=2, rm_steps=1)  # fmt: skip
    first = run_demo(tmp_path, size=size, seed=0, stages=("sft",))
    sft_log = (tmp_path / "sft" / "metrics.jsonl").read_text()

    import mmalign.recipes.demo as demo

    def no_sft(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the finished SFT stage must not train again")

    monkeypatch.setattr(demo, "run_sft", no_sft)
    second = run_demo(tmp_path, size=size, seed=0, stages=("sft", "rm"), reuse=True)
    assert second["sft"] == first["sft"] and "accuracy" in second["rm"]
    assert (tmp_path / "sft" / "metrics.jsonl").read_text() == sft_log


def test_rm_stage_trains_on_the_oracle_corrections_of_sampled_captions(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import mmalign.rollout.generate as G
    from mmalign.data.io import read_jsonl
    from mmalign.models.tiny import build_tiny
    from mmalign.recipes.demo import rm_stage

    build_tiny("llava", tmp_path / "sft", seed=0)
    # every "sample" says the same two things: wrong for nearly every scene, so the oracle corrects it
    text = "There is a large red circle in the top left. There is a small green star in the bottom right."
    calls: list[dict[str, Any]] = []

    def fake_generate(
        model: Any, processor: Any, prompts: list[Any], images: list[Any], **kw: Any
    ) -> list[str]:
        calls.append({"n": len(prompts), **kw})
        return [text] * len(prompts)

    monkeypatch.setattr(G, "generate", fake_generate)
    size = DemoSize(n_scenes=1, n_eval=1, sft_steps=1, batch_size=4, lr=1e-3, rm_scenes=6, rm_val_scenes=4,
                    rm_steps=1, rm_policy_samples=3)  # fmt: skip
    model_dir, metrics = rm_stage(tmp_path / "sft", tmp_path, size, seed=0)

    assert [c["n"] for c in calls] == [6 * 3, 4 * 3]  # k samples of every training, then validation scene
    assert all(c["do_sample"] and c["temperature"] == 1.0 for c in calls)
    data = {split: list(read_jsonl(tmp_path / "rm_data" / f"{split}.jsonl")) for split in ("train", "val")}
    sampled = {split: [r for r in rows if r.source == "oracle-corrected"] for split, rows in data.items()}
    # identical samples of a scene give one pair; the rejected side is the sample, the chosen its correction
    assert 0 < len(sampled["train"]) <= 6 and 0 < len(sampled["val"]) <= 4
    assert all(r.rejected == text and r.chosen != text for rows in sampled.values() for r in rows)
    assert any(r.source == "oracle-variants" for r in data["train"])  # the variants are still there
    assert metrics["train_pairs"] == len(data["train"])
    assert metrics["train_policy_pairs"] == len(sampled["train"])
    assert metrics["policy_pairs"] == len(sampled["val"]) and 0.0 <= metrics["policy_accuracy"] <= 1.0
    assert (model_dir / "reward_head.safetensors").is_file()
