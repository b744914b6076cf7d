"""Reward-model recipe: Bradley–Terry, fact-augmented, critique-based and multi-aspect reward models.

Read top to bottom: config → records (``PreferencePair``; ``Ranking`` lists expand to all their pairs)
→ the kind's training items → backbone + head (``RewardModel``) → loop(kind's loss) → checkpoints →
``run_dir/final`` (backbone + ``reward_head.safetensors``) → evaluation on ``val_data``
(``eval/rm.json``: Acc, Acc+, ECE, per-aspect MSE/Spearman, critique naming).

Kinds (ALGORITHMS.md "Reward models"):

- ``bt``: scalar head on the last token of prompt + response; L = −log σ(r_w − r_l − m) + c·(r_w + r_l)²
  (``use_margin``: m = the pair's margin; ``centering``: c; ``soft_margin`` s: graded labels σ(s·margin)
  instead). Prompt + image encoded once per pair. ``freeze`` keeps parts of the backbone (e.g. the vision
  tower) at their initial weights; ``select_best`` keeps the weights of the best evaluation.
- ``fact`` (LLaVA-RLHF): ``bt`` on prompts that carry the pair's ``facts`` (``with_facts``); the same
  transform is applied when the RM scores (``ModelReward``).
- ``critique`` (MM-RLHF): the RM reads ``question Response: <y> Critique the response.`` and writes the
  critique (NLL on the critique tokens), the head reads the state after the critique;
  L = w·NLL(critiques) + BT(r_w, r_l), ties (margin 0) as (r_w − r_l)².
- ``aspects``: K-dim head, masked MSE against the per-aspect scores of each response (``scores`` of pairs,
  ``scores`` of rankings); combine aspects later by weights (``ModelReward(weights=...)``).

Logged per step (``metrics.jsonl`` + TensorBoard): ``loss`` and the kind's metrics (``accuracy``,
``reward_margin``, ``nll``, per-aspect MSE …), ``lr``, ``grad_norm``; at ``eval_every`` the held-out
``val/*`` metrics. Checkpoints hold model, optimiser, scheduler, RNG and data position (exact resume).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mmalign.config import load_config
from mmalign.data.collate import IGNORE_INDEX, SFTCollator
from mmalign.data.pairs import PairCollator
from mmalign.data.rm_inputs import FACTS_PLACEMENTS, FactsPlacement, pair_with_facts
from mmalign.data.schema import PreferencePair, Ranking, Sample
from mmalign.errors import ConfigError, DataError
from mmalign.losses.reward import (
    aspect_regression_loss,
    bradley_terry_loss,
    critique_reward_loss,
    pairs_from_ranking,
)
from mmalign.models.heads import RewardModel
from mmalign.models.kernels import lean_kernels
from mmalign.models.logprobs import token_logps_from_logits
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
from mmalign.recipes.sft import DataPosition, micro_batches, next_window, seed_everything
from mmalign.rollout.rewards import RM_KINDS, rm_conversation

RMKind = Literal["bt", "fact", "critique", "aspects"]


@dataclass
class RMConfig(TrainLoopConfig):
    """Train a reward model on preference pairs / rankings."""

    model: str = ""
    """Backbone initialisation: a model directory (typically the SFT run's ``final/``), a hub id or
    ``tiny:<arch>``."""
    data: str = ""
    """JSONL of ``PreferencePair`` and/or ``Ranking`` records (image paths relative to the file)."""
    val_data: str = ""
    """Held-out JSONL of ``PreferencePair`` records for the evaluation (empty: none)."""
    out_dir: str = "runs/rm"
    """Run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, final/, eval/rm.json."""
    kind: RMKind = "bt"
    """``bt``, ``fact`` (facts in the prompt), ``critique`` (generate critique, then score) or ``aspects``."""
    facts_placement: FactsPlacement = "system"
    """``fact`` kind: where the facts go (``mmalign.data.rm_inputs.with_facts``): ``system``, a system turn
    before the conversation (the user turn stays as in SFT), or ``user``, appended to the last user turn
    (LLaVA-RLHF's layout). Recorded with the model, so scoring uses the same placement."""
    aspects: tuple[str, ...] = ()
    """``aspects`` kind: the head's outputs in order (empty: every aspect found in the data, sorted)."""
    ranking_score: str = "reward"
    """Which score of a ``Ranking`` response orders it when the ranking is expanded to pairs (``reward``,
    or an aspect name); ties give no pair."""
    use_margin: bool = False
    """BT with margin: L = −log σ(r_w − r_l − margin) using each pair's ``margin`` (0 when missing)."""
    centering: float = 0.0
    """Weight c of the centering term c·(r_w + r_l)² (keeps rewards near 0; 0.01 is common)."""
    soft_margin: float = 0.0
    """s > 0 (bt, fact): BT against graded labels σ(s·margin) from each pair's score margin (0 when
    missing) instead of hard ones: the reward gap of a pair is pulled to s·margin, so close trade-offs
    and clear-cut pairs get gaps of their own size (``losses.reward.bradley_terry_loss``). Excludes
    ``use_margin``."""
    critique_weight: float = 1.0
    """Weight of the critique NLL in the critique RM loss."""
    freeze: tuple[str, ...] = ()
    """Backbone parameters whose names contain one of these substrings keep their initial values, e.g.
    ``[vision_tower, multi_modal_projector]`` keeps the SFT model's image features (the head trains)."""
    share_prefix: bool = True
    """Encode prompt + image once per pair (bt, fact): exact, fewer tokens through the backbone."""
    batch_size: int = 8
    """Pairs (or responses, for ``aspects``) per micro-batch."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5))
    """Optimiser and schedule (the head and the backbone share the learning rate)."""
    eval_every: int = 0
    """Evaluate on ``val_data`` every this many steps (0: only at the end)."""
    n_val: int | None = None
    """Use only the first ``n_val`` held-out pairs (None: all)."""
    select_best: str = ""
    """Early stopping: a ``val_data`` metric (e.g. ``accuracy``); ``final/`` gets the weights of the
    evaluation (every ``eval_every`` steps and at the end) where it was highest, the earliest on ties.
    ``val_data`` should then be a selection split of the *training* distribution, not the test set. Empty:
    the last weights. The best weights are kept in memory: a resumed run compares evaluations after the
    resume only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in RM_KINDS:
            raise ValueError(f"kind must be one of {RM_KINDS}, got {self.kind!r}")
        if self.facts_placement not in FACTS_PLACEMENTS:
            raise ValueError(
                f"facts_placement must be one of {FACTS_PLACEMENTS}, got {self.facts_placement!r}"
            )
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.centering < 0 or self.critique_weight < 0 or self.soft_margin < 0:
            raise ValueError("centering, critique_weight and soft_margin must be >= 0")
        if self.soft_margin and self.use_margin:
            raise ValueError("use_margin and soft_margin exclude each other")
        if self.select_best and not (self.val_data and self.eval_every):
            raise ValueError("select_best needs val_data and eval_every > 0")


@dataclass
class RMResult:
    run_dir: Path
    final_metrics: dict[str, float]
    """Last logged training metrics and, when ``val_data`` is set, the evaluation as ``eval/*``."""
    steps: int

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "final"


def load_rm_config(yaml_path: str | Path | None = None, overrides: Sequence[str] = ()) -> RMConfig:
    return load_config(RMConfig, yaml_path, overrides)


# ----------------------------------------------------------------------------------------------- data
def expand_ranking(ranking: Ranking, score: str = "reward") -> list[PreferencePair]:
    """Every (better, worse) pair of a ranking by ``score`` (ties skipped), with scores and margin."""
    values = []
    for k, s in enumerate(ranking.scores):
        if score in s:
            values.append(s[score])
        elif score == "reward" and s:
            values.append(sum(s.values()) / len(s))
        else:
            raise DataError(f"response {k} has no {score!r} score", field=f"{ranking.id}.scores.{k}")
    pairs = []
    for better, worse, margin in pairs_from_ranking(values):
        pairs.append(
            PreferencePair(
                id=f"{ranking.id}-{better}-{worse}",
                images=ranking.images,
                prompt=ranking.prompt,
                chosen=ranking.responses[better],
                rejected=ranking.responses[worse],
                scores={"chosen": ranking.scores[better], "rejected": ranking.scores[worse]},
                margin=margin,
                meta={**ranking.meta, "group": ranking.meta.get("group", ranking.id)},
                source="ranking",
            )
        )
    return pairs


def read_rm_pairs(path: Path, ranking_score: str = "reward") -> list[PreferencePair]:
    """``PreferencePair`` records of ``path``, rankings expanded to all their pairs."""
    from mmalign.data.io import read_jsonl

    out: list[PreferencePair] = []
    for line, record in enumerate(read_jsonl(path), start=1):
        if isinstance(record, PreferencePair):
            out.append(record)
        elif isinstance(record, Ranking):
            out.extend(expand_ranking(record, ranking_score))
        else:
            raise DataError(
                f"reward models train on pairs or rankings, found a {record.kind!r}",
                file=str(path),
                line=line,
            )
    if not out:
        raise DataError("no preference pairs (rankings without score differences give none)", file=str(path))
    return out


@dataclass
class AspectRow:
    """One response with its annotated aspect scores (the ``aspects`` kind trains on these)."""

    sample: Sample  # prompt + the response as the assistant turn
    target: list[float]  # (K,) NaN where not annotated


def aspect_rows(pairs: Sequence[PreferencePair], aspects: Sequence[str]) -> list[AspectRow]:
    """Both responses of every pair with ``scores``, deduplicated (rankings give each response many times)."""
    rows, seen = [], set()
    for p in pairs:
        for side in ("chosen", "rejected"):
            scores = (p.scores or {}).get(side)  # type: ignore[call-overload]
            key = (p.meta.get("group", p.id), getattr(p, side))
            if not scores or key in seen:
                continue
            seen.add(key)
            sample = Sample(
                id=f"{p.id}-{side}", images=p.images, conversation=p.conversation(side), meta=p.meta
            )
            rows.append(AspectRow(sample, [float(scores.get(a, math.nan)) for a in aspects]))
    return rows


def critique_samples(pair: PreferencePair) -> list[Sample]:
    """The critique RM's two training conversations of a pair (chosen first); needs both critiques."""
    if not pair.critique or set(pair.critique) != {"chosen", "rejected"}:
        raise DataError(
            f"pair {pair.id!r}: the critique RM needs a critique of both responses", field="critique"
        )
    return [
        Sample(
            id=f"{pair.id}-{side}",
            images=pair.images,
            conversation=rm_conversation(
                "critique", pair.prompt, getattr(pair, side), {}, pair.critique[side]
            ),
        )
        for side in ("chosen", "rejected")
    ]


# ----------------------------------------------------------------------------------------------- losses
Objective = Callable[[RewardModel, Any], tuple[torch.Tensor, dict[str, float]]]


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                out[k] = float(v)
        elif isinstance(v, int | float):
            out[k] = float(v)
    return out


def pair_objective(cfg: RMConfig) -> Objective:
    """BT on prefix-shared pair rewards (``bt`` and ``fact``)."""

    def objective(rm: RewardModel, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = rm.pair_rewards(batch, share_prefix=cfg.share_prefix)  # (B, 1) each
        margin = None
        if cfg.use_margin or cfg.soft_margin:
            margin = torch.tensor([m or 0.0 for m in batch.margins], dtype=chosen.dtype, device=chosen.device)
        loss, metrics = bradley_terry_loss(
            chosen[:, 0], rejected[:, 0], margin=margin, centering=cfg.centering, soft_scale=cfg.soft_margin
        )
        return loss, _floats(metrics)

    return objective


def critique_objective(cfg: RMConfig) -> Objective:
    """Critique NLL + BT (ties squared) from one backbone pass over the 2B critique conversations."""

    def objective(rm: RewardModel, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        enc, tie = batch
        labels = enc.pop("labels")  # (2B, T)
        ids, attn = enc.pop("input_ids"), enc.pop("attention_mask")
        hidden, logits = rm.hidden_and_logits(ids, attn, **enc)  # (2B, T, H), (2B, T, V)
        rewards = rm.rewards_from_hidden(hidden, attn)[:, 0]  # (2B,)
        mask = labels[:, 1:] != IGNORE_INDEX  # (2B, T-1)
        token_lp = token_logps_from_logits(logits[:, :-1], labels[:, 1:].clamp(min=0))
        b = rewards.shape[0] // 2
        loss, metrics = critique_reward_loss(
            token_lp, mask, rewards[:b], rewards[b:], tie, nll_weight=cfg.critique_weight
        )
        return loss, _floats(metrics)

    return objective


def aspect_objective(cfg: RMConfig, aspects: Sequence[str]) -> Objective:
    def objective(rm: RewardModel, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        enc, target = batch
        enc.pop("labels")
        pred = rm(enc.pop("input_ids"), enc.pop("attention_mask"), **enc)  # (B, K)
        present = ~torch.isnan(target)
        loss, metrics = aspect_regression_loss(pred, torch.nan_to_num(target), present)
        out = _floats(metrics)
        per_aspect = torch.as_tensor(metrics["per_aspect_mse"])  # (K,)
        for k, a in enumerate(aspects):
            value = float(per_aspect[k])
            if not math.isnan(value):
                out[f"mse.{a}"] = value
        return loss, out

    return objective


# ----------------------------------------------------------------------------------------------- recipe
def freeze_backbone(rm: RewardModel, patterns: Sequence[str]) -> int:
    """Stop training the backbone parameters whose names contain one of ``patterns``; returns how many
    parameter tensors were frozen. ``ConfigError`` when a pattern matches no backbone parameter."""
    frozen = 0
    for pattern in patterns:
        hits = [p for name, p in rm.backbone.named_parameters() if pattern in name]
        if not hits:
            raise ConfigError(f"freeze: {pattern!r} matches no backbone parameter")
        for p in hits:
            frozen += p.requires_grad
            p.requires_grad_(False)
    return frozen


def run_rm(cfg: RMConfig, resume: bool = False, *, overwrite: bool = False) -> RMResult:
    """Train ``cfg.model`` + a reward head on ``cfg.data``; write the run to ``cfg.out_dir``."""
    from mmalign.models.load import load_model

    if not cfg.model:
        raise ConfigError("model: required (the backbone, e.g. the SFT run's final/ dir)")
    if not cfg.data or not Path(cfg.data).is_file():
        raise ConfigError(f"data: {cfg.data or '(empty)'}: no such file")
    data_path = Path(cfg.data)
    run = RunDir(cfg.out_dir)
    if overwrite and not resume:
        run.clear()
    if not resume and run.has_progress():
        raise ConfigError(
            f"out_dir: {run.path} already holds a run; resume it, overwrite it, or choose another"
        )
    if resume:
        warn_if_config_changed(run, cfg)
    run.write_config(cfg)

    # -- data: pairs (rankings expanded) → the kind's training items
    pairs = read_rm_pairs(data_path, cfg.ranking_score)
    if cfg.kind == "fact":
        missing = [p.id for p in pairs if not p.facts]
        if missing:
            raise DataError(
                f"the fact RM needs facts on every pair; {len(missing)} without, e.g. {missing[0]!r}",
                file=str(data_path),
                field="facts",
            )
        pairs = [pair_with_facts(p, cfg.facts_placement) for p in pairs]
    aspects: tuple[str, ...] = ()
    if cfg.kind == "aspects":
        found = sorted({a for p in pairs for s in (p.scores or {}).values() for a in s if a != "reward"})
        aspects = cfg.aspects or tuple(found)
        if not aspects:
            raise DataError(
                "the aspects RM needs per-aspect scores on the pairs", file=str(data_path), field="scores"
            )

    # -- model
    seed_everything(cfg.seed)
    backbone, processor = load_model(cfg.model, dtype="fp32", lora=cfg.lora)
    rm = RewardModel(
        backbone,
        dim=max(1, len(aspects)),
        aspects=aspects or None,
        kind=cfg.kind,
        facts_placement=cfg.facts_placement,
    ).train()
    freeze_backbone(rm, cfg.freeze)
    base = data_path.parent
    items: list[Any]
    collate: Callable[[list[Any]], Any]
    objective: Objective
    if cfg.kind in ("bt", "fact"):
        items, objective = pairs, pair_objective(cfg)
        collate = PairCollator(processor, cfg.max_length, cfg.truncation, base_dir=base, cache=True)
    elif cfg.kind == "critique":
        items, objective = pairs, critique_objective(cfg)
        sft = SFTCollator(processor, cfg.max_length, "error", base_dir=base)

        def collate(batch: list[Any]) -> Any:
            samples = [critique_samples(p) for p in batch]
            enc = sft([s[0] for s in samples] + [s[1] for s in samples])  # chosen rows, then rejected rows
            tie = torch.tensor([abs(p.margin or 0.0) < 1e-9 and p.margin is not None for p in batch])
            return enc, tie
    else:
        items, objective = aspect_rows(pairs, aspects), aspect_objective(cfg, aspects)
        sft_aspects = SFTCollator(processor, cfg.max_length, cfg.truncation, base_dir=base)

        def collate(batch: list[Any]) -> Any:
            enc = sft_aspects([row.sample for row in batch])
            return None if enc is None else (enc, torch.tensor([row.target for row in batch]))

    n_batches = math.ceil(len(items) / cfg.batch_size)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * n_batches / cfg.grad_accum)
    optimizer, scheduler = build_optimizer(rm, cfg.optim, total_steps)
    trainable = [p for p in rm.parameters() if p.requires_grad]

    # -- resume
    step, position = 0, DataPosition()
    checkpoint = latest_checkpoint(run.path) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, rm, optimizer, scheduler)
        step = state.step
        position = DataPosition(state.data_state["epoch"], state.data_state["batch_index"])
    metrics = MetricsLogger(run.metrics_path, run.tensorboard_dir, resume_step=step if checkpoint else None)
    val_pairs = _read_val(cfg)

    # -- loop
    stream = micro_batches(items, cfg.batch_size, cfg.seed, position, None if cfg.max_steps else cfg.epochs)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    last: dict[str, float] = {}
    best = _Best(cfg.select_best)
    show_bar = None if cfg.progress_bar else False
    with metrics, progress(total_steps, f"rm:{cfg.kind}", completed=step, enabled=show_bar) as bar:
        while step < total_steps:
            window, position = next_window(stream, collate, cfg.grad_accum, position)
            if not window:
                break
            sums: dict[str, float] = {}
            for batch in window:
                with autocast, lean_kernels():  # every kind; same values (models.kernels)
                    loss, info = objective(rm, batch)
                (loss / len(window)).backward()
                for k, v in info.items():
                    sums[k] = sums.get(k, 0.0) + v / len(window)
            clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip))
            lr = float(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last = {**sums, "lr": lr, "grad_norm": grad_norm, "epoch": position.epoch}
            record = dict(last) if step % cfg.log_every == 0 or step == total_steps else {}
            if val_pairs and cfg.eval_every and step % cfg.eval_every == 0 and step != total_steps:
                evaluated = _evaluate(rm, processor, val_pairs, cfg).metrics
                record.update({f"val/{k}": v for k, v in evaluated.items()})
                best.update(rm, step, evaluated)
            if record:
                metrics.log(step, record)
            if cfg.save_every and (step % cfg.save_every == 0 or step == total_steps):
                save_checkpoint(
                    run.checkpoints_dir,
                    rm,
                    optimizer,
                    scheduler,
                    step,
                    position.as_dict(cfg.seed),
                    keep=cfg.keep_checkpoints,
                )
            bar.advance(1, loss=last.get("loss", float("nan")))

    if not last:
        logged = [r for r in read_metrics(run.metrics_path) if "loss" in r]
        last = {k: v for k, v in (logged[-1] if logged else {}).items() if k not in ("step", "wall_time")}

    # -- final model (the best evaluation's weights with select_best) and evaluation
    result = _evaluate(rm, processor, val_pairs, cfg) if val_pairs else None
    if best.metric and result is not None:
        best.update(rm, step, result.metrics)
        if best.step != step:
            rm.load_state_dict(best.state)
            result = _evaluate(rm, processor, val_pairs, cfg)
    tmp = run.path / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora is not None and hasattr(rm.backbone, "merge_and_unload"):
        rm.backbone = rm.backbone.merge_and_unload()
    rm.save(tmp, processor)
    shutil.rmtree(run.final_dir, ignore_errors=True)
    tmp.replace(run.final_dir)
    final_metrics = {k: float(v) for k, v in last.items() if isinstance(v, int | float)}
    if best.metric:
        final_metrics["best_step"] = float(best.step)
    if result is not None:
        from mmalign.atomic import atomic_write_json

        atomic_write_json(run.eval_dir / "rm.json", result.to_dict())
        final_metrics.update({f"eval/{k}": v for k, v in result.metrics.items()})
        metrics_row = {f"val/{k}": v for k, v in result.metrics.items()}
        with MetricsLogger(run.metrics_path, run.tensorboard_dir, resume_step=step) as final_log:
            final_log.log(step, metrics_row)
    return RMResult(run_dir=run.path, final_metrics=final_metrics, steps=step)


class _Best:
    """The weights of the evaluation with the highest ``metric`` so far (earliest on ties)."""

    def __init__(self, metric: str) -> None:
        self.metric, self.value, self.step = metric, -math.inf, 0
        self.state: dict[str, torch.Tensor] = {}

    def update(self, rm: torch.nn.Module, step: int, metrics: dict[str, float]) -> None:
        if not self.metric:
            return
        if self.metric not in metrics:
            raise ConfigError(f"select_best: no metric {self.metric!r}; evaluation gives {sorted(metrics)}")
        value = float(metrics[self.metric])
        if value > self.value:
            self.value, self.step = value, step
            self.state = {k: v.detach().clone() for k, v in rm.state_dict().items()}


def _read_val(cfg: RMConfig) -> list[PreferencePair]:
    if not cfg.val_data:
        return []
    path = Path(cfg.val_data)
    if not path.is_file():
        raise ConfigError(f"val_data: {path}: no such file")
    pairs = read_rm_pairs(path, cfg.ranking_score)
    return pairs[: cfg.n_val] if cfg.n_val is not None else pairs


def _evaluate(rm: RewardModel, processor: Any, pairs: list[PreferencePair], cfg: RMConfig) -> Any:
    from mmalign.eval.rm_eval import evaluate_rm
    from mmalign.rollout.rewards import ModelReward

    return evaluate_rm(
        ModelReward(rm, processor, batch_size=cfg.batch_size, max_length=cfg.max_length),
        pairs,
        base_dir=Path(cfg.val_data).parent,
    )
