"""SFT recipe: loss on assistant tokens, deterministic data order, learning, resume == uninterrupted, bf16."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.config import dump_config, load_config
from mmalign.errors import ConfigError, DataError
from mmalign.recipes.run import OptimConfig, list_checkpoints, read_metrics
from mmalign.recipes.sft import (
    DataPosition,
    SFTConfig,
    SFTResult,
    assistant_token_loss_sum,
    count_target_tokens,
    epoch_order,
    micro_batches,
    run_sft,
)

STEPS = 12
KILL_SCRIPT = """
import os, signal, sys
from mmalign.config import load_config
from mmalign.recipes.sft import SFTConfig, run_sft

cfg = load_config(SFTConfig, sys.argv[1])
kill_at = int(sys.argv[2])


def die_after(path, step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


run_sft(cfg, on_checkpoint=die_after)
"""


# ----------------------------------------------------------------------------------------------- pure parts
def test_loss_sums_shifted_cross_entropy_over_unmasked_labels_only() -> None:
    # vocab 2, uniform logits → every counted token costs ln 2; position 0's label is never predicted
    logits = torch.zeros(1, 4, 2)  # (B, T, V)
    labels = torch.tensor([[1, -100, 0, 1]])  # (B, T): targets for positions 1..3 are -100, 0, 1
    assert count_target_tokens(labels) == 2
    assert float(assistant_token_loss_sum(logits, labels)) == pytest.approx(2 * math.log(2))
    logits[0, 1, 0] = 10.0  # position 1 predicts token 0 (label at 2 is 0) with high confidence
    expected = math.log(2) + math.log1p(math.exp(-10.0))
    assert float(assistant_token_loss_sum(logits, labels)) == pytest.approx(expected)


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    assert sorted(epoch_order(10, seed=3, epoch=0)) == list(range(10))
    assert epoch_order(10, 3, 0) == epoch_order(10, 3, 0)
    assert epoch_order(10, 3, 0) != epoch_order(10, 3, 1)
    assert epoch_order(10, 3, 0) != epoch_order(10, 4, 0)


def test_micro_batches_resume_from_a_position_exactly_where_they_stopped() -> None:
    records = list(range(5))  # 3 batches per epoch: sizes 2, 2, 1
    full = list(micro_batches(records, 2, seed=0, start=DataPosition(), epochs=2))
    assert [len(b) for _, b in full] == [2, 2, 1, 2, 2, 1]
    assert [pos for pos, _ in full][:3] == [DataPosition(0, 1), DataPosition(0, 2), DataPosition(1, 0)]
    assert sorted(x for _, b in full[:3] for x in b) == records
    resumed = list(micro_batches(records, 2, seed=0, start=full[3][0], epochs=2))
    assert resumed == full[4:]


def test_bad_data_is_rejected_before_any_model_is_loaded(tmp_path: Path) -> None:
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import Message, PreferencePair

    with pytest.raises(ConfigError, match=r"^data: required"):
        run_sft(SFTConfig(out_dir=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="no such file"):
        run_sft(SFTConfig(data=str(tmp_path / "missing.jsonl"), out_dir=str(tmp_path / "b")))
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, [PreferencePair(id="p", prompt=[Message.user("hi")], chosen="a", rejected="b")])
    with pytest.raises(
        DataError, match=r"pairs\.jsonl: SFT trains on sample/dialogue records, found a 'pair'"
    ):
        run_sft(SFTConfig(model="tiny:does-not-matter", data=str(pairs), out_dir=str(tmp_path / "c")))


# ----------------------------------------------------------------------------------------------- recipe runs
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mmalign.models.tiny import build_tiny
    from mmalign.world.corpus import make_world

    root = tmp_path_factory.mktemp("sft")
    paths = make_world(root / "world", 12, seed=0, n_eval=0, n_text=0)
    build_tiny(
        "llava",
        root / "model",
        image_size=32,
        patch_size=16,
        vision_hidden=32,
        vision_layers=1,
        text_hidden=32,
        text_layers=1,
        heads=2,
    )
    return {"data": paths["sft"], "model": root / "model", "root": root}


def config(world: dict[str, Path], name: str, **changes: object) -> SFTConfig:
    base = SFTConfig(
        model=str(world["model"]),
        data=str(world["data"]),
        out_dir=str(world["root"] / name),
        max_length=160,
        batch_size=4,
        grad_accum=1,
        max_steps=STEPS,
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.1, weight_decay=0.01),
        log_every=2,
        save_every=3,
        keep_checkpoints=2,
        progress_bar=False,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def uninterrupted(world: dict[str, Path]) -> SFTResult:
    return run_sft(config(world, "full"))


def final_weights(result: SFTResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.model_dir / "model.safetensors"))


def test_sft_loss_decreases_and_weights_change(world: dict[str, Path], uninterrupted: SFTResult) -> None:
    losses = [r["loss"] for r in read_metrics(uninterrupted.run_dir)]
    assert uninterrupted.steps == STEPS
    assert uninterrupted.final_loss == losses[-1]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    before = load_file(str(world["model"] / "model.safetensors"))
    after = final_weights(uninterrupted)
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    # full fine-tuning moves every tensor except the vision tower's last norm, which LLaVA does not use
    # (it takes the features of the layer before it)
    assert unchanged == ["vision_tower.post_layernorm.bias", "vision_tower.post_layernorm.weight"]


def test_run_dir_has_config_metrics_per_logged_step_checkpoints_and_final_model(
    uninterrupted: SFTResult,
) -> None:
    run = uninterrupted.run_dir
    assert load_config(SFTConfig, run / "config.yaml") == config_for(run)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]  # log_every=2
    assert {"loss", "lr", "grad_norm", "tokens", "epoch", "wall_time"} <= records[0].keys()
    assert [p.name for p in list_checkpoints(run)] == ["step_00000009", "step_00000012"]  # keep=2
    assert (uninterrupted.model_dir / "config.json").is_file()
    assert (uninterrupted.model_dir / "processor_config.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def config_for(run: Path) -> SFTConfig:
    return load_config(SFTConfig, run / "config.yaml")


def test_resume_after_sigkill_equals_the_uninterrupted_run(
    world: dict[str, Path], uninterrupted: SFTResult, tmp_path: Path
) -> None:
    cfg = config(world, "killed")
    cfg_path = dump_config(cfg, tmp_path / "killed.yaml")
    script = tmp_path / "kill_after_checkpoint.py"
    script.write_text(KILL_SCRIPT, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), str(cfg_path), str(STEPS // 2)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = Path(cfg.out_dir)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003", "step_00000006"]
    assert not (run / "final").exists()
    assert [r["step"] for r in read_metrics(run)] == [2, 4, 6]

    with pytest.raises(ConfigError, match="already holds a run"):
        run_sft(cfg)  # refuses to start over a run without resume or overwrite
    resumed = run_sft(cfg, resume=True)

    assert resumed.steps == STEPS
    assert abs(resumed.final_loss - uninterrupted.final_loss) < 1e-6
    want, got = final_weights(uninterrupted), final_weights(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    full_log = [(r["step"], r["loss"]) for r in read_metrics(uninterrupted.run_dir)]
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == full_log


def test_gradient_accumulation_matches_a_bigger_batch(world: dict[str, Path]) -> None:
    run_sft(config(world, "bs4", max_steps=2, save_every=0))
    one = run_sft(config(world, "bs4", max_steps=1, save_every=0), overwrite=True)  # replaces that run
    two = run_sft(config(world, "bs2x2", max_steps=1, save_every=0, batch_size=2, grad_accum=2))
    assert [r["step"] for r in read_metrics(one.run_dir)] == [1]
    assert two.final_loss == pytest.approx(one.final_loss, abs=1e-5)
    a, b = final_weights(one), final_weights(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bf16_autocast_run_trains_with_fp32_master_weights(world: dict[str, Path]) -> None:
    fp32 = run_sft(config(world, "fp32_2", max_steps=2, save_every=0))
    bf16 = run_sft(config(world, "bf16_2", max_steps=2, save_every=0, dtype="bf16"))
    assert math.isfinite(bf16.final_loss)
    assert bf16.final_loss != fp32.final_loss  # the forward really ran in bf16 …
    assert bf16.final_loss == pytest.approx(fp32.final_loss, abs=0.1)  # … and computed the same thing
    assert all(t.dtype == torch.float32 for t in final_weights(bf16).values())


def test_lora_run_checkpoints_only_the_adapter_resumes_exactly_and_saves_a_merged_model(
    world: dict[str, Path],
) -> None:
    from mmalign.models.load import LoraSpec

    cfg = config(world, "lora", max_steps=4, save_every=2, keep_checkpoints=0, lora=LoraSpec(r=4, alpha=8.0))
    full = run_sft(cfg)
    checkpoint_keys = load_file(str(Path(cfg.out_dir) / "checkpoints/step_00000002/model.safetensors")).keys()
    assert checkpoint_keys and all(".lora_A." in k or ".lora_B." in k for k in checkpoint_keys)

    base = load_file(str(world["model"] / "model.safetensors"))
    merged = final_weights(full)
    assert merged.keys() == base.keys()  # the adapter is merged into plain weights
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed and all(k.startswith("language_model.model.layers.") for k in changed)

    # pretend the process died after the step-2 checkpoint, then resume
    shutil.rmtree(full.model_dir)
    shutil.rmtree(Path(cfg.out_dir) / "checkpoints/step_00000004")
    resumed = run_sft(cfg, resume=True)
    assert resumed.final_loss == full.final_loss
    again = final_weights(resumed)
    assert all(torch.equal(merged[k], again[k]) for k in merged)
