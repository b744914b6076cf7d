"""``mmalign demo``: the shapes world end to end on a CPU.

world → tiny LLaVA (built from a config, saved, reloaded) → SFT on a corpus with injected
hallucinations → exact evaluation on held-out scenes → (default run) preference pairs from the SFT
model's own *sampled* captions, corrected by the oracle (RLHF-V style, errors anywhere in the response)
→ DPO, DDPO and MM-DPO from the same SFT model on the same pairs, each with validation, best-checkpoint
selection and early stopping → a fact-augmented reward model (``rm``) on oracle-labelled caption variants
and the oracle's corrections of the SFT model's own sampled captions
→ online stages from the SFT model: rejection sampling (``rsf``, oracle reward), online iterative DPO
(``online_dpo``, the reward model) and PPO (``ppo``, the fact-augmented RM with LLaVA-RLHF shaping) →
the same evaluation per stage → ``summary.json`` + ``report.html``.
The SFT model is *meant* to hallucinate (the co-occurrence trigger of WORLD.md): it is the baseline
that the alignment stages must improve on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from mmalign.atomic import atomic_write_json, atomic_write_lines
from mmalign.eval.report import write_report
from mmalign.eval.runner import evaluate_world, save_eval
from mmalign.losses.dpo import LossType
from mmalign.models.load import count_parameters, load_model
from mmalign.models.tiny import build_tiny
from mmalign.recipes.dpo import DPOConfig, run_dpo
from mmalign.recipes.pairs import injected_pairs, pair_stats, sample_pairs, write_pairs
from mmalign.recipes.run import OptimConfig
from mmalign.recipes.sft import SFTConfig, run_sft
from mmalign.world.corpus import CorpusMix, eval_scenes, make_world, read_eval_scenes, train_scenes
from mmalign.world.scene import Scene

console = Console(stderr=True)

ALIGN_STAGES: dict[str, LossType] = {"dpo": LossType.DPO, "ddpo": LossType.DDPO, "mmdpo": LossType.MMDPO}
"""Preference stages of the demo, each trained from the SFT model on the same pairs."""
ONLINE_STAGES = ("rsf", "online_dpo", "ppo")
"""Online stages, each from the SFT model; ``online_dpo`` and ``ppo`` score with the ``rm`` stage's model."""
STAGES = ("sft", *ALIGN_STAGES, "rm", *ONLINE_STAGES)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is (``quick`` must finish in < 3 min on 2 CPU cores, default in < 10 min)."""

    n_scenes: int
    """Training scenes of the SFT corpus."""
    n_eval: int
    """Held-out scenes for the evaluation of every stage."""
    sft_steps: int
    batch_size: int
    lr: float
    stages: tuple[str, ...] = ("sft",)
    """Stages to run: ``sft`` plus any of ALIGN_STAGES."""
    pair_scenes: int = 300
    """Training scenes whose sampled captions become preference pairs."""
    pair_samples: int = 4
    """Sampled captions per pair scene (temperature 1)."""
    dpo_steps: int = 120
    dpo_batch_size: int = 8
    dpo_lr: float = 3e-5
    dpo_sft_weight: float = 1.0
    """RPO-style NLL on the chosen response: without it every variant ended captions early (coverage fell
    from 0.85 to 0.46 in 60 steps of DDPO); with it CHAIR_i fell and coverage held (docs/RESULTS.md)."""
    dpo_eval_every: int = 20
    n_val: int = 40
    """Validation scenes (a seed stream disjoint from training and from the held-out test scenes)."""
    rm_scenes: int = 200
    """Training scenes whose caption variants (true, invented object, wrong colour, …) become RM pairs."""
    rm_val_scenes: int = 40
    rm_policy_samples: int = 8
    """Captions sampled from the SFT model per RM training and validation scene; the oracle's corrections of
    the erroneous ones join the RM data as RLHF-V pairs. RMs trained on caption variants alone learnt
    shortcuts of the variant generator and scored the policy's own hallucinations worse (issue 5, session 5:
    0.89 → 0.97 held-out accuracy on such pairs with them in training; docs/RESULTS.md). 0: variants only."""
    rm_steps: int = 400
    rm_lr: float = 3e-4
    """The tiny RM underfits at the DPO-like 2e-5: held-out accuracy 0.63 after 150 steps, 0.67 at 1e-4 and
    0.76 at 3e-4 after 300 steps (docs/RESULTS.md)."""
    online_prompts: int = 64
    """Training-scene caption prompts per online iteration (rsf, online_dpo, ppo)."""
    online_k: int = 4
    """Samples per prompt in the online stages."""
    rsf_iterations: int = 2
    rsf_steps: int = 40
    odpo_iterations: int = 3
    odpo_steps: int = 30
    ppo_iterations: int = 8
    ppo_rollout_batch: int = 16
    """Prompts per PPO iteration (``online_k`` samples each)."""
    ppo_eval_every: int = 2


QUICK = DemoSize(n_scenes=1500, n_eval=100, sft_steps=760, batch_size=32, lr=1e-3)
FULL = DemoSize(
    n_scenes=3000,
    n_eval=200,
    sft_steps=2000,
    batch_size=32,
    lr=1e-3,
    stages=STAGES,
)
MIX = CorpusMix(qa_per_scene=1, dialogue_prob=0.05)
"""Caption-heavy corpus mix: grounding (shapes, colours, cells) is what the tiny model learns slowest."""
MIN_PAIRS = 16
"""Fewer sampled pairs than this are topped up with model-free mid-caption error pairs."""
VAL_SEED_OFFSET = 1000
"""Validation scenes come from ``eval_scenes(n, seed + VAL_SEED_OFFSET)``: disjoint from the test scenes."""

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


def write_scenes(path: Path, scenes: list[Scene]) -> Path:
    """Scenes as an ``eval_scenes.jsonl``-style file (what recipes read as validation scenes)."""
    return atomic_write_lines(path, (json.dumps(s.to_dict()) for s in scenes))


def evaluate_stage(model_dir: Path, stage_dir: Path, scenes: list[Scene], seed: int) -> dict[str, Any]:
    """The same held-out evaluation for every stage; written to ``stage_dir/eval/world.json``."""
    model, processor = load_model(model_dir, for_training=False)
    result = evaluate_world(model, processor, scenes, seed=seed)
    save_eval(result, stage_dir / "eval" / "world.json")
    return result


def build_pairs(sft_dir: Path, out: Path, size: DemoSize, seed: int) -> tuple[Path, dict[str, Any]]:
    """Oracle-corrected pairs from the SFT model's own sampled captions of training scenes."""
    model, processor = load_model(sft_dir, for_training=False)
    scenes = train_scenes(size.pair_scenes, seed)
    pairs = sample_pairs(
        model, processor, scenes, k=size.pair_samples, temperature=1.0, seed=seed, kind="corrected",
        image_dir=out / "images", relative_to=out,
    )  # fmt: skip
    if len(pairs) < MIN_PAIRS:  # an undertrained policy writes little that the oracle can correct
        extra = injected_pairs(scenes, seed=seed, image_dir=out / "images", relative_to=out)
        pairs += extra[: MIN_PAIRS - len(pairs)]
        console.print(
            f"[yellow]only a few sampled pairs: topped up with {len(extra[:MIN_PAIRS])} injected ones"
        )
    path = out / "pairs.jsonl"
    write_pairs(path, pairs)
    return path, pair_stats(pairs)


def align_stage(
    stage: str, sft_dir: Path, pairs: Path, val: Path, out: Path, size: DemoSize, seed: int
) -> Path:
    """Train one preference stage from the SFT model; returns the model users get (the best validated)."""
    cfg = DPOConfig(
        model=str(sft_dir),
        data=str(pairs),
        out_dir=str(out / stage),
        loss=ALIGN_STAGES[stage],
        batch_size=size.dpo_batch_size,
        max_steps=size.dpo_steps,
        epochs=100,
        optim=OptimConfig(lr=size.dpo_lr),
        sft_weight=size.dpo_sft_weight,
        val_scenes=str(val),
        n_val=size.n_val,
        eval_every=size.dpo_eval_every,
        eval_at_start=True,
        patience=3,
        seed=seed,
        log_every=5,
    )
    return run_dpo(cfg, overwrite=True).model_dir


RM_FREEZE = ("vision_tower", "multi_modal_projector")
"""The RM stage keeps the SFT model's image features: fine-tuning them memorises the few training images
(issue 5 experiments: +0.04–0.09 held-out accuracy from freezing them; docs/RESULTS.md)."""


def rm_stage(sft_dir: Path, out: Path, size: DemoSize, seed: int) -> tuple[Path, dict[str, float]]:
    """A fact-augmented reward model on oracle-labelled caption variants plus the oracle's corrections of the
    SFT model's own sampled captions; evaluated on held-out scenes (``accuracy``: both kinds of pairs,
    ``policy_accuracy``: the held-out corrections of sampled captions alone)."""
    from mmalign.eval.rm_eval import evaluate_rm
    from mmalign.models.heads import load_reward_model
    from mmalign.recipes.pairs import variant_pairs
    from mmalign.recipes.rm import RMConfig, run_rm
    from mmalign.rollout.rewards import ModelReward

    data = out / "rm_data"
    scenes = {
        "train": train_scenes(size.rm_scenes, seed),
        "val": eval_scenes(size.rm_val_scenes, seed + 2 * VAL_SEED_OFFSET),
    }
    variants = {
        split: variant_pairs(part, seed=seed, image_dir=data / "images", relative_to=data)
        for split, part in scenes.items()
    }
    sampled: dict[str, list[Any]] = {"train": [], "val": []}
    if size.rm_policy_samples:
        model, processor = load_model(sft_dir, for_training=False)
        for split, part in scenes.items():
            sampled[split] = sample_pairs(
                model, processor, part, k=size.rm_policy_samples, temperature=1.0, seed=seed,
                kind="corrected", image_dir=data / "images", relative_to=data,
            )  # fmt: skip
        del model
    train, val = variants["train"] + sampled["train"], variants["val"] + sampled["val"]
    write_pairs(data / "train.jsonl", train)
    write_pairs(data / "val.jsonl", val)
    cfg = RMConfig(
        model=str(sft_dir), data=str(data / "train.jsonl"), val_data=str(data / "val.jsonl"),
        out_dir=str(out / "rm"), kind="fact", max_steps=size.rm_steps, epochs=100, batch_size=8,
        optim=OptimConfig(lr=size.rm_lr), seed=seed, log_every=10,
        freeze=RM_FREEZE,
    )  # fmt: skip
    result = run_rm(cfg, overwrite=True)
    metrics = {k.removeprefix("eval/"): v for k, v in result.final_metrics.items() if k.startswith("eval/")}
    metrics.update({"train_pairs": float(len(train)), "train_policy_pairs": float(len(sampled["train"]))})
    if sampled["val"]:
        rm, rm_processor = load_reward_model(result.model_dir)
        on_policy = evaluate_rm(ModelReward(rm, rm_processor), sampled["val"], base_dir=data).metrics
        metrics.update({"policy_accuracy": on_policy["accuracy"], "policy_pairs": on_policy["n_pairs"]})
    return result.model_dir, metrics


def online_stage(
    stage: str, sft_dir: Path, reward: str, val: Path, out: Path, size: DemoSize, seed: int
) -> tuple[Path, dict[str, Any]]:
    """One online stage from the SFT model; returns the best validated model and its per-iteration rows."""
    common: dict[str, Any] = {
        "model": str(sft_dir), "out_dir": str(out / stage), "reward": reward,
        "n_prompts": size.online_prompts, "prompt_seed": seed, "k": size.online_k,
        "val_scenes": str(val), "n_val": size.n_val, "seed": seed,
    }  # fmt: skip
    if stage == "rsf":
        from mmalign.recipes.rsf import RSFConfig, run_rsf

        result = run_rsf(
            RSFConfig(**common, iterations=size.rsf_iterations, steps=size.rsf_steps), overwrite=True
        )
    elif stage == "online_dpo":
        from mmalign.recipes.online_dpo import OnlineDPOConfig, run_online_dpo

        result = run_online_dpo(
            OnlineDPOConfig(**common, iterations=size.odpo_iterations, steps=size.odpo_steps,
                            optim=OptimConfig(lr=size.dpo_lr), sft_weight=size.dpo_sft_weight),
            overwrite=True,
        )  # fmt: skip
    elif stage == "ppo":
        from mmalign.recipes.ppo import PPOConfig, run_ppo

        result = run_ppo(
            PPOConfig(**common, iterations=size.ppo_iterations, rollout_batch=size.ppo_rollout_batch,
                      max_new_tokens=64, length_penalty=0.5, eval_every=size.ppo_eval_every,
                      kl_target=2.0, kl_horizon=512),
            overwrite=True,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown online stage {stage!r}")
    keys = ("reward/mean", "oracle/mean", "reward/raw", "kl")
    series = {key: result.series(key) for key in keys if result.series(key)}
    return result.model_dir, {"best_iteration": result.best_iteration, **series}


STAGE_DONE = "stage_summary.json"
"""Written into a stage's folder when the stage (training + evaluation) has finished."""


def _done(stage_dir: Path, reuse: bool) -> dict[str, Any] | None:
    """The finished stage's summary when ``reuse`` is on and the stage completed before, else None."""
    path = stage_dir / STAGE_DONE
    if reuse and path.is_file() and (stage_dir / "final").is_dir():
        console.print(f"[cyan]reusing the finished stage in {stage_dir}")
        return dict(json.loads(path.read_text()))
    return None


def _finish(stage_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    atomic_write_json(stage_dir / STAGE_DONE, summary)
    return summary


def run_demo(
    out: str | Path, *, quick: bool = False, seed: int = 0, size: DemoSize | None = None,
    stages: tuple[str, ...] | None = None, reuse: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Run the demo into ``out`` and return the summary (also written to ``out/summary.json``).

    ``size`` overrides the preset chosen by ``quick`` (tests use a miniature one); ``stages`` overrides
    the preset's stages. ``reuse``: stages that finished in an earlier run into ``out`` (their
    ``stage_summary.json`` and ``final/`` exist) are not trained again — e.g. add stages to a finished
    demo, or continue one that was stopped. Change nothing else between such runs."""
    out = Path(out)
    size = size or (QUICK if quick else FULL)
    stages = stages or size.stages
    unknown = [s for s in stages if s not in STAGES]
    if unknown or "sft" not in stages:
        raise ValueError(f"stages must include 'sft' and only some of {STAGES}; got {stages}")
    stages = tuple(s for s in STAGES if s in stages)  # pipeline order
    n_steps = 2 + len(stages)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    console.rule(f"[bold]1/{n_steps} shapes world")
    world = make_world(out / "world", n=size.n_scenes, seed=seed, n_eval=size.n_eval, n_text=0, mix=MIX)
    test_scenes = read_eval_scenes(world["eval_scenes"])
    timings["world_s"] = time.perf_counter() - t0

    console.rule(f"[bold]2/{n_steps} tiny LLaVA (from config, saved with safetensors, reloaded)")
    base_dir = out / "models" / "base"
    model, _ = build_tiny("llava", base_dir, seed=seed)
    n_params = count_parameters(model)
    del model
    console.print(f"tiny LLaVA: {n_params:,} parameters → {base_dir}")

    console.rule(f"[bold]3/{n_steps} SFT + evaluation on held-out scenes")
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
    sft_dir = out / "sft" / "final"
    summary: dict[str, Any] = {}
    done = _done(out / "sft", reuse)
    if done is None:
        sft = run_sft(sft_cfg, overwrite=True)
        result = evaluate_stage(sft.model_dir, out / "sft", test_scenes, seed)
        done = {**stage_summary(result), "final_loss": sft.final_loss, "steps": float(sft.steps)}
        _finish(out / "sft", done)
    summary["sft"] = done
    timings["sft_s"] = time.perf_counter() - t

    aligned = [s for s in stages if s in ALIGN_STAGES]
    if aligned:
        t = time.perf_counter()
        pairs, stats = build_pairs(sft_dir, out / "pairs", size, seed)
        val = write_scenes(
            out / "pairs" / "val_scenes.jsonl", eval_scenes(size.n_val, seed + VAL_SEED_OFFSET)
        )
        summary["pairs"] = stats
        console.print(f"{stats['n']} oracle-corrected pairs from sampled captions → {pairs}")
        timings["pairs_s"] = time.perf_counter() - t
    for k, stage in enumerate(aligned, start=4):
        console.rule(f"[bold]{k}/{n_steps} {stage.upper()} + evaluation on held-out scenes")
        t = time.perf_counter()
        done = _done(out / stage, reuse)
        if done is None:
            model_dir = align_stage(stage, sft_dir, pairs, val, out, size, seed)
            done = _finish(
                out / stage, stage_summary(evaluate_stage(model_dir, out / stage, test_scenes, seed))
            )
        summary[stage] = done
        timings[f"{stage}_s"] = time.perf_counter() - t

    step = 4 + len(aligned)
    reward = "oracle"
    if "rm" in stages:
        console.rule(f"[bold]{step}/{n_steps} RM (fact-augmented) + held-out accuracy")
        t = time.perf_counter()
        rm_dir = out / "rm" / "final"
        done = _done(out / "rm", reuse)
        if done is None:
            rm_dir, done = rm_stage(sft_dir, out, size, seed)
            _finish(out / "rm", done)
        summary["rm"] = done
        reward = str(rm_dir)
        timings["rm_s"] = time.perf_counter() - t
        step += 1
    online = [s for s in stages if s in ONLINE_STAGES]
    if online:
        val = write_scenes(out / "online_val_scenes.jsonl", eval_scenes(size.n_val, seed + VAL_SEED_OFFSET))
    for stage in online:
        console.rule(f"[bold]{step}/{n_steps} {stage.upper()} + evaluation on held-out scenes")
        t = time.perf_counter()
        stage_reward = "oracle" if stage == "rsf" else reward
        done = _done(out / stage, reuse)
        if done is None:
            model_dir, rows = online_stage(stage, sft_dir, stage_reward, val, out, size, seed)
            evaluated = stage_summary(evaluate_stage(model_dir, out / stage, test_scenes, seed))
            done = _finish(out / stage, {**evaluated, **rows})
        summary[stage] = done
        timings[f"{stage}_s"] = time.perf_counter() - t
        step += 1
    timings["total_s"] = time.perf_counter() - t0

    summary["settings"] = {
        "quick": quick,
        "seed": seed,
        "model": "tiny llava",
        "parameters": n_params,
        **{k: v for k, v in vars(size).items() if k != "stages"},
        "stages": list(stages),
    }
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    atomic_write_json(out / "summary.json", summary)
    write_report(out, out / "report.html")
    return summary
