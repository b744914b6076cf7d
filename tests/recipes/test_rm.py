"""The reward-model recipe (bt, fact, critique, aspects) on tiny LLaVA and the RM evaluation metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mmalign.data.io import write_jsonl
from mmalign.data.schema import Message, Ranking
from mmalign.errors import ConfigError, DataError, ModelLoadError
from mmalign.eval.rm_eval import calibration, critique_names_error, pair_accuracy, spearman
from mmalign.models.heads import load_reward_model
from mmalign.recipes.pairs import variant_pairs
from mmalign.recipes.rm import RMConfig, _Best, expand_ranking, run_rm
from mmalign.recipes.run import read_metrics
from mmalign.world.corpus import eval_scenes, train_scenes
from mmalign.world.scene import WorldConfig


def test_pair_accuracy_and_acc_plus_group_pairs_by_prompt() -> None:
    got = pair_accuracy([2.0, 1.0, 0.5, 3.0], [1.0, 2.0, 0.0, 1.0], ["a", "a", "b", "b"])
    assert got == {"accuracy": 0.75, "acc_plus": 0.5, "n_pairs": 4.0, "n_groups": 2.0}


def test_spearman_uses_tie_averaged_ranks() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3, 4 → ρ = 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_calibration_of_a_constant_predictor_is_perfect_and_a_confident_wrong_one_is_not() -> None:
    bins, ece = calibration([0.0, 0.0], [0.0, 0.0], n_bins=4)
    assert ece == pytest.approx(0.0) and bins == [
        {"lo": 0.5, "hi": 0.75, "n": 4.0, "confidence": 0.5, "accuracy": 0.5}
    ]
    # one pair with σ(Δ) = 0.9 right, one with 0.9 wrong: points (0.9,1) (0.9,0) (0.1,0) (0.1,1)
    delta = math.log(9)
    bins, ece = calibration([delta, 0.0], [0.0, delta], n_bins=2)
    assert ece == pytest.approx(0.4)  # |0.5 − 0.9| · 1/2 + |0.5 − 0.1| · 1/2


def test_critique_names_error_matches_shape_words_and_plurals() -> None:
    assert critique_names_error("The response mentions a green star, which is not in the image.", {"star"})
    assert critique_names_error("There are two circles.", {"circle"})
    assert not critique_names_error("The response is correct.", {"star"})


def test_expand_ranking_gives_every_better_worse_pair_and_skips_ties() -> None:
    ranking = Ranking(
        id="r",
        prompt=[Message.user("Describe.")],
        responses=["a", "b", "c"],
        scores=[{"reward": 3.0}, {"reward": 1.0}, {"reward": 1.0}],
    )
    pairs = expand_ranking(ranking)
    assert [(p.chosen, p.rejected, p.margin) for p in pairs] == [("a", "b", 2.0), ("a", "c", 2.0)]
    assert {p.meta["group"] for p in pairs} == {"r"}
    with pytest.raises(DataError, match=r"r\.scores\.0"):
        expand_ranking(ranking, "coverage")


CFG = WorldConfig(image_size=32)


@pytest.fixture(scope="module")
def rm_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("rm_data")
    train = variant_pairs(train_scenes(6, seed=3, config=CFG), config=CFG)
    val = variant_pairs(eval_scenes(2, seed=3, config=CFG), config=CFG)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    return out / "train.jsonl", out / "val.jsonl"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mmalign.models.tiny import build_tiny

    out = tmp_path_factory.mktemp("backbone") / "llava"
    build_tiny("llava", out, image_size=32, patch_size=8, text_hidden=64, text_layers=2, vision_hidden=32)
    return str(out)


def short_run(backbone: str, train: Path, out_dir: Path, *, lr: float = 1e-2, **fields: Any) -> RMConfig:
    """A few-step RM run on the tiny backbone (no progress bar) with ``fields`` overriding the config."""
    cfg = RMConfig(model=backbone, data=str(train), out_dir=str(out_dir), progress_bar=False, **fields)
    cfg.optim.lr = lr
    return cfg


@pytest.mark.parametrize("kind", ["bt", "fact", "critique", "aspects"])
def test_run_rm_trains_each_kind_saves_a_loadable_rm_and_evaluates(
    kind: str, rm_data: tuple[Path, Path], backbone: str, tmp_path: Path
) -> None:
    train, val = rm_data
    cfg = short_run(
        backbone,
        train,
        tmp_path / kind,
        lr=1e-3,
        val_data=str(val),
        kind=kind,
        batch_size=8,
        max_steps=6,
        n_val=6,
    )
    result = run_rm(cfg)
    assert result.steps == 6
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns something on its own training pairs
    rm, _ = load_reward_model(result.model_dir)
    assert rm.kind == kind
    head_meta = json.loads((result.model_dir / "reward_head.json").read_text())
    assert head_meta.get("facts_placement") == ("system" if kind == "fact" else None)
    assert rm.facts_placement == "system"
    evaluation = json.loads((result.run_dir / "eval" / "rm.json").read_text())
    metrics = evaluation["metrics"]
    assert {"accuracy", "acc_plus", "ece", "n_pairs"} <= set(metrics) and metrics["n_pairs"] == 6
    if kind == "aspects":
        assert rm.dim == 5 and "correctness.spearman" in metrics and "mse.correctness" in rows[-1]
    if kind == "critique":
        assert "nll" in rows[0] and rows[-1]["nll"] < rows[0]["nll"]
        assert all("rejected_critique" in r for r in evaluation["records"])


def test_freeze_keeps_the_matching_backbone_parameters_and_trains_the_rest(
    rm_data: tuple[Path, Path], backbone: str, tmp_path: Path
) -> None:
    from mmalign.models.load import load_model

    train, _ = rm_data
    cfg = short_run(
        backbone, train, tmp_path / "frozen", freeze=("vision_tower", "multi_modal_projector"), max_steps=3
    )
    result = run_rm(cfg)
    before = dict(load_model(backbone, dtype="fp32")[0].named_parameters())
    after = dict(load_reward_model(result.model_dir)[0].backbone.named_parameters())
    vision = [n for n in before if "vision_tower" in n or "multi_modal_projector" in n]
    text = [n for n in before if "language_model.layers" in n]
    assert vision and text
    assert all(torch.equal(before[n], after[n]) for n in vision)
    assert sum(not torch.equal(before[n], after[n]) for n in text) == len(text)


def test_freeze_names_a_pattern_that_matches_nothing(
    rm_data: tuple[Path, Path], backbone: str, tmp_path: Path
) -> None:
    cfg = RMConfig(
        model=backbone, data=str(rm_data[0]), out_dir=str(tmp_path / "x"), freeze=("no_such_module",)
    )
    with pytest.raises(ConfigError, match="no_such_module"):
        run_rm(cfg)


def test_best_keeps_the_weights_of_the_first_highest_evaluation() -> None:
    net = torch.nn.Linear(2, 1)
    best = _Best("accuracy")
    weights = {}
    for step, acc in enumerate([0.5, 0.7, 0.7, 0.6], start=1):
        with torch.no_grad():
            net.weight.fill_(float(step))
        weights[step] = net.weight.detach().clone()
        best.update(net, step, {"accuracy": acc})
    assert best.step == 2 and best.value == 0.7
    assert torch.equal(best.state["weight"], weights[2])
    with pytest.raises(ConfigError, match="no metric 'acc'"):
        _Best("acc").update(net, 5, {"accuracy": 1.0})
    off = _Best("")
    off.update(net, 1, {})
    assert off.step == 0 and not off.state


def test_select_best_needs_a_selection_split() -> None:
    with pytest.raises(ValueError, match="select_best needs val_data"):
        RMConfig(model="m", data="d", select_best="accuracy", eval_every=0, val_data="v")


def test_run_rm_select_best_saves_the_best_evaluated_weights(
    rm_data: tuple[Path, Path], backbone: str, tmp_path: Path
) -> None:
    train, val = rm_data
    cfg = short_run(
        backbone,
        train,
        tmp_path / "best",
        val_data=str(val),
        max_steps=4,
        eval_every=1,
        select_best="mean_margin",
    )
    result = run_rm(cfg)
    logged = {
        r["step"]: r["val/mean_margin"]
        for r in read_metrics(result.run_dir / "metrics.jsonl")
        if "val/mean_margin" in r
    }
    best_step = int(result.final_metrics["best_step"])
    assert set(logged) == {1, 2, 3, 4} and 1 <= best_step <= 4
    final = result.final_metrics["eval/mean_margin"]
    assert final == logged[4]  # the last row holds the evaluation of the saved weights
    assert final >= max(v for s, v in logged.items() if s < 4) - 1e-6
    if best_step < 4:
        assert final == pytest.approx(logged[best_step], abs=1e-6)


def test_pair_objective_soft_margin_uses_the_pairs_margins_as_graded_labels() -> None:
    from types import SimpleNamespace

    from mmalign.losses.reward import bradley_terry_loss
    from mmalign.recipes.rm import pair_objective

    class Stub:
        def pair_rewards(self, batch: object, share_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tensor([[1.0], [0.0]]), torch.tensor([[0.5], [0.3]])

    batch = SimpleNamespace(margins=[0.5, None])
    cfg = RMConfig(model="m", data="d", soft_margin=2.0)
    loss, _ = pair_objective(cfg)(Stub(), batch)  # type: ignore[arg-type]
    want, _ = bradley_terry_loss(
        torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.3]), margin=torch.tensor([0.5, 0.0]), soft_scale=2.0
    )
    hard, _ = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.3]))
    assert loss.item() == pytest.approx(want.item()) and loss.item() != pytest.approx(hard.item())
    with pytest.raises(ValueError, match="exclude each other"):
        RMConfig(model="m", data="d", soft_margin=2.0, use_margin=True)


def test_a_fact_rm_saved_before_placements_were_recorded_loads_with_user_placement(
    backbone: str, tmp_path: Path
) -> None:
    """Older fact RMs read their facts in the user turn; their reward_head.json has no placement key."""
    from mmalign.models.heads import RewardModel
    from mmalign.models.load import load_model

    model, processor = load_model(backbone, dtype="fp32")
    rm = RewardModel(model, kind="fact", facts_placement="user")
    out = rm.save(tmp_path / "old_fact_rm", processor)
    meta = json.loads((out / "reward_head.json").read_text())
    assert meta.pop("facts_placement") == "user"
    (out / "reward_head.json").write_text(json.dumps(meta))
    assert load_reward_model(out)[0].facts_placement == "user"
    (out / "reward_head.json").write_text(json.dumps({**meta, "facts_placement": "prompt"}))
    with pytest.raises(ModelLoadError, match=r"reward_head\.json: facts_placement must be one of"):
        load_reward_model(out)


def test_facts_placement_is_validated() -> None:
    with pytest.raises(ValueError, match="facts_placement must be one of"):
        RMConfig(kind="fact", facts_placement="prompt")  # type: ignore[arg-type]
