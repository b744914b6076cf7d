"""Shared scaffolding of the online-recipe tests (RSF, online DPO, PPO): tiny models, a captioner that
writes caption-like text, and small readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from mmalign.rollout.rewards import RewardBatch, RewardOutput

TINY = dict(image_size=32, patch_size=8, text_hidden=64, text_layers=2, vision_hidden=32)


def tiny_llava(path: Path) -> Path:
    """A tiny LLaVA saved at ``path``."""
    from mmalign.models.tiny import build_tiny

    build_tiny("llava", path, **TINY)  # type: ignore[arg-type]
    return path


def sft_captioner(policy: Path) -> Path:
    """``policy`` after 50 SFT steps on 16 true captions: it writes caption-like text the oracle scores
    unevenly (a random policy's samples all score 0). Written next to ``policy``; returns the SFT model."""
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import ImageRef, Message, Sample
    from mmalign.eval.runner import caption_messages
    from mmalign.recipes.run import OptimConfig
    from mmalign.recipes.sft import SFTConfig, run_sft
    from mmalign.world.corpus import train_scenes
    from mmalign.world.grammar import caption
    from mmalign.world.render import render

    root = policy.parent
    write_jsonl(root / "captions.jsonl", [
        Sample(id=f"c{i}", images=[ImageRef.from_pil(render(s, 32))],
               conversation=[*caption_messages(), Message.assistant(caption(s))])
        for i, s in enumerate(train_scenes(16, seed=7))
    ])  # fmt: skip
    cfg = SFTConfig(
        model=str(policy), data=str(root / "captions.jsonl"), out_dir=str(root / "sft"), batch_size=8,
        max_steps=50, optim=OptimConfig(lr=1e-2, warmup_ratio=0.0), progress_bar=False,
    )  # fmt: skip
    return run_sft(cfg).model_dir


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class TableReward:
    """Call ``c`` scores its (N·K) responses with ``tables[c]`` (N rows of K), whatever they say; the last
    table repeats. With ``aspects`` the output also has an aspect ``double`` (2 × the score)."""

    name = "table"

    def __init__(self, tables: list[list[list[float]]], *, aspects: bool = False) -> None:
        self.tables = tables
        self.aspects = aspects
        self.batches: list[RewardBatch] = []

    def score(self, batch: RewardBatch) -> RewardOutput:
        table = self.tables[min(len(self.batches), len(self.tables) - 1)]
        self.batches.append(batch)
        scores = torch.tensor(table, dtype=torch.float32).flatten()
        return RewardOutput(scores=scores, aspects={"double": 2 * scores} if self.aspects else {})
