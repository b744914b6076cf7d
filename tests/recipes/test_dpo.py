"""DPO-family recipe: the step-1 loss of every variant equals a hand computation from plain log-probs,
training widens the chosen−rejected margin, reference log-probs are cached, best-checkpoint selection,
early stopping, the drift warning, and resume == uninterrupted."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mmalign.recipes.dpo as dpo_recipe
from mmalign.config import dump_config, load_config
from mmalign.errors import ConfigError, DataError
from mmalign.losses.dpo import LossType
from mmalign.recipes.dpo import (
    DPOConfig,
    drift_warning,
    is_improvement,
    load_dpo_config,
    run_dpo,
    val_score,
)
from mmalign.recipes.run import OptimConfig, list_checkpoints, read_metrics
from mmalign.recipes.sft import CONFIG_DIR

N_PAIRS = 6
BETA, GAMMA, EPS, SIMPO_GAMMA, W, K = 0.5, 5.0, 0.2, 0.3, 0.5, 0.5


# ----------------------------------------------------------------------------------------------- pure parts
def test_val_score_adds_hallucination_missed_objects_and_malformed_text_averaged_over_decodings() -> None:
    result = {
        "greedy.chair_i": 0.1, "greedy.coverage": 0.9, "greedy.well_formed": 1.0,
        "sampled.chair_i": 0.3, "sampled.coverage": 0.5, "sampled.well_formed": 0.8,
    }  # fmt: skip
    assert val_score(result, ["greedy"]) == pytest.approx(0.2)
    assert val_score(result, ["sampled"]) == pytest.approx(0.3 + 0.5 + 0.2)
    assert val_score(result) == pytest.approx((0.2 + 1.0) / 2)
    # a collapsed model "hallucinates" nothing but scores worst
    collapsed = {"greedy.chair_i": 0.0, "greedy.coverage": 0.0, "greedy.well_formed": 0.0}
    assert val_score(collapsed, ["greedy"]) == 2.0
    with pytest.raises(DataError, match=r"val_score: validation result has no 'greedy\.coverage'"):
        val_score({"greedy.chair_i": 0.0}, ["greedy"])


def test_improvement_respects_direction_and_min_delta_and_drift_warns_only_below_threshold() -> None:
    assert is_improvement(0.5, None, "min")
    assert is_improvement(0.4, 0.5, "min") and not is_improvement(0.5, 0.5, "min")
    assert not is_improvement(0.45, 0.5, "min", min_delta=0.1)
    assert is_improvement(0.6, 0.5, "max") and not is_improvement(0.4, 0.5, "max")
    assert not is_improvement(float("nan"), None, "min")
    assert drift_warning(-19.9, 20.0) is None
    assert drift_warning(5.0, 0.0) is None
    message = drift_warning(-25.0, 20.0)
    assert message is not None and "25.0 nats below the reference" in message


def test_shipped_config_parses_and_round_trips(tmp_path: Path) -> None:
    cfg = load_dpo_config(CONFIG_DIR / "dpo.yaml", ["loss=ddpo", "optim.lr=2e-5", "val_seeds=[0,1,2]"])
    assert cfg.loss is LossType.DDPO and cfg.optim.lr == 2e-5 and cfg.val_seeds == (0, 1, 2)
    assert cfg.val_decoding == ("greedy", "sampled") and cfg.best_metric == "val_score"
    assert load_config(DPOConfig, dump_config(cfg, tmp_path / "c.yaml")) == cfg
    assert DPOConfig().optim.lr == 1e-5 and DPOConfig().gamma == 5.0 and DPOConfig().share_prefix
    with pytest.raises(ConfigError, match="loss: expected one of"):
        load_dpo_config(CONFIG_DIR / "dpo.yaml", ["loss=ppo"])
    with pytest.raises(ValueError, match="label_smoothing is a cdpo setting"):
        DPOConfig(loss=LossType.DPO, label_smoothing=0.1)
    with pytest.raises(ValueError, match="patience needs eval_every"):
        DPOConfig(patience=2)


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny LLaVA policy, a different reference, six oracle-corrected pairs with mid-caption errors, and
    held-out scenes."""
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import ImageRef, Message
    from mmalign.models.tiny import build_tiny
    from mmalign.world.corpus import eval_scenes, train_scenes
    from mmalign.world.grammar import CAPTION_PROMPT
    from mmalign.world.pairs import corrected_pair, inject_midcaption_errors
    from mmalign.world.render import render

    root = tmp_path_factory.mktemp("dpo")
    size = dict(
        image_size=32, patch_size=16, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1
    )
    build_tiny("llava", root / "policy", heads=2, seed=0, **size)  # type: ignore[arg-type]
    build_tiny("llava", root / "reference", heads=2, seed=1, **size)  # type: ignore[arg-type]
    rng = random.Random(0)
    pairs = []
    for scene in train_scenes(40, seed=0):
        if len(scene.objects) < 2:
            continue
        wrong = inject_midcaption_errors(scene, rng)
        pair = corrected_pair(
            scene,
            [Message.user(CAPTION_PROMPT, n_images=1)],
            wrong,
            id=f"p{len(pairs)}",
            image_ref=ImageRef.from_pil(render(scene, 32)),
        )
        if pair is not None:
            pairs.append(pair)
        if len(pairs) == N_PAIRS:
            break
    assert len({p.margin for p in pairs}) > 1  # MM-DPO gets different β per pair
    write_jsonl(root / "pairs.jsonl", pairs)
    scenes_path = root / "eval_scenes.jsonl"
    scenes_path.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in eval_scenes(6, seed=0)))
    return {"root": root, "pairs": pairs, "scenes": scenes_path}


def config(world: dict[str, Any], name: str, **changes: Any) -> DPOConfig:
    base = DPOConfig(
        model=str(world["root"] / "policy"),
        ref_model=str(world["root"] / "reference"),
        data=str(world["root"] / "pairs.jsonl"),
        out_dir=str(world["root"] / name),
        beta=BETA,
        max_length=128,
        batch_size=N_PAIRS,
        max_steps=1,
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, min_lr_ratio=1.0),
        eval_at_start=False,
        progress_bar=False,
    )
    return dataclasses.replace(base, **changes)


def plain_logps(model: Any, processor: Any, pair: Any, side: str) -> torch.Tensor:
    """(n,) log-probs of the labelled response tokens from one plain forward over prompt + response."""
    from mmalign.data.collate import SFTCollator

    batch = SFTCollator(processor, 128, pair_side=side)([pair])
    labels = batch.pop("labels")  # (1, T)
    with torch.no_grad():
        logits = model(**batch).logits  # (1, T, V)
    logps = F.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V) predicts tokens 1..T-1
    targets = labels[0, 1:]  # (T-1,)
    keep = targets != -100
    return logps[keep].gather(-1, targets[keep, None]).squeeze(-1)


def hand_loss(world: dict[str, Any], loss: LossType) -> float:
    """The step-1 loss of ``loss`` over all pairs, from the definitions in ALGORITHMS.md."""
    from mmalign.data.pairs import PairCollator
    from mmalign.models.load import load_model

    policy, processor = load_model(world["root"] / "policy", for_training=False)
    reference, _ = load_model(world["root"] / "reference", for_training=False)
    pairs = world["pairs"]
    batch = PairCollator(processor, 128)(pairs)
    assert batch is not None
    losses = []
    for b, pair in enumerate(pairs):
        score: dict[tuple[str, str], float] = {}
        for who, model in (("pol", policy), ("ref", reference)):
            for side in ("chosen", "rejected"):
                lp = plain_logps(model, processor, pair, side).double()  # (n,)
                mask = getattr(batch, f"{side}_mask")[b]
                changed = getattr(batch, f"changed_{side}")[b][mask]  # (n,) flags of the same tokens
                assert changed.shape == lp.shape and 0 < int(changed.sum()) < len(lp)
                if loss is LossType.DDPO:  # RLHF-V: (Σ_U logp + γ Σ_C logp) / (|U| + γ|C|)
                    weight = torch.where(changed, GAMMA, 1.0).double()
                    score[who, side] = float((weight * lp).sum() / weight.sum())
                elif loss is LossType.SIMPO:
                    score[who, side] = float(lp.mean())
                else:
                    score[who, side] = float(lp.sum())
        h = (score["pol", "chosen"] - score["ref", "chosen"]) - (
            score["pol", "rejected"] - score["ref", "rejected"]
        )
        log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
        if loss is LossType.IPO:
            losses.append((h - 1 / (2 * BETA)) ** 2)
        elif loss is LossType.CDPO:
            losses.append(-(1 - EPS) * log_sigmoid(BETA * h) - EPS * log_sigmoid(-BETA * h))
        elif loss is LossType.SIMPO:
            losses.append(
                -log_sigmoid(BETA * (score["pol", "chosen"] - score["pol", "rejected"]) - SIMPO_GAMMA)
            )
        elif loss is LossType.MMDPO:
            beta = BETA * (1 + W * (1 - math.exp(-K * max(pair.margin, 0.0))))
            losses.append(-log_sigmoid(beta * h))
        else:  # DPO, DDPO
            losses.append(-log_sigmoid(BETA * h))
    return sum(losses) / len(losses)


def loss_settings(loss: LossType) -> dict[str, Any]:
    return {
        "loss": loss,
        "gamma": GAMMA,
        "label_smoothing": EPS if loss is LossType.CDPO else 0.0,
        "simpo_gamma": SIMPO_GAMMA,
        "mmdpo_w": W,
        "mmdpo_k": K,
    }


# ----------------------------------------------------------------------------------------------- recipe runs
@pytest.mark.parametrize("loss", list(LossType))
def test_step_one_loss_equals_the_hand_computed_loss_from_plain_logprobs(
    world: dict[str, Any], loss: LossType
) -> None:
    result = run_dpo(config(world, f"one-{loss}", **loss_settings(loss)))
    [record] = read_metrics(result.run_dir)
    assert record["step"] == 1 and result.steps == 1
    assert record["loss"] == pytest.approx(hand_loss(world, loss), rel=1e-5, abs=1e-6)
    assert math.isfinite(record["grad_norm"]) and record["grad_norm"] > 0
    assert (record["beta"] > BETA) if loss is LossType.MMDPO else ("beta" not in record)
    has_reference = (result.run_dir / "ref_cache").is_dir() and any((result.run_dir / "ref_cache").iterdir())
    assert has_reference == loss.needs_reference
    assert ("drift_chosen" in record) == loss.needs_reference
    assert (result.run_dir / "final" / "model.safetensors").is_file() and result.best_step is None


def test_ddpo_weights_changed_tokens_and_mmdpo_uses_per_pair_beta(world: dict[str, Any]) -> None:
    """On the same batch DDPO differs from DPO, and only through the changed tokens' weight γ (γ = 1 is
    length-normalised DPO); MM-DPO's β is per pair, from each pair's margin."""
    logged = {}
    runs = {
        "dpo": loss_settings(LossType.DPO),
        "ddpo": loss_settings(LossType.DDPO),
        "ddpo-gamma1": {**loss_settings(LossType.DDPO), "gamma": 1.0},
        "mmdpo": loss_settings(LossType.MMDPO),
    }
    for name, settings in runs.items():
        out = run_dpo(config(world, f"cmp-{name}", **settings), overwrite=True)
        logged[name] = read_metrics(out.run_dir)[0]
    assert abs(logged["ddpo"]["loss"] - logged["dpo"]["loss"]) > 1e-3
    assert abs(logged["ddpo"]["loss"] - logged["ddpo-gamma1"]["loss"]) > 1e-4
    assert abs(logged["ddpo"]["reward_margin"] - logged["ddpo-gamma1"]["reward_margin"]) > 1e-4
    # MM-DPO's logged β is the mean of β0 (1 + w (1 − e^{−k δ})) over the pairs' own margins
    betas = [BETA * (1 + W * (1 - math.exp(-K * p.margin))) for p in world["pairs"]]
    assert len(set(betas)) > 1
    assert logged["mmdpo"]["beta"] == pytest.approx(sum(betas) / len(betas))
    assert abs(logged["mmdpo"]["loss"] - logged["dpo"]["loss"]) > 1e-4


def test_a_few_dpo_steps_widen_the_chosen_minus_rejected_margin(world: dict[str, Any]) -> None:
    from mmalign.models.load import load_model

    result = run_dpo(config(world, "learn", max_steps=3, batch_size=3, ref_model=None))
    before, processor = load_model(world["root"] / "policy", for_training=False)
    after, _ = load_model(result.model_dir, for_training=False)

    def margin(model: Any) -> float:
        return sum(
            float(
                plain_logps(model, processor, p, "chosen").sum()
                - plain_logps(model, processor, p, "rejected").sum()
            )
            for p in world["pairs"]
        )

    assert margin(after) > margin(before) + 1.0
    records = read_metrics(result.run_dir)
    assert records[0]["accuracy"] == 0.0 and records[0]["reward_margin"] == 0.0  # policy == reference
    assert records[-1]["reward_margin"] > 0.0


def test_reference_logprobs_are_computed_once_and_read_from_the_cache_afterwards(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(world, "cache", max_steps=2, batch_size=3)
    first = run_dpo(cfg)
    from mmalign.models import refcache

    def no_reference_forward(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the reference model ran although its log-probs are cached")

    monkeypatch.setattr(refcache, "pair_token_logps", no_reference_forward)
    second = run_dpo(cfg, overwrite=True)
    assert [r["loss"] for r in read_metrics(second.run_dir)] == [
        r["loss"] for r in read_metrics(first.run_dir)
    ]


def weights(model_dir: Path, checkpoint: Path | None = None) -> dict[str, torch.Tensor]:
    """In-memory parameters of a saved model, optionally with a training checkpoint loaded into it."""
    from mmalign.models.load import load_model
    from mmalign.recipes.run import load_checkpoint

    model, _ = load_model(model_dir, for_training=False)
    if checkpoint is not None:
        load_checkpoint(checkpoint, model, restore_rng=False)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def scripted_validation(scores: list[float], calls: list[list[Any]]) -> Any:
    """An ``evaluate`` whose k-th validation has val_score ``scores[k]`` (captions only, greedy)."""

    def evaluate(model: Any, processor: Any, scenes: list[Any], **settings: Any) -> dict[str, Any]:
        calls.append(list(scenes))
        if "n_pope" not in settings:  # the final evaluation
            return {"chair_i": 0.0, "n_scenes": len(scenes)}
        score = scores[len(calls) - 1]
        return {
            "greedy.chair_i": score,
            "greedy.chair_s": 0.0,
            "greedy.coverage": 1.0,
            "greedy.well_formed": 1.0,
        }

    return evaluate


def test_best_checkpoint_is_the_final_model_and_training_stops_after_patience_evals(
    world: dict[str, Any],
) -> None:
    calls: list[list[Any]] = []
    cfg = config(
        world, "early", max_steps=10, batch_size=3, val_scenes=str(world["scenes"]), n_val=4, eval_every=1,
        patience=2, val_decoding=("greedy",), final_eval_scenes=2, save_every=1, keep_checkpoints=0,
    )  # fmt: skip
    result = run_dpo(cfg, evaluate=scripted_validation([0.5, 0.3, 0.4, 0.45, 0.1], calls))

    assert (result.best_step, result.steps, result.stopped_early) == (2, 4, True)
    assert result.best_dir == result.run_dir / "best"
    records = read_metrics(result.run_dir)
    assert [r["val/val_score"] for r in records] == pytest.approx([0.5, 0.3, 0.4, 0.45])
    assert records[-1]["stopped_early"] == 1.0 and [r["step"] for r in records] == [1, 2, 3, 4]
    assert result.final_metrics["val/val_score"] == pytest.approx(0.3)
    # the model users get is the step-2 model (not the last one): compare with the checkpoints' weights
    final = load_file(str(result.model_dir / "model.safetensors"))
    best = load_file(str(result.run_dir / "best" / "model.safetensors"))
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    final_params = weights(result.model_dir)
    step2, step4 = (weights(world["root"] / "policy", list_checkpoints(result.run_dir)[i]) for i in (1, 3))
    assert final_params.keys() == step2.keys()
    assert all(torch.equal(final_params[k], step2[k]) for k in step2)
    assert not all(torch.equal(final_params[k], step4[k]) for k in step4)
    # validation and final evaluation use disjoint held-out scenes; the final one is written to eval/
    val_scenes, final_scenes = calls[0], calls[-1]
    assert len(calls) == 5 and len(val_scenes) == 4 and len(final_scenes) == 2
    assert not {(s.seed, s.index) for s in val_scenes} & {(s.seed, s.index) for s in final_scenes}
    assert json.loads((result.run_dir / "eval" / "world.json").read_text())["n_scenes"] == 2
    assert result.final_metrics["eval/n_scenes"] == 2.0


def test_drift_warning_fires_when_the_chosen_logprob_falls_below_the_reference(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dpo_recipe.policy_logps

    def falling(model: Any, batch: Any, share_prefix: bool) -> Any:
        out = real(model, batch, share_prefix)
        per_token = 30.0 / out.chosen_mask.sum(dim=1, keepdim=True)  # (B, 1): 30 nats per response
        out.chosen = out.chosen - per_token * out.chosen_mask
        return out

    monkeypatch.setattr(dpo_recipe, "policy_logps", falling)
    with pytest.warns(UserWarning, match=r"step 1: chosen log-prob is 30\.0 nats below the reference"):
        result = run_dpo(config(world, "drift", ref_model=None, drift_warn_nats=20.0))
    assert read_metrics(result.run_dir)[0]["drift_chosen"] == pytest.approx(-30.0, abs=1e-4)
    assert read_metrics(result.run_dir)[0]["drift_rejected"] == pytest.approx(0.0, abs=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning under a looser threshold
        run_dpo(config(world, "drift", ref_model=None, drift_warn_nats=40.0), overwrite=True)


def test_resume_after_a_crash_equals_the_uninterrupted_run(world: dict[str, Any]) -> None:
    def evaluate(model: Any, processor: Any, scenes: list[Any], **settings: Any) -> dict[str, Any]:
        weight = float(next(model.parameters()).abs().sum())  # a function of the weights only
        return {
            "greedy.chair_i": weight % 1.0,
            "greedy.chair_s": 0.0,
            "greedy.coverage": 1.0,
            "greedy.well_formed": 1.0,
        }

    def cfg(name: str) -> DPOConfig:
        return config(
            world, name, max_steps=4, batch_size=2, grad_accum=2, save_every=2, keep_checkpoints=0,
            val_scenes=str(world["scenes"]), n_val=2, eval_every=1, val_decoding=("greedy",),
            loss=LossType.DDPO, sft_weight=0.2, optim=OptimConfig(lr=1e-3),
        )  # fmt: skip

    full = run_dpo(cfg("uninterrupted"), evaluate=evaluate)

    def crash(path: Path, step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dpo(cfg("crashed"), evaluate=evaluate, on_checkpoint=crash)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_dpo(cfg("crashed"), evaluate=evaluate)
    resumed = run_dpo(cfg("crashed"), resume=True, evaluate=evaluate)

    assert (resumed.steps, resumed.best_step) == (full.steps, full.best_step)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_time"} for r in rs]  # noqa: E731
    assert strip(read_metrics(resumed.run_dir)) == strip(read_metrics(full.run_dir))
    last_full, last_resumed = list_checkpoints(full.run_dir)[-1], list_checkpoints(resumed.run_dir)[-1]
    for a, b in ((full.model_dir, resumed.model_dir), (last_full, last_resumed)):
        want, got = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [p.name for p in list_checkpoints(resumed.run_dir)] == ["step_00000002", "step_00000004"]


def test_pairs_file_errors_name_the_file_line_and_field(world: dict[str, Any], tmp_path: Path) -> None:
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import Message, Sample

    no_margin = [p.model_copy(update={"margin": None}) if i == 1 else p for i, p in enumerate(world["pairs"])]
    write_jsonl(tmp_path / "pairs.jsonl", no_margin)
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: margin: pair 'p1' has no margin"):
        run_dpo(config(world, "bad", data=str(tmp_path / "pairs.jsonl"), loss=LossType.MMDPO))
    write_jsonl(
        tmp_path / "samples.jsonl",
        [Sample(id="s", conversation=[Message.user("hi"), Message.assistant("a")])],
    )
    with pytest.raises(DataError, match=r"samples\.jsonl:1: DPO trains on pair records, found a 'sample'"):
        run_dpo(config(world, "bad2", data=str(tmp_path / "samples.jsonl")))
    with pytest.raises(ConfigError, match="val_scenes: required"):
        run_dpo(config(world, "bad3", eval_every=2))


def test_gradient_accumulation_matches_a_bigger_batch_including_the_sft_term(world: dict[str, Any]) -> None:
    settings = {**loss_settings(LossType.DDPO), "sft_weight": 0.3}
    one = run_dpo(config(world, "bs4", batch_size=4, max_steps=1, **settings))
    two = run_dpo(config(world, "bs2x2", batch_size=2, grad_accum=2, max_steps=1, **settings))
    [a], [b] = read_metrics(one.run_dir), read_metrics(two.run_dir)
    for key in ("loss", "sft_nll", "reward_margin", "accuracy", "grad_norm", "drift_chosen"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert a["pairs"] == b["pairs"] == 4
    assert a["loss"] == pytest.approx(a["preference_loss"] + 0.3 * a["sft_nll"])  # the optimised objective
    wa, wb = weights(one.model_dir), weights(two.model_dir)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_lora_run_saves_merged_best_and_final_models_and_keeps_training_the_adapter(
    world: dict[str, Any],
) -> None:
    from mmalign.models.load import LoraSpec

    calls: list[list[Any]] = []
    cfg = config(
        world, "lora", max_steps=3, batch_size=3, lora=LoraSpec(r=4, alpha=8),
        val_scenes=str(world["scenes"]), n_val=2, eval_every=1, val_decoding=("greedy",), save_every=1,
        keep_checkpoints=0,
    )  # fmt: skip
    result = run_dpo(cfg, evaluate=scripted_validation([0.5, 0.2, 0.3], calls))
    assert (result.best_step, result.steps, result.stopped_early) == (2, 3, False)
    adapter = load_file(str(list_checkpoints(result.run_dir)[0] / "model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    base = load_file(str(world["root"] / "policy" / "model.safetensors"))
    final = load_file(str(result.model_dir / "model.safetensors"))
    assert final.keys() == base.keys()  # plain (merged) weights
    changed = [k for k in base if not torch.equal(base[k], final[k])]
    assert changed and all(k.startswith("language_model.model.layers.") for k in changed)
    # the adapter went on training after the best model was saved (merging happened on a copy)
    step2, step3 = (load_file(str(p / "model.safetensors")) for p in list_checkpoints(result.run_dir)[1:])
    assert step2.keys() == step3.keys() == adapter.keys()
    assert not all(torch.equal(step2[k], step3[k]) for k in step2)


def test_real_validation_logs_greedy_and_sampled_caption_metrics_and_writes_the_final_eval(
    world: dict[str, Any],
) -> None:
    cfg = config(
        world, "real-eval", val_scenes=str(world["scenes"]), n_val=2, eval_every=1, val_seeds=(0, 1),
        val_max_new_tokens=16, final_eval_scenes=1,
    )  # fmt: skip
    result = run_dpo(cfg)
    [record] = read_metrics(result.run_dir)
    for mode in ("greedy", "sampled"):
        assert {f"val/{mode}.{k}" for k in ("chair_i", "chair_s", "coverage", "well_formed")} <= record.keys()
    expected = sum(
        record[f"val/{m}.chair_i"] + (1 - record[f"val/{m}.coverage"]) + (1 - record[f"val/{m}.well_formed"])
        for m in ("greedy", "sampled")
    )
    assert record["val/val_score"] == pytest.approx(expected / 2)  # the score is linear in the seed means
    assert result.best_step == 1 and (result.run_dir / "best" / "config.json").is_file()
    saved = json.loads((result.run_dir / "eval" / "world.json").read_text())
    assert saved["n_scenes"] == 1 and {"pope_adversarial_f1", "qa_acc", "deceptive_acc"} <= saved.keys()
    assert result.final_metrics["eval/n_scenes"] == 1.0


def test_when_no_step_beats_the_initial_policy_the_final_model_is_the_initial_one(
    world: dict[str, Any],
) -> None:
    calls: list[list[Any]] = []
    cfg = config(
        world, "baseline-best", max_steps=10, batch_size=3, val_scenes=str(world["scenes"]), n_val=2,
        eval_every=1, eval_at_start=True, patience=2, val_decoding=("greedy",),
    )  # fmt: skip
    result = run_dpo(cfg, evaluate=scripted_validation([0.1, 0.5, 0.6, 0.0], calls))
    assert (result.best_step, result.steps, result.stopped_early) == (0, 2, True)
    assert [(r["step"], r["val/val_score"]) for r in read_metrics(result.run_dir)] == [
        (0, 0.1),
        (1, 0.5),
        (2, 0.6),
    ]
    initial, final = weights(world["root"] / "policy"), weights(result.model_dir)
    assert all(torch.equal(initial[k], final[k]) for k in initial)
