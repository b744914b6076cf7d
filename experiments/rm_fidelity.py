"""Reward-model fidelity in the shapes world (issue 5): train each RM kind from the same SFT model on the
same oracle-labelled caption-variant pairs and evaluate on held-out scenes.

    python experiments/rm_fidelity.py --sft runs/demo/sft/final --out runs/rm_fidelity [--steps 300]

Runs (all from the SFT backbone, same seed, same held-out pairs, labels of the held-out pairs are clean):
- ``bt``            Bradley–Terry on clean labels
- ``bt_noisy``      Bradley–Terry on labels flipped with probability ``--noise`` (annotator noise)
- ``fact``          fact-augmented BT (LLaVA-RLHF): the prompt carries the oracle's facts about the image
- ``critique``      critique RM (MM-RLHF): writes a critique, then scores; Acc, Acc+ and critique naming
- ``aspects``       5-aspect regression; per-aspect MSE and Spearman

Besides each run's overall metrics the script reports accuracy per pair kind (which two caption variants
were compared, e.g. ``true~object``): the *hallucination pairs* are those where exactly one side invents
an object (``object`` or ``object+color`` vs anything without one). Output: ``OUT/results.json`` and a
Markdown table on stdout, with the Spearman ceiling of each aspect on the held-out responses (ties in the
gold scores cap ρ for any predictor that does not tie exactly; coverage: 0.63 on 40 scenes).

Issue-5 setting (session 3: BT 0.974 held-out; the plateau at 0.71–0.84 was too few training images, and
full fine-tuning of the vision tower memorising them):

    python experiments/rm_fidelity.py --sft runs/demo_sft/sft/final --out runs/rm5 --runs bt,fact,aspects \
        --n-train 2300 --select 300 --eval-every 500 --n-val 40 --steps 6000 --threads 1 \
        --set freeze=vision_tower,multi_modal_projector --set soft_margin=5 --set n_val=600

(``--select``: early stopping on the pairs of 300 held-back *training* scenes; ``--seeds N``: N seeds and
their mean-score ensemble; ``--set``: any ``RMConfig`` override. The aspects run used ``--steps 4000
--set select_best=correctness.spearman`` and no soft_margin, which only affects bt and fact.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rm_on_policy import error_class  # experiments/ is on sys.path when run as a script

from mmalign.data.io import read_jsonl
from mmalign.data.schema import PreferencePair
from mmalign.eval.rm_eval import evaluate_rm, spearman
from mmalign.models.heads import load_reward_model
from mmalign.recipes.pairs import variant_pairs, write_pairs
from mmalign.recipes.rm import RMConfig, load_rm_config, run_rm
from mmalign.rollout.rewards import ModelReward, RewardBatch, RewardOutput
from mmalign.world.corpus import eval_scenes, train_scenes
from mmalign.world.oracle import Oracle
from mmalign.world.pairs import ALL_VARIANT_KINDS, VARIANT_KINDS

HALLUCINATING = {"object", "object+color"}


def pair_kind(pair: PreferencePair) -> str:
    """``a~b`` for a pair of caption variants; ``policy.<error class>`` for an on-policy corrected pair
    (``rm_on_policy.py``: what the sampled caption got wrong)."""
    if "kinds" not in pair.meta:
        return f"policy.{error_class(pair)}"
    return "~".join(sorted(pair.meta["kinds"]))


def is_hallucination_pair(pair: PreferencePair) -> bool:
    """Exactly one of the two captions invents an object."""
    if "kinds" not in pair.meta:  # on-policy: the sample invents a shape, its correction does not
        return error_class(pair) == "object"
    a, b = pair.meta["kinds"]
    return (a in HALLUCINATING) != (b in HALLUCINATING)


def make_data(
    out: Path,
    n_train: int,
    n_val: int,
    noise: float,
    seed: int,
    n_select: int = 0,
    kinds: tuple[str, ...] = VARIANT_KINDS,
    detailed_share: float = 0.0,
) -> dict[str, Path]:
    """Clean and noisy training pairs, the held-out pairs (``eval_scenes(n_val, seed + 3000)``, clean) and,
    with ``n_select``, a selection split for early stopping: the pairs of the last ``n_select`` *training*
    scenes (clean labels), which are then left out of training. ``detailed_share`` of the scenes (in every
    split) are asked for a detailed caption (``variant_pairs``)."""
    paths = {}
    images = out / "images"
    scenes = train_scenes(n_train, seed)
    fit, select = (scenes[:-n_select], scenes[-n_select:]) if n_select else (scenes, [])
    common: dict[str, Any] = {
        "seed": seed,
        "kinds": kinds,
        "image_dir": images,
        "relative_to": out,
        "detailed_share": detailed_share,
    }
    for name, oracle in (("clean", Oracle(seed=seed)), ("noisy", Oracle(noise=noise, seed=seed))):
        pairs = variant_pairs(fit, oracle=oracle, **common)
        write_pairs(out / f"train_{name}.jsonl", pairs)
        paths[name] = out / f"train_{name}.jsonl"
    if select:
        picked = variant_pairs(select, **common)
        write_pairs(out / "select.jsonl", picked)
        paths["select"] = out / "select.jsonl"
    val = variant_pairs(eval_scenes(n_val, seed + 3000), **common)
    write_pairs(out / "val.jsonl", val)
    paths["val"] = out / "val.jsonl"
    return paths


def by_kind(records: list[dict[str, Any]], pairs: list[PreferencePair]) -> dict[str, float]:
    """Accuracy per pair kind and on the hallucination pairs."""
    groups: dict[str, list[bool]] = {}
    for rec, pair in zip(records, pairs, strict=True):
        ok = rec["chosen_reward"] > rec["rejected_reward"]
        groups.setdefault(pair_kind(pair), []).append(ok)
        if is_hallucination_pair(pair):
            groups.setdefault("hallucination_pairs", []).append(ok)
    return {f"acc.{k}": sum(v) / len(v) for k, v in sorted(groups.items())}


def spearman_ceilings(pairs: list[PreferencePair]) -> dict[str, float]:
    """Per aspect, the held-out Spearman of a predictor that orders every two responses with different gold
    scores correctly but never predicts two exactly equal values (real-valued heads do not): ties in the
    gold scores (e.g. full coverage for most captions) cap ρ below 1. The tie-free predictor used here is
    gold + a strictly increasing jitter; ρ is the same for every within-tie order."""
    gold: dict[str, list[float]] = {}
    for p in pairs:
        for side in ("chosen", "rejected"):
            for a, v in ((p.scores or {}).get(side) or {}).items():  # type: ignore[call-overload]
                gold.setdefault(a, []).append(float(v))
    out = {}
    for a, ys in gold.items():
        jittered = [y + 1e-9 * i for i, y in enumerate(ys)]
        rho = spearman(jittered, ys)
        if rho == rho:  # NaN (constant gold scores, no correlation defined) stays out of the JSON
            out[a] = rho
    return out


class MeanReward:
    """The mean score (and mean aspects) of several trained RMs of one kind: a seed ensemble. Exposes
    ``model`` and ``kind`` of its first member, which is what ``evaluate_rm`` reads besides ``score``."""

    def __init__(self, members: list[ModelReward]) -> None:
        self.members, self.model, self.kind = members, members[0].model, members[0].kind

    def score(self, batch: RewardBatch) -> RewardOutput:
        outs = [m.score(batch) for m in self.members]
        aspects = {a: torch.stack([o.aspects[a] for o in outs]).mean(0) for a in outs[0].aspects}
        return RewardOutput(torch.stack([o.scores for o in outs]).mean(0), aspects, outs[0].info)


def evaluate(
    reward: ModelReward | MeanReward,
    val_pairs: list[PreferencePair],
    val_path: Path,
    out: Path,
    extra: dict[str, float],
) -> dict[str, float]:
    """Held-out metrics plus accuracy per pair kind; writes ``out/eval/rm.json``."""
    result = evaluate_rm(reward, val_pairs, base_dir=val_path.parent)  # type: ignore[arg-type]
    metrics = {**result.metrics, **by_kind(result.records, val_pairs), **extra}
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "rm.json").write_text(json.dumps(result.to_dict(), indent=1))
    print(out.name, json.dumps({k: round(v, 3) for k, v in metrics.items() if not k.startswith("acc.")}))
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="SFT model dir (backbone of every RM)")
    ap.add_argument("--out", default="runs/rm_fidelity")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-val", type=int, default=60)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="bt,bt_noisy,fact,critique,aspects")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="RMConfig override for every run (repeatable), e.g. --set use_margin=true",
    )
    ap.add_argument(
        "--select",
        type=int,
        default=0,
        metavar="N",
        help="early stopping: hold out the last N training scenes as a selection split, evaluate on it every "
        "--eval-every steps and keep the best weights (select_best=accuracy); the test pairs are not used",
    )
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train each run with seeds SEED..SEED+N-1 (dirs NAME, NAME_s1, …) and also evaluate their "
        "ensemble (mean score) as NAME_ens",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument(
        "--kinds",
        default=",".join(VARIANT_KINDS),
        help=f"caption variants paired per scene (of {','.join(ALL_VARIANT_KINDS)}); the opt-in "
        "omit2/garbled/garbled2/no_background spread coverage and instruction following for the aspects RM",
    )
    ap.add_argument(
        "--detailed-share",
        type=float,
        default=0.0,
        help="share of scenes asked for a detailed caption (background and word wanted): instruction "
        "following then depends on the prompt, not only on the response",
    )
    ap.add_argument(
        "--data-dir", default="", help="reuse the pairs of an earlier run (OUT/data) instead of making them"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    if args.data_dir:
        src = Path(args.data_dir)
        stems = {"clean": "train_clean", "noisy": "train_noisy", "val": "val", "select": "select"}
        data = {
            name: src / f"{stem}.jsonl" for name, stem in stems.items() if (src / f"{stem}.jsonl").exists()
        }
    else:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        data = make_data(
            out / "data",
            args.n_train,
            args.n_val,
            args.noise,
            args.seed,
            args.select,
            kinds,
            args.detailed_share,
        )
    val_pairs = [r for r in read_jsonl(data["val"]) if isinstance(r, PreferencePair)]
    runs = {
        "bt": ("bt", "clean"),
        "bt_noisy": ("bt", "noisy"),
        "fact": ("fact", "clean"),
        "critique": ("critique", "clean"),
        "aspects": ("aspects", "clean"),
    }
    results: dict[str, Any] = {
        "settings": {**vars(args), "n_val_pairs": len(val_pairs)},
        "spearman_ceiling": spearman_ceilings(val_pairs),
    }
    names: list[str] = []
    for base in args.runs.split(","):
        kind, labels = runs[base]
        members = []
        for i in range(args.seeds):
            name = base if i == 0 else f"{base}_s{i}"
            t = time.perf_counter()
            defaults = {
                "model": args.sft,
                "data": str(data[labels]),
                "out_dir": str(out / name),
                "kind": kind,
                "max_steps": args.steps,
                "epochs": 100,
                "batch_size": 8,
                "optim.lr": args.lr,
                "optim.warmup_ratio": 0.05,
                "optim.min_lr_ratio": 0.1,
                "seed": args.seed + i,
                "log_every": 10,
                "progress_bar": False,
            }
            if args.select:
                defaults.update(
                    {
                        "val_data": str(data["select"]),
                        "eval_every": args.eval_every,
                        "select_best": "accuracy",
                    }
                )
            cfg: RMConfig = load_rm_config(None, [f"{k}={v}" for k, v in defaults.items()] + args.set)
            trained = run_rm(cfg, overwrite=True)
            rm, processor = load_reward_model(trained.model_dir)
            members.append(ModelReward(rm, processor))
            extra = {"train_s": time.perf_counter() - t}
            if "best_step" in trained.final_metrics:
                extra["best_step"] = trained.final_metrics["best_step"]
                extra["select_accuracy"] = trained.final_metrics["eval/accuracy"]
            names.append(name)
            results[name] = evaluate(members[-1], val_pairs, data["val"], out / name, extra)
            (out / "results.json").write_text(json.dumps(results, indent=1))
        if len(members) > 1:
            names.append(f"{base}_ens")
            results[names[-1]] = evaluate(MeanReward(members), val_pairs, data["val"], out / names[-1], {})
            (out / "results.json").write_text(json.dumps(results, indent=1))

    keys = ["accuracy", "acc_plus", "ece", "acc.hallucination_pairs", "critique_names_error"]
    aspect_keys = sorted({k for n in names for k in results[n] if k.endswith(".spearman")})
    print("\n| run | " + " | ".join(keys + aspect_keys) + " |")
    print("|---" * (1 + len(keys) + len(aspect_keys)) + "|")
    for name in names:
        row = results[name]
        cells = [f"{row[k]:.3f}" if k in row else "" for k in keys + aspect_keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    ceilings = results["spearman_ceiling"]
    print(
        "\nSpearman ceiling without exact ties:",
        ", ".join(f"{a} {v:.3f}" for a, v in sorted(ceilings.items())),
    )


if __name__ == "__main__":
    main()
