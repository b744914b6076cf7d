"""The ``mmalign`` command line: thin wrappers over recipes, eval and the world.

Every command imports its heavy modules lazily so ``mmalign --help`` stays instant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from mmalign.errors import MMAlignError
from mmalign.world.pairs import ALL_VARIANT_KINDS, VARIANT_KINDS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
world_app = typer.Typer(no_args_is_help=True, help="The shapes world: make datasets.")
models_app = typer.Typer(no_args_is_help=True, help="Models: build tiny real HF models from configs.")
app.add_typer(world_app, name="world")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

Overrides = Annotated[
    list[str] | None, typer.Argument(help="Config overrides as dotted key=value, e.g. lr=1e-4 max_steps=50")
]


def _quiet_hf() -> None:
    """Hide transformers' per-file progress bars and info logs (our own rich bars show progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="Smaller run: < 3 min on 2 CPU cores")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the world and of training")] = 0,
    stages: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated stages of sft,dpo,ddpo,mmdpo,rm,rsf,online_dpo,ppo (default: all)"
        ),
    ] = None,
    reuse: Annotated[
        bool, typer.Option(help="Keep stages that already finished in --out (add stages, or continue)")
    ] = False,
) -> None:
    """World → tiny LLaVA → SFT → (DPO, DDPO, MM-DPO) → eval of every stage → summary.json + report.html."""
    _quiet_hf()
    from mmalign.recipes.demo import run_demo

    try:
        chosen = tuple(s.strip() for s in stages.split(",")) if stages else None
        summary = run_demo(out, quick=quick, seed=seed, stages=chosen, reuse=reuse)
    except MMAlignError as err:
        _fail(err)
    console.print(f"[green]demo done[/]: {out / 'summary.json'}  {out / 'report.html'}")
    typer.echo(json.dumps(summary, indent=1, sort_keys=True))


@world_app.command("make")
def world_make(
    out: Annotated[Path, typer.Option(help="Output folder")],
    n: Annotated[int, typer.Option(help="Number of training scenes")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the scene stream")] = 0,
) -> None:
    """Write the shapes-world datasets (SFT corpus, eval scenes, dialogues, FOL, arithmetic) in our schema."""
    from mmalign.world.corpus import make_world

    paths = make_world(out, n=n, seed=seed)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


@models_app.command("tiny")
def models_tiny(
    arch: Annotated[str, typer.Option(help="llava | qwen2_vl | idefics3 | paligemma | llama")] = "llava",
    out: Annotated[Path, typer.Option(help="Folder to save the model and processor to")] = Path("tiny-model"),
    image_size: Annotated[int, typer.Option(help="Image side in pixels")] = 64,
    seed: Annotated[int, typer.Option(help="Init seed")] = 0,
) -> None:
    """Build a tiny real HF model from a config and save it with save_pretrained (safetensors)."""
    _quiet_hf()
    from mmalign.models.load import count_parameters
    from mmalign.models.tiny import build_tiny

    try:
        model, _ = build_tiny(arch, out, image_size=image_size, seed=seed)
    except MMAlignError as err:
        _fail(err)
    typer.echo(f"{arch}: {count_parameters(model):,} parameters saved to {out}")


@app.command()
def sft(
    config: Annotated[Path | None, typer.Option(help="YAML config (see recipes/configs/sft.yaml)")] = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of out_dir")] = False,
) -> None:
    """Supervised fine-tuning on a JSONL of Samples (loss on assistant turns only)."""
    _quiet_hf()
    from mmalign.config import load_config
    from mmalign.recipes.sft import SFTConfig, run_sft

    try:
        cfg = load_config(SFTConfig, config, overrides or [])
        result = run_sft(cfg, resume=resume)
    except MMAlignError as err:
        _fail(err)
    typer.echo(f"final loss {result.final_loss:.4f} after {result.steps} steps; model in {result.model_dir}")


@app.command()
def dpo(
    config: Annotated[Path | None, typer.Option(help="YAML config (see recipes/configs/dpo.yaml)")] = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of out_dir")] = False,
) -> None:
    """DPO family on a JSONL of PreferencePairs: loss=dpo|ipo|cdpo|simpo|ddpo|mmdpo, with validation,
    best-checkpoint selection, early stopping and log-prob drift warnings."""
    _quiet_hf()
    from mmalign.config import load_config
    from mmalign.recipes.dpo import DPOConfig, run_dpo

    try:
        cfg = load_config(DPOConfig, config, overrides or [])
        result = run_dpo(cfg, resume=resume)
    except (MMAlignError, ValueError) as err:
        _fail(err)
    typer.echo(f"{result.steps} steps; best step {result.best_step}; model in {result.model_dir}")


@app.command()
def rsf(
    config: Annotated[Path | None, typer.Option(help="YAML config (see recipes/configs/rsf.yaml)")] = None,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in out_dir")] = False,
) -> None:
    """Rejection sampling fine-tuning: K samples per prompt → reward → SFT on the best, iterated."""
    _quiet_hf()
    from mmalign.recipes.rsf import load_rsf_config, run_rsf

    try:
        result = run_rsf(load_rsf_config(config, overrides or []), overwrite=overwrite)
    except (MMAlignError, ValueError) as err:
        _fail(err)
    typer.echo(
        f"mean reward per iteration {result.series('reward/mean')}; best iteration "
        f"{result.best_iteration}; model in {result.model_dir}"
    )


@app.command("online-dpo")
def online_dpo(
    config: Annotated[
        Path | None, typer.Option(help="YAML config (see recipes/configs/online_dpo.yaml)")
    ] = None,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in out_dir")] = False,
) -> None:
    """Online iterative DPO: K samples per prompt → reward → best-vs-worst pairs → DPO, iterated."""
    _quiet_hf()
    from mmalign.recipes.online_dpo import load_online_dpo_config, run_online_dpo

    try:
        result = run_online_dpo(load_online_dpo_config(config, overrides or []), overwrite=overwrite)
    except (MMAlignError, ValueError) as err:
        _fail(err)
    typer.echo(
        f"mean reward per iteration {result.series('reward/mean')}; best iteration "
        f"{result.best_iteration}; model in {result.model_dir}"
    )


@app.command()
def ppo(
    config: Annotated[Path | None, typer.Option(help="YAML config (see recipes/configs/ppo.yaml)")] = None,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in out_dir")] = False,
) -> None:
    """PPO: LLaVA-RLHF reward (RM score − length penalty + correctness bonus, no-EOS penalty), per-token KL
    to the reference (fixed/adaptive β), a critic, validation and guardrails."""
    _quiet_hf()
    from mmalign.recipes.ppo import load_ppo_config, run_ppo

    try:
        result = run_ppo(load_ppo_config(config, overrides or []), overwrite=overwrite)
    except (MMAlignError, ValueError) as err:
        _fail(err)
    typer.echo(
        f"raw reward per iteration {[round(r, 3) for r in result.series('reward/raw')]}; "
        f"best iteration {result.best_iteration}; model in {result.model_dir}"
    )


@app.command()
def rm(
    config: Annotated[Path | None, typer.Option(help="YAML config (see recipes/configs/rm.yaml)")] = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint of out_dir")] = False,
) -> None:
    """Reward model on pairs / rankings: kind=bt|fact|critique|aspects; evaluates on val_data (Acc, Acc+)."""
    _quiet_hf()
    from mmalign.config import load_config
    from mmalign.recipes.rm import RMConfig, run_rm

    try:
        cfg = load_config(RMConfig, config, overrides or [])
        result = run_rm(cfg, resume=resume)
    except (MMAlignError, ValueError) as err:
        _fail(err)
    shown = {k: round(v, 4) for k, v in result.final_metrics.items() if k.startswith("eval/")}
    typer.echo(f"{result.steps} steps; model in {result.model_dir}; {json.dumps(shown)}")


@world_app.command("rm-data")
def world_rm_data(
    out: Annotated[Path, typer.Option(help="Output folder: train.jsonl, val.jsonl, images/")],
    n_train: Annotated[int, typer.Option(help="Training scenes (each gives up to 15 pairs)")] = 300,
    n_val: Annotated[int, typer.Option(help="Held-out scenes")] = 60,
    noise: Annotated[float, typer.Option(help="Annotator noise: probability a training label flips")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the scene streams")] = 0,
    kinds: Annotated[
        str,
        typer.Option(
            help="Caption variants paired per scene, comma-separated, of: " + ",".join(ALL_VARIANT_KINDS)
        ),
    ] = ",".join(VARIANT_KINDS),
    detailed_share: Annotated[
        float, typer.Option(help="Share of scenes asked for a detailed caption (instruction following)")
    ] = 0.0,
    policy: Annotated[
        str | None,
        typer.Option(
            help="Also sample captions from this model (dir or hub id) and add the oracle's corrections of "
            "the wrong ones (RLHF-V pairs on the policy's own errors) to both files"
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="With --policy: sampled captions per scene")] = 8,
) -> None:
    """Reward-model pairs: caption variants (true, invented object, wrong colour, omission, repetition, …)
    labelled by the oracle, optionally plus the oracle's corrections of a policy's sampled captions — RMs
    trained on variants alone learn shortcuts of the variant generator (docs/RESULTS.md, session 5).
    Held-out pairs are always clean."""
    from mmalign.models.load import load_model
    from mmalign.recipes.pairs import sample_pairs, variant_pairs, write_pairs
    from mmalign.world.corpus import eval_scenes, train_scenes
    from mmalign.world.oracle import Oracle

    try:
        chosen_kinds = tuple(k.strip() for k in kinds.split(",") if k.strip())
        images = out / "images"
        scenes = {"train": train_scenes(n_train, seed), "val": eval_scenes(n_val, seed)}
        oracles = {"train": Oracle(noise=noise, seed=seed), "val": Oracle()}
        common: dict[str, Any] = {"image_dir": images, "relative_to": out}
        pairs = {
            split: variant_pairs(
                part,
                seed=seed,
                kinds=chosen_kinds,
                oracle=oracles[split],
                detailed_share=detailed_share,
                **common,
            )
            for split, part in scenes.items()
        }
        sampled = dict.fromkeys(scenes, 0)
        if policy is not None:
            model, processor = load_model(policy, for_training=False)
            for split, part in scenes.items():
                extra = sample_pairs(
                    model,
                    processor,
                    part,
                    k=samples,
                    seed=seed,
                    kind="corrected",
                    oracle=oracles[split],
                    **common,
                )
                pairs[split] += extra
                sampled[split] = len(extra)
        write_pairs(out / "train.jsonl", pairs["train"])
        write_pairs(out / "val.jsonl", pairs["val"])
    except MMAlignError as err:
        _fail(err)
    on_policy = f" (of which {sampled['train']} / {sampled['val']} from --policy samples)" if policy else ""
    counts = f"{len(pairs['train'])} training pairs, {len(pairs['val'])} held-out pairs"
    typer.echo(f"{counts}{on_policy} in {out}")


@app.command("eval")
def eval_(
    model: Annotated[
        str, typer.Option(help="Model dir, hub id or tiny:<arch> (--bench rm: a reward-model dir)")
    ],
    bench: Annotated[
        str,
        typer.Option(help="pope,amber,objhal,mmhal,mad,diversity,cot,world | all (not rm) | rm"),
    ] = "world",
    out: Annotated[Path, typer.Option(help="Folder for <bench>.json, summary.json, cache/")] = Path(
        "runs/eval"
    ),
    n: Annotated[
        int | None,
        typer.Option(
            "--n", "--n-scenes", help="Shapes-world items per benchmark (default 50; world: 100 scenes)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the held-out scene stream and of sampling")] = 0,
    data: Annotated[
        list[str] | None,
        typer.Option(help="Real benchmark files as name=path (repeatable), e.g. pope=coco_pope_random.json"),
    ] = None,
    image_root: Annotated[
        Path | None, typer.Option(help="Folder the images of --data files are under")
    ] = None,
    judge: Annotated[
        str | None, typer.Option(help="rule | keyword | openai:<base_url>:<model> (mmhal, mad)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Generation batch size (default 16; world: 32)")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Cap every benchmark's response length")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars")] = True,
) -> None:
    """Evaluate a model on benchmarks (shapes world, or real files with --data); resumable: a killed eval
    continues from OUT/cache. Writes OUT/<bench>.json and OUT/summary.json, prints the headline metrics."""
    _quiet_hf()
    from mmalign.eval.suite import (
        model_identity,
        parse_bench_names,
        parse_data,
        plan_benchmarks,
        render_headline,
        run_plan,
    )

    try:
        names = parse_bench_names(bench)
        plan = plan_benchmarks(
            names,
            n=n,
            seed=seed,
            sources=parse_data(data or [], names),
            image_root=image_root,
            judge=judge,
            max_new_tokens=max_new_tokens,
        )
        if "rm" in names:
            from mmalign.models.heads import load_reward_model

            mdl, processor = load_reward_model(model)
        else:
            from mmalign.models.load import load_model

            mdl, processor = load_model(model, for_training=False)
        results = run_plan(
            mdl,
            processor,
            plan,
            out_dir=out,
            batch_size=batch_size,
            progress=progress,
            model_id=model_identity(model),
        )
    except (MMAlignError, ValueError) as err:
        _fail(err)
    console.print(render_headline(results))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    typer.echo(json.dumps(summary["metrics"], indent=1, sort_keys=True))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run or demo folder")]) -> None:
    """Write RUN_DIR/report.html (training curves, metric table, examples)."""
    from mmalign.eval.report import write_report

    try:
        path = write_report(run_dir, run_dir / "report.html")
    except MMAlignError as err:
        _fail(err)
    typer.echo(str(path))


@app.command("compare")
def compare_(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Run or stage folders, eval JSON files, or label=path; one demo folder expands to its stages"
        ),
    ],
    baseline: Annotated[str, typer.Option(help="Baseline run: index (0 = first) or label")] = "0",
    out: Annotated[Path | None, typer.Option(help="Also write the table: .md, .html or .json")] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Comma-separated globs of metrics, e.g. 'chair*,pope_*_f1,mmhal.*'")
    ] = None,
    tolerance: Annotated[
        float, typer.Option(help="Changes within tolerance·max(1, |baseline|) are neither better nor worse")
    ] = 0.01,
    fail_on_regression: Annotated[bool, typer.Option(help="Exit with code 1 on a regression")] = False,
) -> None:
    """The alignment-tax table: every metric of every run, its change vs the baseline; regressions red."""
    from mmalign.eval.compare import compare, load_runs, render_rich, write_table

    try:
        patterns = [p.strip() for p in metrics.split(",") if p.strip()] if metrics else None
        table = compare(load_runs(runs), baseline, tolerance=tolerance, metrics=patterns)
        if out is not None:
            write_table(table, out)
    except MMAlignError as err:
        _fail(err)
    Console(soft_wrap=False).print(render_rich(table))
    regressed = table.regressions()
    summary = ", ".join(f"{metric} ({label})" for metric, label in regressed)
    console.print(f"[red]{len(regressed)} regressions[/]: {summary}" if regressed else "[green]no regression")
    if out is not None:
        console.print(f"table written to {out}")
    if regressed and fail_on_regression:
        raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
