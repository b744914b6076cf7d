"""How many preference pairs per second does our reward-model training step take, against the plain
Hugging Face loop (``AutoModel`` + linear head on 2B concatenated rows), on the same tiny LLaVA and pairs?

One run builds the tiny LLaVA and 256 oracle preference pairs exactly as ``dpo_vs_trl.py`` does (its
``_prepare``: 96 px images, 8 px patches → 144 image tokens, hidden 256, 4 text layers), wraps the model in
``RewardModel(dim=1)`` (seeded head) and saves it once (``RewardModel.save``: ``save_pretrained`` folder +
``reward_head.safetensors``). Both sides load those weights and train a Bradley–Terry RM on the same pairs
in the same order, **each side in its own subprocess, one after the other** (per-side peak RSS; the two
never share the 2 cores):

* ``ours``: ``PairCollator`` → ``RewardModel.pair_rewards(batch, share_prefix=True)`` (prompt + image
  encoded once per pair, both responses continue its KV cache; ``models.kernels.lean_kernels`` for RMSNorm /
  rotary autograd, bit-identical forward values) → ``bradley_terry_loss`` → AdamW step;
* ``hf``: the loop a transformers user writes, importing no mmalign code: ``AutoModel.from_pretrained``
  (the base ``LlavaModel``, no LM head) and an ``nn.Linear`` loaded from ``reward_head.safetensors``; per
  step the processor turns the 2B texts ``prompt + chosen`` / ``prompt + rejected`` with their images
  (each image twice) into right-padded rows, the head reads the hidden state at each row's last non-pad
  token, loss ``−logsigmoid(r_w − r_l)`` (mean), AdamW step. Its settings (printed in ``settings.hf``):
  fp32, sdpa attention (``--hf-attn``), ``use_cache=False``, no gradient checkpointing, same threads,
  PIL images decoded once before training.

Both sides: batch 8, fp32, CPU, AdamW (fused, lr 1e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0,
constant lr, no clipping), dropout 0 in the tiny model, identical batch order. A step is timed from the end
of the previous step to the end of this one (collation, forward(s), backward, optimiser); after
``--warmup`` steps, ``--steps`` steps are timed and ``<side>_pairs_per_s`` = batch / median step time.

Correctness: the hf subprocess checks that the processor's rows are exactly our collator's plain layout
(``hf_batch_matches_ours``: ids, masks, pixels) and that ``AutoModel`` loaded every weight
(``hf_missing_keys``). Same weights, data and order ⇒ same losses: ``max_abs_loss_diff`` is the largest
|loss_ours − loss_hf| over all steps (warm-up included; the prefix-shared forward equals the plain one up
to float round-off, so it should stay below ``LOSS_TOLERANCE``), ``max_abs_reward_diff`` compares the
first batch's rewards pair by pair. ``settings.machine_load`` and the re-run of slowed-down sides
(``--retries``) work as in ``dpo_vs_trl.py``.

Usage: ``python benchmarks/rm_throughput.py [--json] [--steps N] [--pairs N] [--wait-idle SECONDS]``.
Do not run it while another torch process is busy on this machine (see docs/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # scaffolding shared by the benchmarks
from _common import SEED
from dpo_vs_trl import (  # the sibling benchmark: same model, data and optimiser
    ADAM_BETAS,
    ADAM_EPS,
    LR,
    _load_pairs,
    _optimizer,
    _prepare,
)

SIDES = ("ours", "hf")
LOSS_TOLERANCE = 1e-4
"""Largest |loss_ours − loss_hf| accepted as equal (the two forwards differ only by float round-off)."""

# ----------------------------------------------------------------------------------------------- setup


def _save_reward_model(workdir: Path) -> int:
    """Wrap the saved tiny LLaVA in a seeded ``RewardModel(dim=1)`` and save it in place (backbone +
    ``reward_head.safetensors``); both sides load this folder. Returns the head's parameter count."""
    import torch

    from mmalign.models.heads import RewardModel
    from mmalign.models.load import load_model

    backbone, _ = load_model(workdir / "model", dtype="fp32", for_training=False)
    torch.manual_seed(SEED)
    rm = RewardModel(backbone, dim=1)
    rm.save(workdir / "model")
    return sum(p.numel() for p in rm.head.parameters())


# ----------------------------------------------------------------------------------------------- sides


def _run_ours(workdir: Path, steps: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """Our RM step: prefix-shared pair rewards + Bradley–Terry loss. Returns timings, losses, rewards."""
    import torch

    from mmalign.losses.reward import bradley_terry_loss
    from mmalign.models.heads import load_reward_model
    from mmalign.models.logprobs import prefix_sharing_supported

    torch.manual_seed(SEED)
    rm, processor = load_reward_model(workdir / "model", dtype="fp32", for_training=True)
    pairs, collator = _load_pairs(workdir, processor)
    collator.prepare(pairs)  # tokenise + process images once, as the hf side decodes its images up front
    n_batches = len(pairs) // batch_size
    optimizer = _optimizer([p for p in rm.parameters() if p.requires_grad])

    step_s: list[float] = []
    losses = []
    first_rewards: list[list[float]] | None = None
    for step in common.timed_steps(warmup + steps, step_s):
        lo = (step % n_batches) * batch_size
        batch = collator(pairs[lo : lo + batch_size])
        assert batch is not None  # no max_length: nothing dropped
        r_chosen, r_rejected = rm.pair_rewards(batch, share_prefix=True)  # (B, 1), (B, 1)
        loss, _ = bradley_terry_loss(r_chosen[:, 0], r_rejected[:, 0])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if first_rewards is None:
            first_rewards = [r_chosen[:, 0].tolist(), r_rejected[:, 0].tolist()]
    return {
        "step_s": step_s,
        "losses": losses,
        "first_rewards": first_rewards,
        "prefix_shared": prefix_sharing_supported(rm.backbone),
        "attn_implementation": rm.backbone.config._attn_implementation,
    }


def _run_hf(workdir: Path, steps: int, warmup: int, batch_size: int, attn: str) -> dict[str, Any]:
    """The plain transformers loop on the saved folder and the same pairs. Imports no mmalign code."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoProcessor

    torch.manual_seed(SEED)
    folder = workdir / "model"
    processor = AutoProcessor.from_pretrained(folder)
    model, info = AutoModel.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
    )
    model.train()
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1)
    head.load_state_dict(load_file(str(folder / "reward_head.safetensors")))
    optimizer = _optimizer([*model.parameters(), *head.parameters()])

    # A user's dataset: prompt / chosen / rejected texts and the decoded image of each pair.
    rows = json.loads((workdir / "trl_rows.json").read_text(encoding="utf-8"))
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    n_batches = len(rows) // batch_size

    def encode(lo: int) -> Any:
        """The 2B rows of one batch (chosen rows, then rejected rows), as the processor pads them."""
        batch, ims = rows[lo : lo + batch_size], images[lo : lo + batch_size]
        texts = [r["prompt"] + r["chosen"] for r in batch] + [r["prompt"] + r["rejected"] for r in batch]
        return processor(text=texts, images=ims + ims, padding=True, return_tensors="pt")

    # The processor's rows must be exactly our collator's plain layout (pad ids aside).
    expected = load_file(str(workdir / "first_batch.safetensors"))
    got = encode(0)
    pad = ~expected["attention_mask"].bool()  # (2B, T)
    mismatched = [
        key
        for key in ("input_ids", "attention_mask", "pixel_values")
        if got[key].shape != expected[key].shape
        or not torch.equal(
            got[key].masked_fill(pad, 0) if key == "input_ids" else got[key],
            expected[key].masked_fill(pad, 0) if key == "input_ids" else expected[key],
        )
    ]

    step_s: list[float] = []
    losses = []
    first_rewards: list[list[float]] | None = None
    for step in common.timed_steps(warmup + steps, step_s):
        enc = encode((step % n_batches) * batch_size)
        hidden = model(**enc, use_cache=False).last_hidden_state  # (2B, T, H)
        last_tok = enc["attention_mask"].sum(dim=1) - 1  # (2B,) right padding
        rewards = head(hidden[torch.arange(hidden.shape[0]), last_tok]).squeeze(-1)  # (2B,)
        r_chosen, r_rejected = rewards[:batch_size], rewards[batch_size:]  # (B,), (B,)
        loss = -F.logsigmoid(r_chosen - r_rejected).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if first_rewards is None:
            first_rewards = [r_chosen.tolist(), r_rejected.tolist()]
    return {
        "step_s": step_s,
        "losses": losses,
        "first_rewards": first_rewards,
        "batch_mismatch": mismatched,
        "missing_keys": sorted(info["missing_keys"]),
        "model_class": type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
    }


def _child(args: argparse.Namespace) -> None:
    """Entry point of a side's subprocess: run it and write ``result_<side>.json``."""

    def run() -> dict[str, Any]:
        if args.child == "ours":
            return _run_ours(args.workdir, args.steps, args.warmup, args.batch)
        return _run_hf(args.workdir, args.steps, args.warmup, args.batch, args.hf_attn)

    common.run_child(args.child, args.workdir, args.threads, run)


# ----------------------------------------------------------------------------------------------- parent


def _max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _summary(
    ours: dict[str, Any], hf: dict[str, Any], data: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    ours_step, hf_step = (
        common.median_s(ours["step_s"], args.warmup),
        common.median_s(hf["step_s"], args.warmup),
    )
    ours_pps, hf_pps = args.batch / ours_step, args.batch / hf_step
    loss_diff = _max_abs_diff(ours["losses"], hf["losses"])
    reward_diff = max(
        _max_abs_diff(a, b) for a, b in zip(ours["first_rewards"], hf["first_rewards"], strict=True)
    )
    return {
        "hf_pairs_per_s": round(hf_pps, 3),
        "ours_pairs_per_s": round(ours_pps, 3),
        "ratio": round(ours_pps / hf_pps, 3),
        "hf_step_s_median": round(hf_step, 4),
        "ours_step_s_median": round(ours_step, 4),
        "max_abs_loss_diff": float(f"{loss_diff:.3g}"),
        "losses_match": loss_diff <= LOSS_TOLERANCE,
        "max_abs_reward_diff": float(f"{reward_diff:.3g}"),
        "hf_batch_matches_ours": not hf["batch_mismatch"],
        "hf_batch_mismatched_fields": hf["batch_mismatch"],
        "hf_missing_keys": hf["missing_keys"],
        "losses_ours": [round(x, 6) for x in ours["losses"]],
        "losses_hf": [round(x, 6) for x in hf["losses"]],
        "machine_idle": common.machine_idle((ours, hf)),
        **common.peak_rss_fields({"hf": hf, "ours": ours}),
        "settings": {
            **data,
            **common.step_settings(args, {"ours": ours, "hf": hf}),
            "loss": "Bradley–Terry −logsigmoid(r_w − r_l), mean over pairs, no margin, no centering",
            "optimizer": f"AdamW fused lr={LR} betas={ADAM_BETAS} eps={ADAM_EPS} weight_decay=0, "
            "constant lr, no grad clipping",
            "step_timing": "previous step end to this step end (collate+forward+backward+optimiser); median",
            "loss_tolerance": LOSS_TOLERANCE,
            "ours": {
                "model": "load_reward_model → RewardModel(LlavaForConditionalGeneration, dim=1)",
                "pair_forward": (
                    "RewardModel.pair_rewards(share_prefix=True, packed=True): prompt + image once, both "
                    "responses in one padding-free row, last decoder layer only at the read token"
                ),
                "prefix_shared": ours["prefix_shared"],
                "attn_implementation": ours["attn_implementation"],
                "collation": "PairCollator(cache=True), prepared before training; padding per step",
                "kernels": "models.kernels.lean_kernels (default of the pair forward): RMSNorm and rotary "
                "embeddings with a leaner autograd, bit-identical forward values",
            },
            "hf": {
                "model": f"AutoModel.from_pretrained → {hf['model_class']} + nn.Linear(hidden, 1)",
                "rows": "2B concatenated rows (chosen then rejected, each with prompt + image), right padded",
                "reward_token": "last non-pad token of each row",
                "attn_implementation": hf["attn_implementation"],
                "use_cache": False,
                "gradient_checkpointing": False,
                "collation": "processor(text, images, padding=True) per step on PIL images decoded once",
            },
            "versions": common.versions("torch", "transformers"),
        },
    }


def _print_summary(s: dict[str, Any], batch: int) -> None:
    print(f"model {s['settings']['model']} · {s['settings']['pairs']} pairs · batch {batch}")
    print(f"hf  : {s['hf_pairs_per_s']:8.2f} pairs/s  peak RSS {s['hf_peak_rss_mb']:7.1f} MiB")
    print(f"ours: {s['ours_pairs_per_s']:8.2f} pairs/s  peak RSS {s['ours_peak_rss_mb']:7.1f} MiB")
    print(f"ratio {s['ratio']:.2f}x")
    print(
        f"max |loss diff| {s['max_abs_loss_diff']:.2e} (match: {s['losses_match']}), first-batch |reward "
        f"diff| {s['max_abs_reward_diff']:.2e}, hf batch == ours: {s['hf_batch_matches_ours']}, "
        f"hf missing keys: {s['hf_missing_keys']}"
    )
    print(f"machine idle during both sides: {s['machine_idle']} ({s['settings']['machine_load']})")


def main(argv: list[str] | None = None) -> None:
    parser = common.new_parser(__doc__)
    common.add_step_args(parser, pairs_help="preference pairs (steps cycle over them)")
    parser.add_argument(
        "--hf-attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation of the hf side"
    )
    common.add_side_args(parser, SIDES, keep=True)
    args = common.parse_args(parser, argv, _child)
    common.check_step_args(parser, args)

    with common.scratch_dir("rm_throughput_", args.keep) as workdir:
        data = _prepare(workdir, args.pairs, args.batch, args.image_size)
        data["model"]["head_params"] = _save_reward_model(workdir)
        data["pair_order"] = "sequential batches, cycling over the pairs"
        flags = common.child_flags(args, ("steps", "warmup", "batch", "threads", "hf_attn"))
        results = common.run_sides(Path(__file__).resolve(), SIDES, workdir, flags, args)
        summary = _summary(results["ours"], results["hf"], data, args)

    if not summary["losses_match"]:
        print(
            f"warning: losses differ by {summary['max_abs_loss_diff']:.2e} > {LOSS_TOLERANCE}",
            file=sys.stderr,
        )
    common.print_result(summary, args.json, lambda s: _print_summary(s, args.batch))


if __name__ == "__main__":
    main()
