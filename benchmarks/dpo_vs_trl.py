"""How much faster is our DPO than TRL's ``DPOTrainer``, on the same tiny LLaVA and the same pairs?

One run of this script builds one tiny LLaVA (96 px images, 8 px patches → 144 image tokens per prompt)
and 256 oracle preference pairs (``mmalign.recipes.pairs.injected_pairs`` on held-out scenes rendered at
96 px), writes both to a temporary folder, then trains DPO on them twice, **each side in its own
subprocess, one after the other** (so each side's peak RSS is its own and the two never share the 2 cores):

* ``ours``: ``PairCollator`` → ``pair_token_logps(model, batch, share_prefix=True)`` (prompt + image encoded
  once per pair, KV cache reused by both responses) → ``sequence_scores`` → ``preference_loss("dpo")``,
  with the reference log-probs computed **once** before training by ``compute_reference_logps`` (timed
  separately: ``ours_ref_precompute_s``), so no reference model is kept during training; the pair forward
  runs under ``models.kernels.lean_kernels`` (RMSNorm / rotary autograd with fewer full-size temporaries;
  bit-identical forward values);
* ``trl``: ``trl.DPOTrainer`` on the same saved model path, in its fastest correct configuration on this
  machine (printed in ``settings.trl``): no gradient checkpointing, fp32, no eval/logging/saving,
  sequential sampling (same batch order as ours), ``precompute_ref_log_probs=False`` because TRL refuses it
  for vision datasets — so it runs a separate reference model forward on every step, and feeds each image
  twice (chosen and rejected rows), which is TRL's cost.

Both sides: batch 8, fp32, CPU, β = 0.1, sigmoid loss, AdamW (fused, lr 1e-5, no warm-up, constant
schedule, weight decay 0, grad-norm clip 1.0), dropout off, identical data order. A step is timed from
the end of the previous step to the end of this one (collation, forwards, backward, optimiser); after
``--warmup`` steps, ``--steps`` steps are timed and the **median** gives pairs/s.

Correctness: the TRL subprocess checks that TRL's collator produces exactly our token ids, masks and
pixels on the first batch (``trl_batch_matches_ours``); both sides record every step's loss and the first
step's summed policy log-probs. ``max_abs_loss_diff`` is the largest |loss_ours − loss_trl| over all steps
(step 1 is log 2 on both sides since policy = reference; later steps differ only if the gradients did),
``max_abs_logps_diff`` compares the first batch's mean summed log-probs of chosen and rejected responses.

Throughput: ``<side>_pairs_per_s`` = batch / median step time; ``ours_pairs_per_s_incl_ref`` amortises the
one-time reference pass over one epoch: pairs / (pairs / ours_pairs_per_s + ours_ref_precompute_s).
``settings.machine_load`` records, per side, the cores other processes kept busy just before
(``busy_cores_before``) and during the run (``foreign_busy_cores``); both are ~0 on an idle machine. A side
that other processes slowed down is run again (``--retries``, default 2); ``machine_idle`` says if it held.

Usage: ``python benchmarks/dpo_vs_trl.py [--json] [--steps N] [--pairs N] [--wait-idle SECONDS]``.
Do not run it while another torch process is busy on this machine (see docs/NOTES.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # scaffolding shared by the benchmarks
from _common import MODEL_SHAPE, SEED

if TYPE_CHECKING:
    from mmalign.data.pairs import PairCollator
    from mmalign.data.schema import PreferencePair

SIDES = ("ours", "trl")

# ----------------------------------------------------------------------------------------------- setup

BETA = 0.1
LR = 1e-5
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
TRL_MAX_LENGTH = 1024
"""TRL truncates sequences longer than this; our longest is ~200 tokens, so nothing is cut."""


def _prepare(
    workdir: Path, n_pairs: int, batch_size: int, image_size: int = MODEL_SHAPE["image_size"]
) -> dict[str, Any]:
    """Build and save the tiny LLaVA, the pairs (ours: JSONL + PNGs; TRL: prompt/chosen/rejected texts) and
    our collation of the first batch (TRL's collator must reproduce it). Returns the data settings."""
    import torch
    from safetensors.torch import save_file

    from mmalign.data.pairs import PairCollator
    from mmalign.recipes.pairs import injected_pairs, write_pairs
    from mmalign.world.corpus import eval_scenes
    from mmalign.world.scene import WorldConfig

    processor, model_settings = common.build_tiny_llava(workdir / "model", image_size)
    config = WorldConfig(image_size=image_size)
    # Scenes where no error can be injected give no pair: take a few spare scenes.
    scenes = eval_scenes(n_pairs + n_pairs // 4 + 8, seed=SEED, config=config)
    pairs = injected_pairs(
        scenes, seed=SEED, config=config, image_dir=workdir / "images", relative_to=workdir
    )
    if len(pairs) < n_pairs:
        raise RuntimeError(f"only {len(pairs)} pairs from {len(scenes)} scenes, {n_pairs} wanted")
    pairs = pairs[:n_pairs]
    write_pairs(workdir / "pairs.jsonl", pairs)

    collator = PairCollator(processor, max_length=None, base_dir=workdir)
    trl_rows, prompt_lens, chosen_lens, rejected_lens, full_lens = [], [], [], [], []
    for pair in pairs:
        split = collator.split_pair(pair)
        assert split is not None  # no max_length: never dropped
        chosen, rejected, _ = split
        texts = []
        for side in (chosen, rejected):
            ex = side.example
            start = ex.offsets[side.prompt_len][0]
            end = ex.offsets[side.prompt_len + len(side.response_ids) - 1][1]
            texts.append((ex.text[:start], ex.text[start:end]))
            full_lens.append(side.prompt_len + len(side.response_ids))
        (prompt, chosen_text), (prompt_r, rejected_text) = texts
        if prompt != prompt_r:
            raise RuntimeError(f"pair {pair.id}: chosen and rejected render different prompts")
        image = pair.images[0].resolve(workdir)
        trl_rows.append(
            {"image": str(image), "prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}
        )
        prompt_lens.append(chosen.prompt_len)
        chosen_lens.append(len(chosen.response_ids))
        rejected_lens.append(len(rejected.response_ids))
    (workdir / "trl_rows.json").write_text(json.dumps(trl_rows), encoding="utf-8")

    first = collator(pairs[:batch_size])
    assert first is not None
    c = first.concat
    save_file(
        {
            "input_ids": c["input_ids"].contiguous(),  # (2B, T) chosen rows then rejected rows
            "attention_mask": c["attention_mask"].contiguous(),  # (2B, T)
            "completion_mask": c["response_mask"].to(torch.long).contiguous(),  # (2B, T)
            "pixel_values": c["pixel_values"].contiguous(),  # (2B, 3, H, W): each image twice
        },
        str(workdir / "first_batch.safetensors"),
    )
    return {
        "model": model_settings,
        "pairs": len(pairs),
        "prompt_tokens": sorted(set(prompt_lens)),
        "chosen_tokens_max": max(chosen_lens),
        "rejected_tokens_max": max(rejected_lens),
        "sequence_tokens_max": max(full_lens),
        "pair_source": f"mmalign.recipes.pairs.injected_pairs(eval_scenes(seed=0), image_size={image_size})",
    }


def _load_pairs(workdir: Path, processor: Any) -> tuple[list[PreferencePair], PairCollator]:
    """The pairs ``_prepare`` wrote and our collator for them: the data of the ``ours`` sides (here and in
    ``rm_throughput.py``)."""
    from mmalign.data.io import read_jsonl
    from mmalign.data.pairs import PairCollator
    from mmalign.data.schema import PreferencePair

    pairs = [p for p in read_jsonl(workdir / "pairs.jsonl", kind="pair") if isinstance(p, PreferencePair)]
    return pairs, PairCollator(processor, max_length=None, base_dir=workdir, cache=True)


# ----------------------------------------------------------------------------------------------- sides


def _optimizer(params: Any) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=LR, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0, fused=True)


def _run_ours(workdir: Path, steps: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """Our DPO: prefix-shared pair forward + precomputed reference log-probs. Returns timings and losses."""
    import torch

    from mmalign.losses.dpo import LossType, preference_loss, score_kwargs, sequence_scores
    from mmalign.models.load import load_model
    from mmalign.models.logprobs import pair_token_logps, prefix_sharing_supported
    from mmalign.models.refcache import ReferenceCache, compute_reference_logps

    torch.manual_seed(SEED)
    model, processor = load_model(workdir / "model", dtype="fp32", for_training=True)
    pairs, collator = _load_pairs(workdir, processor)
    n_batches = len(pairs) // batch_size

    t0 = time.perf_counter()
    cache = ReferenceCache(tempfile.mkdtemp(prefix="refcache_", dir=workdir))  # empty: every pair computed
    ref = compute_reference_logps(model, pairs, collator, cache, batch_size)
    ref_s = time.perf_counter() - t0
    ref_chosen, ref_rejected = ref.sequence_logps()  # (N,), (N,)

    model.train()
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad])
    kwargs = score_kwargs(LossType.DPO)
    step_s: list[float] = []
    losses = []
    logps: tuple[float, float] | None = None
    for step in common.timed_steps(warmup + steps, step_s):
        lo = (step % n_batches) * batch_size
        batch = collator(pairs[lo : lo + batch_size])
        assert batch is not None
        pol_c, pol_r = pair_token_logps(model, batch, share_prefix=True)  # (B, Tc), (B, Tr)
        score_c = sequence_scores(pol_c, batch.chosen_mask, **kwargs)  # (B,)
        score_r = sequence_scores(pol_r, batch.rejected_mask, **kwargs)  # (B,)
        loss, _ = preference_loss(
            LossType.DPO,
            score_c,
            score_r,
            ref_chosen[lo : lo + batch_size],
            ref_rejected[lo : lo + batch_size],
            beta=BETA,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if logps is None:
            logps = (float(score_c.detach().mean()), float(score_r.detach().mean()))
    return {
        "step_s": step_s,
        "losses": losses,
        "first_logps": logps,
        "ref_precompute_s": ref_s,
        "ref_pairs": int(ref.kept.sum()),
        "prefix_shared": prefix_sharing_supported(model),
    }


def _trl_settings(workdir: Path, total_steps: int, batch_size: int) -> dict[str, Any]:
    """The DPOConfig arguments of the TRL side (its fastest correct configuration here)."""
    return {
        "output_dir": str(workdir / "trl_out"),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": total_steps,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "optim": "adamw_torch_fused",
        "adam_beta1": ADAM_BETAS[0],
        "adam_beta2": ADAM_BETAS[1],
        "adam_epsilon": ADAM_EPS,
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "beta": BETA,
        "loss_type": ["sigmoid"],
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "precompute_ref_log_probs": False,
        "max_length": TRL_MAX_LENGTH,
        "padding_free": False,
        "disable_dropout": True,
        "train_sampling_strategy": "sequential",
        "dataloader_drop_last": True,  # same batches as ours when pairs % batch != 0
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,
        "remove_unused_columns": True,
        "report_to": "none",
        "logging_steps": 10**9,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "seed": SEED,
    }


def _run_trl(workdir: Path, steps: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """TRL's DPOTrainer on the saved model path and the same pairs. Imports no mmalign code."""
    import datasets
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(SEED)
    rows = json.loads((workdir / "trl_rows.json").read_text(encoding="utf-8"))
    dataset = datasets.Dataset.from_dict(
        {
            "images": [[Image.open(r["image"]).convert("RGB")] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows],
        }
    )

    class Timer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.begin = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.perf_counter())

    class RecordingDPOTrainer(DPOTrainer):  # type: ignore[misc]
        """Records each step's loss and summed policy log-probs (TRL computes them anyway)."""

        recorded: list[tuple[float, float, float]]

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if isinstance(out, tuple) else out
            m = self._metrics["train"]
            self.recorded.append((float(loss.detach()), m["logps/chosen"][-1], m["logps/rejected"][-1]))
            return out

    settings = _trl_settings(workdir, warmup + steps, batch_size)
    timer = Timer()
    trainer = RecordingDPOTrainer(
        model=str(workdir / "model"), args=DPOConfig(**settings), train_dataset=dataset, callbacks=[timer]
    )
    trainer.recorded = []

    # TRL's collation of the first batch must be exactly ours (tokens, completion masks, pixels). Padding
    # token ids are not compared: TRL pads completions with eos when the pad id is 0 (`pad_id or eos_id`).
    expected = load_file(str(workdir / "first_batch.safetensors"))
    got = trainer.data_collator([dict(dataset[i]) for i in range(batch_size)])
    pad = ~expected["attention_mask"].bool()  # (2B, T)

    def same(key: str) -> bool:
        a, b = got[key].to(expected[key].dtype), expected[key]
        if a.shape != b.shape:
            return False
        return (
            torch.equal(a.masked_fill(pad, 0), b.masked_fill(pad, 0))
            if key == "input_ids"
            else torch.equal(a, b)
        )

    problems = [k for k in ("input_ids", "attention_mask", "completion_mask", "pixel_values") if not same(k)]

    trainer.train()
    ends = [timer.begin, *timer.ends]
    step_s = [b - a for a, b in itertools.pairwise(ends)]
    recorded = trainer.recorded
    return {
        "step_s": step_s,
        "losses": [r[0] for r in recorded],
        "first_logps": (recorded[0][1], recorded[0][2]) if recorded else None,
        "batch_mismatch": problems,
        "ref_model_kept": trainer.ref_model is not None,
        "settings": settings,
    }


def _child(args: argparse.Namespace) -> None:
    """Entry point of a side's subprocess: run it and write ``result_<side>.json``."""
    run = _run_ours if args.child == "ours" else _run_trl
    common.run_child(
        args.child, args.workdir, args.threads, lambda: run(args.workdir, args.steps, args.warmup, args.batch)
    )


# ----------------------------------------------------------------------------------------------- parent


def _summary(
    ours: dict[str, Any],
    trl: dict[str, Any],
    data: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    ours_step, trl_step = (
        common.median_s(ours["step_s"], args.warmup),
        common.median_s(trl["step_s"], args.warmup),
    )
    ours_pps, trl_pps = args.batch / ours_step, args.batch / trl_step
    # One epoch over the pairs including the one-time reference pass.
    epoch_s = data["pairs"] / ours_pps + ours["ref_precompute_s"]
    ours_pps_incl_ref = data["pairs"] / epoch_s
    n = min(len(ours["losses"]), len(trl["losses"]))
    loss_diffs = [abs(a - b) for a, b in zip(ours["losses"][:n], trl["losses"][:n], strict=True)]
    logps_diff = max(abs(a - b) for a, b in zip(ours["first_logps"], trl["first_logps"], strict=True))
    return {
        "trl_pairs_per_s": round(trl_pps, 3),
        "ours_pairs_per_s": round(ours_pps, 3),
        "ours_pairs_per_s_incl_ref": round(ours_pps_incl_ref, 3),
        "ratio": round(ours_pps / trl_pps, 3),
        "ratio_incl_ref": round(ours_pps_incl_ref / trl_pps, 3),
        "ours_ref_precompute_s": round(ours["ref_precompute_s"], 3),
        "trl_step_s_median": round(trl_step, 4),
        "ours_step_s_median": round(ours_step, 4),
        "max_abs_loss_diff": float(f"{max(loss_diffs):.3g}"),
        "first_step_loss_diff": float(f"{loss_diffs[0]:.3g}"),
        "max_abs_logps_diff": float(f"{logps_diff:.3g}"),
        "first_logps_ours": [round(x, 4) for x in ours["first_logps"]],
        "trl_batch_matches_ours": not trl["batch_mismatch"],
        "trl_batch_mismatched_fields": trl["batch_mismatch"],
        "losses_ours": [round(x, 6) for x in ours["losses"]],
        "losses_trl": [round(x, 6) for x in trl["losses"]],
        "machine_idle": common.machine_idle((ours, trl)),
        **common.peak_rss_fields({"trl": trl, "ours": ours}),
        "settings": {
            **data,
            **common.step_settings(args, {"ours": ours, "trl": trl}),
            "beta": BETA,
            "loss": "sigmoid DPO, summed response log-probs",
            "optimizer": f"AdamW fused lr={LR} betas={ADAM_BETAS} eps={ADAM_EPS} weight_decay=0, "
            f"constant lr, grad-norm clip {MAX_GRAD_NORM}",
            "step_timing": "previous step end to this step end (collate+forwards+backward+optimiser); median",
            "ours": {
                "pair_forward": (
                    'pair_token_logps(share_prefix=True, mode="packed"): prompt + image once, every chosen '
                    "and rejected token in one padding-free row, last decoder layer only where read"
                ),
                "collation": "PairCollator(cache=True): each pair rendered once (during the reference pass, "
                "like TRL's dataset.map tokenisation before training), then padded per step",
                "prefix_shared": ours["prefix_shared"],
                "reference": "compute_reference_logps once before training (not kept in memory)",
                "kernels": "models.kernels.lean_kernels (default of the pair forward): RMSNorm and rotary "
                "embeddings with a leaner autograd, bit-identical forward values",
                "ref_pairs": ours["ref_pairs"],
            },
            "trl": {
                **{k: v for k, v in trl["settings"].items() if k != "output_dir"},
                "ref_model_kept": trl["ref_model_kept"],
                "note": "precompute_ref_log_probs=True is refused by TRL for vision datasets; the reference "
                "model runs every step. The vision collator repeats each image for chosen and rejected rows "
                "and pads completions with eos when the pad id is 0 (masked, so harmless).",
            },
            "versions": common.versions("torch", "transformers", "trl"),
        },
    }


def _print_summary(s: dict[str, Any], batch: int) -> None:
    print(f"model {s['settings']['model']} · {s['settings']['pairs']} pairs · batch {batch}")
    print(f"TRL : {s['trl_pairs_per_s']:8.2f} pairs/s  peak RSS {s['trl_peak_rss_mb']:7.1f} MiB")
    print(
        f"ours: {s['ours_pairs_per_s']:8.2f} pairs/s  peak RSS {s['ours_peak_rss_mb']:7.1f} MiB  "
        f"(ref precompute {s['ours_ref_precompute_s']:.1f} s; "
        f"incl. ref {s['ours_pairs_per_s_incl_ref']:.2f})"
    )
    print(f"ratio {s['ratio']:.2f}x (incl. ref {s['ratio_incl_ref']:.2f}x)")
    print(
        f"max |loss diff| {s['max_abs_loss_diff']:.2e}, "
        f"first-batch |logps diff| {s['max_abs_logps_diff']:.2e}, "
        f"TRL batch == ours: {s['trl_batch_matches_ours']}"
    )
    print(f"machine idle during both sides: {s['machine_idle']} ({s['settings']['machine_load']})")


def main(argv: list[str] | None = None) -> None:
    parser = common.new_parser(__doc__)
    common.add_step_args(parser, pairs_help="preference pairs (one reference pass over them)")
    common.add_side_args(parser, SIDES, keep=True)
    args = common.parse_args(parser, argv, _child)
    common.check_step_args(parser, args)

    with common.scratch_dir("dpo_vs_trl_", args.keep) as workdir:
        data = _prepare(workdir, args.pairs, args.batch, args.image_size)
        flags = common.child_flags(args, ("steps", "warmup", "batch", "threads"))
        results = common.run_sides(Path(__file__).resolve(), SIDES, workdir, flags, args)
        summary = _summary(results["ours"], results["trl"], data, args)

    common.print_result(summary, args.json, lambda s: _print_summary(s, args.batch))


if __name__ == "__main__":
    main()
