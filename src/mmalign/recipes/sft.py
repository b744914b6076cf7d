"""Supervised fine-tuning recipe: next-token loss on the assistant turns of ``Sample`` conversations.

Read top to bottom: config → data → model → optimiser → loop (gradient accumulation, grad-norm clipping,
warmup + cosine LR, loss on assistant tokens only) → checkpoints → final model in ``run_dir/final``.

Determinism: the data order of epoch ``e`` is a permutation drawn from ``(seed, e)``; a checkpoint stores
model, optimiser, scheduler, RNG states and the data position (epoch, next micro-batch), so
``run_sft(cfg, resume=True)`` after an interruption ends with exactly the parameters and loss of an
uninterrupted run.

The loss of one optimiser step is the mean token cross-entropy over all assistant tokens of its
``grad_accum`` micro-batches (each micro-batch's summed loss is divided by the window's token count), so
``grad_accum=2, batch_size=2`` computes the same gradient as ``grad_accum=1, batch_size=4``.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmalign.config import load_config
from mmalign.errors import ConfigError, DataError
from mmalign.recipes.run import (
    MetricsLogger,
    OptimConfig,
    RunDir,
    TrainLoopConfig,
    build_optimizer,
    latest_checkpoint,
    load_checkpoint,
    progress,
    read_metrics,
    save_checkpoint,
    warn_if_config_changed,
)

IGNORE_INDEX = -100
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class SFTConfig(TrainLoopConfig):
    """Supervised fine-tuning of a vision-language (or text) model on ``Sample`` conversations."""

    model: str = "tiny:llava"
    """Model to fine-tune: a local directory, a hub id, or ``tiny:<arch>`` (llava, qwen2_vl, idefics3,
    paligemma, llama)."""
    data: str = ""
    """JSONL file of ``Sample`` records (image paths relative to the file's folder)."""
    out_dir: str = "runs/sft"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and learning-rate schedule."""


@dataclass
class SFTResult:
    """What :func:`run_sft` produced."""

    run_dir: Path
    final_loss: float
    """Loss of the last optimiser step (mean over its assistant tokens)."""
    steps: int
    """Optimiser steps taken in total (including those before a resume)."""
    model_dir: Path
    """``run_dir/final``: the trained model (``save_pretrained``) and its processor."""


def load_sft_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> SFTConfig:
    """``SFTConfig`` from a YAML file (e.g. ``recipes/configs/sft.yaml``) and ``key=value`` overrides."""
    return load_config(SFTConfig, yaml_path, overrides)


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataPosition:
    """Where the data stream is: the next micro-batch is ``batch_index`` of epoch ``epoch``."""

    epoch: int = 0
    batch_index: int = 0

    def as_dict(self, seed: int) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": seed}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` examples in ``epoch`` — a pure function of ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def micro_batches(
    records: Sequence[Any], batch_size: int, seed: int, start: DataPosition, epochs: int | None
) -> Iterator[tuple[DataPosition, list[Any]]]:
    """Yield ``(position after this batch, records)`` from ``start`` on; ``epochs=None`` cycles forever.
    The last micro-batch of an epoch may be smaller than ``batch_size``."""
    n_batches = math.ceil(len(records) / batch_size)
    epoch, index = start.epoch, start.batch_index
    while epochs is None or epoch < epochs:
        order = epoch_order(len(records), seed, epoch)
        while index < n_batches:
            batch = [records[i] for i in order[index * batch_size : (index + 1) * batch_size]]
            index += 1
            yield (DataPosition(epoch, index) if index < n_batches else DataPosition(epoch + 1, 0)), batch
        epoch, index = epoch + 1, 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------- loss
def assistant_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over positions whose label is not ``-100``.

    logits: (B, T, V); labels: (B, T) aligned with the inputs (the shift happens here). Returns a scalar.
    """
    shifted_logits = logits[:, :-1, :].float()  # (B, T-1, V) predicts tokens 1..T-1
    shifted_labels = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_target_tokens(labels: torch.Tensor) -> int:
    """Tokens that contribute to the loss: labels (B, T) after the shift that are not ``-100``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ----------------------------------------------------------------------------------------------- recipe
def run_sft(
    cfg: SFTConfig,
    resume: bool = False,
    *,
    overwrite: bool = False,
    on_checkpoint: Callable[[Path, int], None] | None = None,
) -> SFTResult:
    """Fine-tune ``cfg.model`` on ``cfg.data``; write the run to ``cfg.out_dir``.

    ``resume=True`` continues from the newest checkpoint in ``cfg.out_dir`` (or starts afresh when there is
    none). Otherwise a run directory that already holds metrics or checkpoints is an error, unless
    ``overwrite=True`` (which first deletes its metrics, TensorBoard logs, checkpoints and final model).
    ``on_checkpoint(path, step)`` is called after each checkpoint is written (a hook for tests/tools).
    """
    from mmalign.data.collate import SFTCollator
    from mmalign.data.io import read_jsonl
    from mmalign.data.schema import Dialogue, Sample
    from mmalign.models.kernels import lean_kernels
    from mmalign.models.load import load_model

    # -- config & run dir
    data_path = Path(cfg.data)
    if not cfg.data:
        raise ConfigError("data: required (path to a JSONL file of Sample records)")
    if not data_path.is_file():
        raise ConfigError(f"data: {data_path}: no such file")
    run = RunDir(cfg.out_dir)
    if overwrite and not resume:
        run.clear()
    if not resume and run.has_progress():
        raise ConfigError(
            f"out_dir: {run.path} already holds a run (metrics or checkpoints); "
            "resume it, overwrite it, or choose another out_dir"
        )
    if resume:
        warn_if_config_changed(run, cfg)
    run.write_config(cfg)

    # -- data
    records = read_jsonl(data_path)
    if not records:
        raise DataError("no records", file=str(data_path))
    wrong = [r for r in records if not isinstance(r, Sample | Dialogue)]
    if wrong:
        raise DataError(
            f"SFT trains on sample/dialogue records, found a {wrong[0].kind!r}", file=str(data_path)
        )
    n_batches = math.ceil(len(records) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)

    # -- model (seeded first: tiny-model init, LoRA init and dropout draw from the global RNG)
    seed_everything(cfg.seed)
    model, processor = load_model(cfg.model, dtype="fp32", lora=cfg.lora)
    model.train()
    collate = SFTCollator(processor, cfg.max_length, cfg.truncation, base_dir=data_path.parent)
    optimizer, scheduler = build_optimizer(model, cfg.optim, total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # -- resume
    step, position = 0, DataPosition()
    checkpoint = latest_checkpoint(run.path) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler)
        step = state.step
        position = DataPosition(state.data_state["epoch"], state.data_state["batch_index"])
    metrics = MetricsLogger(run.metrics_path, run.tensorboard_dir, resume_step=step if checkpoint else None)

    # -- loop
    stream = micro_batches(records, cfg.batch_size, cfg.seed, position, None if cfg.max_steps else cfg.epochs)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    loss = float("nan")
    show_bar = None if cfg.progress_bar else False  # None: only on a terminal
    with metrics, progress(total_steps, "sft", completed=step, enabled=show_bar) as bar:
        while step < total_steps:
            window, position = next_window(stream, collate, cfg.grad_accum, position)
            if not window:
                break  # data exhausted (only when some batches were dropped entirely)
            n_tokens = max(1, sum(count_target_tokens(b["labels"]) for b in window))
            loss_sum = 0.0
            for batch in window:
                labels = batch.pop("labels")  # (B, T)
                with autocast, lean_kernels():  # same values, leaner norm/rotary autograd (models.kernels)
                    logits = model(**batch).logits  # (B, T, V)
                micro_loss = assistant_token_loss_sum(logits, labels)
                (micro_loss / n_tokens).backward()
                loss_sum += float(micro_loss.detach())
            clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = loss_sum / n_tokens

            if step % cfg.log_every == 0 or step == total_steps:
                metrics.log(
                    step,
                    {
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": n_tokens,
                        "epoch": position.epoch,
                    },
                )
            if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
                path = save_checkpoint(
                    run.checkpoints_dir,
                    model,
                    optimizer,
                    scheduler,
                    step,
                    position.as_dict(cfg.seed),
                    keep=cfg.keep_checkpoints,
                )
                if on_checkpoint is not None:
                    on_checkpoint(path, step)
            bar.advance(1, loss=loss)

    if math.isnan(loss):  # resumed a run that had already finished: report its last logged loss
        logged = [r["loss"] for r in read_metrics(run.metrics_path) if "loss" in r]
        loss = float(logged[-1]) if logged else float("nan")

    # -- final model
    model_dir = save_final_model(model, processor, run.final_dir, merge_lora=cfg.lora is not None)
    return SFTResult(run_dir=run.path, final_loss=loss, steps=step, model_dir=model_dir)


def next_window(
    stream: Iterator[tuple[DataPosition, list[Any]]], collate: Any, grad_accum: int, position: DataPosition
) -> tuple[list[Any], DataPosition]:
    """Collate the next ``grad_accum`` non-empty micro-batches; returns them and the data position after.

    ``collate(records)`` returns None when every example of a micro-batch was dropped for length; such
    micro-batches are skipped (shared by every training recipe)."""
    window: list[Any] = []
    skipped = 0
    for position, records in stream:  # noqa: B007 - the position after the last batch is returned
        batch = collate(records)
        if batch is None:  # every example of the micro-batch was too long and dropped
            skipped += 1
            if skipped > 10_000:
                raise DataError("every example is longer than max_length and was dropped")
            continue
        window.append(batch)
        if len(window) == grad_accum:
            break
    return window, position


def save_final_model(model: Any, processor: Any, out_dir: Path, *, merge_lora: bool = False) -> Path:
    """``save_pretrained`` the model (LoRA merged in when asked) and processor to ``out_dir``, atomically."""
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
