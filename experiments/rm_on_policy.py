"""Reward models on the policy's *own* hallucinations (issue 5, LLaVA-RLHF's premise for facts).

The caption-variant pairs of ``rm_fidelity.py`` inject random errors (an absent shape, a wrong colour) that
an RM built on the SFT backbone sees at once: its vision tower never believed them. The errors that matter
in RLHF are the policy's own — what the SFT model says when it samples — and an RM initialised from that
same SFT model may share the perception that produced them. Facts in the RM's input are meant to break that
correlation. This script measures it:

1. sample ``--k`` captions per held-out scene (``eval_scenes(--n-scenes, --scene-seed)``) from ``--policy``
   at ``--temperature``; the oracle corrects each distinct sample that has an error (RLHF-V pairs:
   ``chosen`` = the minimal correction, ``rejected`` = the sample — they differ only where the policy erred);
2. score both sides with every RM of ``--rm NAME=DIR`` (repeatable; fact RMs get the scene's facts with
   their saved placement) and report accuracy overall and per error class of the sample: ``object`` (it
   invents a shape — the hallucination pairs), ``attribute`` (only wrong colours/sizes/places),
   ``other`` (repeats or unparseable sentences only).

    python experiments/rm_on_policy.py --policy runs/demo_sft/sft/final --out runs/rm_on_policy \
        --rm bt=runs/rm5/bt/final --rm fact=runs/rm5/fact/final [--k 8 --n-scenes 200]

Output: ``OUT/pairs.jsonl`` (reused when present and ``--resample`` is not given), ``OUT/results.json``
and a Markdown table on stdout.

Training data of the same kind: ``--scenes train --n-scenes 2300 --select 300`` samples on the RM's
training scenes (``train_scenes(n, 0)``, as ``rm_fidelity.py``) and writes ``OUT/train.jsonl`` and, for
the last ``--select`` scenes, ``OUT/select.jsonl`` (no ``--rm`` needed). Image paths are
``images/<seed>-<index>.png`` relative to the JSONL, as in ``rm_fidelity.py``'s data, so the files of both
can be concatenated into one folder whose ``images/`` holds both sets.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmalign.data.io import read_jsonl
from mmalign.data.schema import PreferencePair
from mmalign.eval.rm_eval import evaluate_rm
from mmalign.models.heads import load_reward_model
from mmalign.models.load import load_model
from mmalign.recipes.pairs import sample_pairs, write_pairs
from mmalign.rollout.rewards import ModelReward
from mmalign.world.corpus import eval_scenes, train_scenes
from mmalign.world.oracle import judge_exact
from mmalign.world.scene import Scene

ERROR_CLASSES = ("object", "attribute", "other")


def error_class(pair: PreferencePair) -> str:
    """What the sampled (rejected) caption got wrong: an invented shape, else a wrong attribute, else only
    repeats or unparseable sentences."""
    judged = judge_exact(Scene.from_dict(pair.meta["scene"]), pair.rejected)
    if judged.n_object_hallucinations:
        return "object"
    return "attribute" if judged.n_attribute_errors else "other"


def make_pairs(args: argparse.Namespace, scenes: list[Scene], path: Path) -> list[PreferencePair]:
    model, processor = load_model(args.policy, dtype="fp32")
    model.eval()
    pairs = sample_pairs(
        model,
        processor,
        scenes,
        k=args.k,
        temperature=args.temperature,
        seed=args.seed,
        kind="corrected",
        image_dir=path.parent / "images",
        relative_to=path.parent,
    )
    write_pairs(path, pairs)
    return pairs


def make_training_pairs(args: argparse.Namespace, out: Path) -> None:
    """On-policy pairs on the RM's training scenes: ``train.jsonl`` and the last ``--select`` scenes'
    ``select.jsonl`` (early stopping)."""
    scenes = train_scenes(args.n_scenes, args.scene_seed)
    fit, select = (scenes[: -args.select], scenes[-args.select :]) if args.select else (scenes, [])
    for name, part in (("train", fit), ("select", select)):
        if part:
            pairs = make_pairs(args, part, out / f"{name}.jsonl")
            print(f"{name}: {len(pairs)} on-policy pairs from {len(part)} scenes x {args.k} samples")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True, help="the model whose samples are judged (the SFT model)")
    ap.add_argument("--rm", action="append", default=[], metavar="NAME=DIR", help="a trained RM (repeatable)")
    ap.add_argument("--out", default="runs/rm_on_policy")
    ap.add_argument("--n-scenes", type=int, default=200)
    ap.add_argument(
        "--scenes", choices=("eval", "train"), default="eval", help="held-out scenes, or training scenes"
    )
    ap.add_argument(
        "--scene-seed",
        type=int,
        default=None,
        help="scene stream (default: 3000 for eval scenes, as rm_fidelity's held-out pairs; 0 for train)",
    )
    ap.add_argument("--select", type=int, default=0, help="with --scenes train: scenes for select.jsonl")
    ap.add_argument("--k", type=int, default=8, help="samples per scene")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--resample", action="store_true", help="sample again even if OUT/pairs.jsonl exists")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.scene_seed is None:
        args.scene_seed = 3000 if args.scenes == "eval" else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.scenes == "train":
        make_training_pairs(args, out)
        return
    rms = dict(spec.split("=", 1) for spec in args.rm)
    if not rms or any(not name or not folder for name, folder in rms.items()):
        ap.error("give at least one --rm NAME=DIR")
    path = out / "pairs.jsonl"
    if path.exists() and not args.resample:
        pairs = [r for r in read_jsonl(path) if isinstance(r, PreferencePair)]
    else:
        pairs = make_pairs(args, eval_scenes(args.n_scenes, args.scene_seed), path)
    classes = [error_class(p) for p in pairs]
    counts = {c: classes.count(c) for c in ERROR_CLASSES}
    print(f"{len(pairs)} on-policy pairs from {args.n_scenes} scenes x {args.k} samples:", counts)

    results: dict[str, Any] = {"settings": {**vars(args), "n_pairs": len(pairs), "classes": counts}}
    for name, folder in rms.items():
        t = time.perf_counter()
        rm, processor = load_reward_model(folder)
        result = evaluate_rm(ModelReward(rm, processor), pairs, base_dir=path.parent)
        right = [r["chosen_reward"] > r["rejected_reward"] for r in result.records]
        row: dict[str, float] = {
            "accuracy": result.metrics["accuracy"],
            "acc_plus": result.metrics["acc_plus"],
        }
        for c in ERROR_CLASSES:
            picked = [ok for ok, cls in zip(right, classes, strict=True) if cls == c]
            if picked:
                row[f"acc.{c}"] = sum(picked) / len(picked)
        row["eval_s"] = time.perf_counter() - t
        results[name] = row
        print(name, json.dumps({k: round(v, 3) for k, v in row.items()}))
        (out / "results.json").write_text(json.dumps(results, indent=1))

    keys = ["accuracy", "acc_plus", *(f"acc.{c}" for c in ERROR_CLASSES)]
    print("\n| RM | " + " | ".join(keys) + " |")
    print("|---" * (1 + len(keys)) + "|")
    for name in rms:
        print(f"| {name} | " + " | ".join(f"{results[name].get(k, float('nan')):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
