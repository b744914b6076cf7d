"""``mmalign demo``: the shapes world end to end on a CPU.

world → tiny LLaVA (built from a config, saved, reloaded) → SFT on a corpus with injected
hallucinations → exact evaluation on held-out scenes → ``summary.json`` + ``report.html``.
The SFT model is *meant* to hallucinate (the co-occurrence trigger of WORLD.md): it is the baseline
that the alignment stages (added by later issues) must improve on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mmalign.atomic import atomic_write_json
from mmalign.eval.report import write_report
from mmalign.eval.runner import evaluate_world, save_eval
from mmalign.models.load import count_parameters, load_model
from mmalign.models.tiny import build_tiny
from mmalign.recipes.run import OptimConfig
from mmalign.recipes.sft import SFTConfig, run_sft
from mmalign.world.corpus import CorpusMix, make_world, read_eval_scenes

console = Console(stderr=True)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is (``quick`` must finish in < 3 min on 2 CPU cores, default in < 10 min)."""

    n_scenes: int
    """Training scenes of the SFT corpus."""
    n_eval: int
    """Held-out scenes for evaluation."""
    sft_steps: int
    batch_size: int
    lr: float
    sampled_captions: int = 1
    """Sampled captions per held-out scene (besides the greedy one)."""


QUICK = DemoSize(n_scenes=1500, n_eval=100, sft_steps=850, batch_size=32, lr=1e-3)
FULL = DemoSize(n_scenes=3000, n_eval=300, sft_steps=2400, batch_size=32, lr=1e-3)
MIX = CorpusMix(qa_per_scene=1, dialogue_prob=0.05)
"""Caption-heavy corpus mix: grounding (shapes, colours, cells) is what the tiny model learns slowest."""

SUMMARY_KEYS = (
    "chair_i",
    "chair_s",
    "coverage",
    "well_formed",
    "attribute_error",
    "sampled.chair_i",
    "sampled.coverage",
    "sampled.well_formed",
    "pope_random_f1",
    "pope_popular_f1",
    "pope_adversarial_f1",
    "pope_adversarial_yes_ratio",
    "qa_acc",
    "deceptive_acc",
    "deceptive_acc_remedy",
)


def stage_summary(result: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one stage's eval result (missing keys are skipped)."""
    return {k: float(result[k]) for k in SUMMARY_KEYS if isinstance(result.get(k), int | float)}


def run_demo(
    out: str | Path, *, quick: bool = False, seed: int = 0, size: DemoSize | None = None
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the summary (also written to ``out/summary.json``).

    ``size`` overrides the preset chosen by ``quick`` (tests use a miniature one)."""
    out = Path(out)
    size = size or (QUICK if quick else FULL)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    console.rule("[bold]1/4 shapes world")
    world = make_world(out / "world", n=size.n_scenes, seed=seed, n_eval=size.n_eval, n_text=0, mix=MIX)
    timings["world_s"] = time.perf_counter() - t0

    console.rule("[bold]2/4 tiny LLaVA (from config, saved with safetensors, reloaded)")
    base_dir = out / "models" / "base"
    model, _ = build_tiny("llava", base_dir, seed=seed)
    n_params = count_parameters(model)
    del model
    console.print(f"tiny LLaVA: {n_params:,} parameters → {base_dir}")

    console.rule("[bold]3/4 SFT")
    t = time.perf_counter()
    sft_cfg = SFTConfig(
        model=str(base_dir),
        data=str(world["sft"]),
        out_dir=str(out / "sft"),
        batch_size=size.batch_size,
        max_steps=size.sft_steps,
        epochs=100,
        optim=OptimConfig(lr=size.lr),
        seed=seed,
        log_every=10,
        save_every=0,
    )
    sft = run_sft(sft_cfg, overwrite=True)
    timings["sft_s"] = time.perf_counter() - t

    console.rule("[bold]4/4 evaluation on held-out scenes")
    t = time.perf_counter()
    model, processor = load_model(sft.model_dir, for_training=False)
    scenes = read_eval_scenes(world["eval_scenes"])
    result = evaluate_world(model, processor, scenes, seed=seed)
    save_eval(result, out / "sft" / "eval" / "world.json")
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "sft": {**stage_summary(result), "final_loss": sft.final_loss, "steps": float(sft.steps)},
        "settings": {
            "quick": quick,
            "seed": seed,
            "model": "tiny llava",
            "parameters": n_params,
            **{k: v for k, v in vars(size).items()},
        },
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write_json(out / "summary.json", summary)
    write_report(out, out / "report.html")
    return summary
