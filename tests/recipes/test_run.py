"""Run directory, metrics log, schedule, RNG capture and pickle-free checkpoints."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.recipes.run import (
    CheckpointError,
    MetricsLogger,
    OptimConfig,
    RunDir,
    build_optimizer,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_state,
    progress,
    read_metrics,
    restore_rng_state,
    save_checkpoint,
    save_state,
    warmup_cosine,
)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.out = torch.nn.Linear(4, 2)
        self.register_buffer("counter", torch.zeros(1))
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)))


def train_steps(model: Net, opt: torch.optim.Optimizer, sched: object, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 3, generator=gen)  # (5, 3)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
        opt.zero_grad()
        model.counter += 1


def make(total_steps: int = 10) -> tuple[Net, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = Net()
    opt, sched = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.01, warmup_ratio=0.2), total_steps)
    return model, opt, sched


def test_run_dir_creates_the_standard_layout(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "eval", "tensorboard"]
    assert run.config_path == run.path / "config.yaml"
    assert run.metrics_path == run.path / "metrics.jsonl"
    assert run.final_dir == run.path / "final"
    assert not run.has_progress()
    run.write_config(OptimConfig(lr=0.5))
    assert "lr: 0.5" in run.config_path.read_text()


def test_metrics_logger_writes_one_json_line_per_call_and_tensorboard_events(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with MetricsLogger(run.metrics_path, run.tensorboard_dir) as log:
        log.log(1, {"loss": 2.5, "lr": 0.1})
        log.log(2, {"loss": torch.tensor(1.25)})
    records = read_metrics(run.metrics_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.5), (2, 1.25)]
    assert records[0]["lr"] == 0.1 and records[0]["wall_time"] >= 0
    assert list(run.tensorboard_dir.glob("events.out.tfevents.*"))


def test_metrics_logger_on_resume_drops_lines_logged_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(path) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    with MetricsLogger(path, resume_step=3) as log:  # crashed after step 5, last checkpoint at step 3
        log.log(4, {"loss": 40.0})
    records = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    path.write_text('{"step": 1, "wall_time": 100.0}\n{"step": 2, "wall_time": 200.0}\n')
    with MetricsLogger(path, resume_step=1) as log:
        record = log.log(2, {"loss": 0.5})
    assert 100.0 <= record["wall_time"] < 150.0  # the run's clock continues from the kept line
    with MetricsLogger(path) as log:  # a fresh run starts an empty log
        pass
    assert read_metrics(path) == []


def test_warmup_cosine_values() -> None:
    # 10 steps, 2 warmup: 0.5, 1.0, then cosine over 8 steps down to min_ratio
    assert warmup_cosine(0, 10, 2) == 0.5
    assert warmup_cosine(1, 10, 2) == 1.0
    assert warmup_cosine(2, 10, 2) == 1.0
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)
    assert warmup_cosine(10, 10, 2, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(4, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))


def test_build_optimizer_excludes_1d_parameters_from_weight_decay() -> None:
    _, opt, _ = make(total_steps=10)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3]), torch.Size([2, 4])]
    assert [p.shape for p in no_decay["params"]] == [torch.Size([4]), torch.Size([2])]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # first warmup step: 0.1 * 1/2


def test_rng_state_round_trip_reproduces_python_numpy_and_torch_draws() -> None:
    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng_state(
        json.loads(json.dumps({**state, "torch": None}, default=str)) | {"torch": state["torch"]}
    )
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_save_state_round_trips_nested_values_without_pickle(tmp_path: Path) -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.arange(4)}},
        "groups": [{"betas": (0.9, 0.99)}],
    }
    save_state(state, tmp_path, "thing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing.json", "thing.safetensors"]
    back = load_state(tmp_path, "thing")
    assert list(back["state"]) == [0]  # int keys survive
    assert back["groups"][0]["betas"] == (0.9, 0.99)  # tuples survive
    assert torch.equal(back["state"][0]["m"], torch.arange(4))
    with pytest.raises(CheckpointError, match="cannot store a object"):
        save_state({"x": object()}, tmp_path, "bad")


def test_checkpoint_round_trip_restores_model_optimizer_scheduler_exactly(tmp_path: Path) -> None:
    model, opt, sched = make()
    train_steps(model, opt, sched, 3, seed=1)
    path = save_checkpoint(tmp_path / "checkpoints", model, opt, sched, 3, {"epoch": 1, "batch_index": 2})
    assert path.name == "step_00000003"
    assert sorted(p.suffix for p in path.iterdir() if p.is_file()) == [".json"] * 4 + [".safetensors"] * 3

    fresh, fresh_opt, fresh_sched = make()
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert (state.step, state.data_state) == (3, {"epoch": 1, "batch_index": 2})
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    saved, loaded = opt.state_dict(), fresh_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for idx, slots in saved["state"].items():
        for key, value in slots.items():
            assert torch.equal(value, loaded["state"][idx][key]), (idx, key)
    assert fresh_sched.state_dict() == sched.state_dict()

    # continuing both gives identical parameters
    train_steps(model, opt, sched, 2, seed=2)
    train_steps(fresh, fresh_opt, fresh_sched, 2, seed=2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_checkpoint_restores_the_rng_state_captured_when_saving(tmp_path: Path) -> None:
    model, opt, sched = make()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, model, opt, sched, 1, {})
    expected = torch.rand(3)
    torch.manual_seed(999)
    load_checkpoint(path, model, opt, sched)
    assert torch.equal(torch.rand(3), expected)


def test_only_the_newest_checkpoints_are_kept_and_temp_dirs_are_ignored(tmp_path: Path) -> None:
    model, opt, sched = make()
    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        save_checkpoint(ckpts, model, opt, sched, step, {}, keep=2)
    (ckpts / ".tmp-step_00000010-1").mkdir()  # a checkpoint whose writer was killed half way
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]
    assert latest_checkpoint(tmp_path) == ckpts / "step_00000008"
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_saving_the_same_step_again_replaces_the_checkpoint(tmp_path: Path) -> None:
    model, opt, sched = make()
    save_checkpoint(tmp_path, model, opt, sched, 5, {"epoch": 0})
    save_checkpoint(tmp_path, model, opt, sched, 5, {"epoch": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]
    assert load_checkpoint(tmp_path / "step_00000005", model).data_state == {"epoch": 7}


def test_loading_into_a_different_model_is_a_checkpoint_error(tmp_path: Path) -> None:
    model, opt, sched = make()
    path = save_checkpoint(tmp_path, model, opt, sched, 1, {})
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_checkpoint(path, torch.nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path, model)


def test_frozen_parameters_are_not_stored(tmp_path: Path) -> None:
    model, opt, sched = make()
    model.fc.requires_grad_(False)
    path = save_checkpoint(tmp_path, model, opt, sched, 1, {})
    from safetensors.torch import load_file

    assert sorted(load_file(str(path / "model.safetensors"))) == ["counter", "out.bias", "out.weight"]


def test_progress_bar_reports_steps_and_fields_on_stderr_and_is_silent_when_disabled(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with progress(3, "train", enabled=True) as bar:
        for _ in range(3):
            bar.advance(1, loss=0.5)
    out = capsys.readouterr()
    assert out.out == ""
    assert "3/3" in out.err and "loss=0.5" in out.err
    with progress(3, enabled=False) as bar:
        bar.advance(1, loss=0.5)
    assert capsys.readouterr() == ("", "")
