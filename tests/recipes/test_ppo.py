"""PPO recipe: the shipped config parses, prompts cycle through the pool, the best validated iteration
becomes final/ and patience stops the run, both guardrails warn, a real oracle run on world scenes logs
every key with a finite KL, and the mean reward of a learnable reward rises."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _online_kit import same_weights, sft_captioner, tiny_llava
from safetensors.torch import load_file

from mmalign.config import dump_config, load_config
from mmalign.errors import ConfigError
from mmalign.models.load import LoraSpec
from mmalign.recipes.online import Prompt
from mmalign.recipes.ppo import PPOConfig, load_critic, load_ppo_config, prompt_batch, run_ppo
from mmalign.recipes.run import OptimConfig, list_checkpoints, read_metrics
from mmalign.recipes.sft import CONFIG_DIR
from mmalign.rollout.rewards import OracleReward, RewardBatch, RewardOutput

ONE_THREAD = True  # see tests/conftest.py

TRAIN_KEYS = (
    "reward/shaped", "reward/raw", "reward/raw_std", "reward/correctness", "reward/length_penalty",
    "reward/no_eos_frac", "kl", "kl_penalty", "kl_coef", "kl_coef_next", "policy/loss", "policy/pg_loss",
    "policy/clip_frac", "policy/approx_kl", "policy/ratio_mean", "policy/entropy", "policy/grad_norm",
    "value/loss", "value/clip_frac", "value/value_mean", "value/return_mean", "value/value_error",
    "value/grad_norm", "advantages/mean", "advantages/std", "returns/mean", "response_length", "has_eos",
    "rows", "dropped", "guard/kl_warned",
)  # fmt: skip
VAL_KEYS = ("val/greedy.chair_i", "val/greedy.coverage", "val/sampled.well_formed", "val/val_score",
            "val/best", "val/best_iteration", "guard/warned")  # fmt: skip


# ----------------------------------------------------------------------------------------------- pure parts
def test_shipped_config_parses_round_trips_and_rejects_bad_values(tmp_path: Path) -> None:
    cfg = load_ppo_config(CONFIG_DIR / "ppo.yaml", ["kl_control=fixed", "actor_optim.lr=3e-6", "k=3"])
    assert (cfg.kl_control, cfg.actor_optim.lr, cfg.k, cfg.kl_kind, cfg.no_eos_penalty) == (
        "fixed", 3e-6, 3, "k1", -8.0
    )  # fmt: skip
    assert load_config(PPOConfig, dump_config(cfg, tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError, match="gamma and lam must be in"):
        load_ppo_config(CONFIG_DIR / "ppo.yaml", ["lam=1.5"])
    with pytest.raises(ConfigError, match="kl_kind: expected one of"):
        load_ppo_config(CONFIG_DIR / "ppo.yaml", ["kl_kind=k9"])
    with pytest.raises(ValueError, match="adaptive KL control needs kl_coef > 0"):
        PPOConfig(kl_coef=0.0)


def test_prompt_batches_walk_a_seeded_shuffle_of_the_pool_and_reshuffle_every_pass() -> None:
    pool = [Prompt(str(i), [], [], [], {}) for i in range(5)]
    ids = [[p.id for p in prompt_batch(pool, 2, it, seed=0)] for it in range(1, 6)]
    flat = [i for batch in ids for i in batch]
    assert sorted(flat[:5]) == sorted(flat[5:10]) == ["0", "1", "2", "3", "4"]  # each pass covers the pool
    assert ids == [[p.id for p in prompt_batch(pool, 2, it, seed=0)] for it in range(1, 6)]
    assert ids != [[p.id for p in prompt_batch(pool, 2, it, seed=1)] for it in range(1, 6)]
    assert prompt_batch(pool, 0, 3, 0) == pool == prompt_batch(pool, 9, 3, 0)


def test_a_reward_model_folder_initialises_the_value_head_of_the_critic(tmp_path: Path) -> None:
    from mmalign.models.heads import RewardModel
    from mmalign.models.tiny import build_tiny

    model, tok = build_tiny("llama", text_hidden=64, text_layers=2)
    rm = RewardModel(model, kind="fact")
    torch.nn.init.constant_(rm.head.bias, 0.7)
    rm.save(tmp_path / "rm", tok)
    critic = load_critic(str(tmp_path / "rm"))
    assert torch.equal(critic.head.weight, rm.head.weight) and critic.head.bias.item() == pytest.approx(0.7)
    plain = load_critic("tiny:llama")  # a plain model: a fresh, zero-bias head
    assert plain.head.bias.item() == 0.0


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def text_lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny text LM and a JSONL of four questions as prompts."""
    from mmalign.data.io import write_jsonl
    from mmalign.data.schema import Message, Sample
    from mmalign.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("ppo-lm")
    build_tiny("llama", root / "lm", text_hidden=64, text_layers=2)
    questions = ["Say a colour.", "Name a shape.", "What is there?", "How many?"]
    write_jsonl(root / "prompts.jsonl", [
        Sample(id=f"q{i}", conversation=[Message.user(q), Message.assistant("red")])
        for i, q in enumerate(questions)
    ])  # fmt: skip
    return root / "lm", root / "prompts.jsonl"


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LLaVA after 50 SFT steps on 16 true captions (as in the RSF tests): caption-like samples."""
    return sft_captioner(tiny_llava(tmp_path_factory.mktemp("ppo-vlm") / "policy"))


class TargetWords:
    """Reward = number of colour/shape words in the response."""

    name = "target-words"

    def __init__(self) -> None:
        from mmalign.world.scene import COLORS_ALL, SHAPES_ALL

        self.targets = set(COLORS_ALL) | set(SHAPES_ALL)

    def score(self, batch: RewardBatch) -> RewardOutput:
        counts = [sum(w.strip(".,").lower() in self.targets for w in r.split()) for r in batch.responses]
        return RewardOutput(scores=torch.tensor(counts, dtype=torch.float32))


def scripted_validation(scores: list[float], coverage: list[float], calls: list[int]) -> Any:
    """An ``evaluate`` whose k-th call has val_score ``scores[k]`` and coverage ``coverage[k]``."""

    def evaluate(model: Any, processor: Any, scenes: list[Any], **settings: Any) -> dict[str, Any]:
        k = len(calls)
        calls.append(len(scenes))
        values = {"chair_i": scores[k] - (1 - coverage[k]), "chair_s": 0.0, "coverage": coverage[k],
                  "well_formed": 1.0}  # fmt: skip
        return {f"{mode}.{key}": v for mode in ("greedy", "sampled") for key, v in values.items()}

    return evaluate


def lm_config(lm: Path, prompts: Path, out: Path, **overrides: Any) -> PPOConfig:
    settings: dict[str, Any] = dict(
        model=str(lm), out_dir=str(out), prompts=str(prompts), n_prompts=0, k=8, max_new_tokens=6,
        ppo_epochs=2, mini_batch_size=16, kl_control="fixed", kl_coef=0.01, no_eos_penalty=None,
        correctness_bonus=0.0, n_val=0, progress_bar=False,
        actor_optim=OptimConfig(lr=1e-2, warmup_ratio=0.0, min_lr_ratio=1.0),
        critic_optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, min_lr_ratio=1.0),
    )  # fmt: skip
    return PPOConfig(**{**settings, **overrides})


# ----------------------------------------------------------------------------------------------- runs
def test_final_is_the_best_validated_iteration_patience_stops_the_run_and_both_guardrails_warn(
    text_lm: tuple[Path, Path], tmp_path: Path
) -> None:
    calls: list[int] = []
    evaluate = scripted_validation([0.5, 0.3, 0.6, 0.7], [0.9, 0.9, 0.9, 0.6], calls)
    cfg = lm_config(*text_lm, tmp_path / "run", iterations=6, n_val=2, patience=2, kl_warn=1e-3,
                    critic_shared=True, rollout_batch=2)  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        result = run_ppo(cfg, evaluate=evaluate, reward=TargetWords())
    messages = [str(w.message) for w in caught]
    assert any("mean KL to the reference is" in m and "threshold 0.001" in m for m in messages)
    assert any("iteration 3: val/greedy.coverage fell from 0.900 to 0.600" in m for m in messages)
    assert any("iteration 3: 2 validations without improvement; stopping" in m for m in messages)

    run = result.run_dir
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # 4: the final policy's samples
    assert calls == [2, 2, 2, 2] and result.iterations == 3 and result.stopped_early
    assert [r["val/val_score"] for r in rows[:4]] == pytest.approx([0.5, 0.3, 0.6, 0.7])
    assert [r["val/best_iteration"] for r in rows[:4]] == [0, 1, 1, 1] and result.best_iteration == 1
    assert [r["guard/warned"] for r in rows[:4]] == [0, 0, 0, 1] and rows[3]["stopped_early"] == 1.0
    assert max(r["guard/kl_warned"] for r in rows[1:4]) == 1.0
    assert all(k in rows[i] for i in (1, 2, 3) for k in (*TRAIN_KEYS, *VAL_KEYS))
    assert rows[1]["rows"] == 16  # rollout_batch 2 prompts x k 8
    # final/ = best/ = the policy after iteration 1, not the initial nor the last one
    assert same_weights(result.model_dir, run / "best") and not same_weights(result.model_dir, text_lm[0])
    # the last iteration is checkpointed: policy, and the shared critic's head with its optimiser
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003"]
    critic = list_checkpoints(run / "checkpoints" / "critic")[0]
    assert set(load_file(str(critic / "model.safetensors"))) == {"weight", "bias"}
    lines = (run / "iter_02" / "rollouts.jsonl").read_text().splitlines()
    assert len(lines) == 16 and {"prompt", "response", "reward", "raw", "length", "has_eos"} <= set(
        json.loads(lines[0])
    )


def test_a_real_oracle_run_on_world_scenes_logs_every_key_and_keeps_the_kl_finite(
    captioner: Path, tmp_path: Path
) -> None:
    class Recording(OracleReward):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[RewardBatch] = []

        def score(self, batch: RewardBatch) -> RewardOutput:
            self.batches.append(batch)
            return super().score(batch)

    reward = Recording()
    cfg = PPOConfig(
        model=str(captioner), out_dir=str(tmp_path / "run"), n_prompts=6, k=2, max_new_tokens=24,
        iterations=2, ppo_epochs=1, mini_batch_size=6, length_penalty=0.5, correctness_bonus=1.0,
        kl_horizon=12, kl_target=1.0, n_val=2, val_max_new_tokens=24, progress_bar=False, lora=LoraSpec(r=4),
        actor_optim=OptimConfig(lr=1e-4, warmup_ratio=0.0),
        critic_optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a barely trained policy may trip the guardrail
        result = run_ppo(cfg, reward=reward)
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:3]:
        assert all(key in row for key in (*TRAIN_KEYS, *VAL_KEYS, "reward/correctness", "reward/coverage"))
        assert (
            math.isfinite(row["kl"])
            and math.isfinite(row["policy/loss"])
            and math.isfinite(row["value/loss"])
        )
        assert 0.0 <= row["reward/raw"] <= 4.0 and row["rows"] + row["dropped"] == 12
    assert rows[1]["kl_coef"] == 0.05 and rows[2]["kl_coef"] != 0.05  # the adaptive β moved
    assert result.best_iteration in (0, 1, 2) and (result.model_dir / "model.safetensors").is_file()
    assert not (result.model_dir / "adapter_config.json").exists()  # the LoRA adapter is merged
    # world prompts carry their scene and its oracle facts (what a fact RM reads)
    truth = reward.batches[0].truths[0]
    assert "scene" in truth and truth["facts"][-1].startswith("The objects are")
    assert all(len(ims) == 1 for ims in reward.batches[0].images)


def test_ppo_raises_the_mean_reward_of_a_reward_the_policy_can_learn(
    text_lm: tuple[Path, Path], tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the KL guardrail fires: lr 1e-2 drifts fast, on purpose
        result = run_ppo(lm_config(*text_lm, tmp_path / "run", iterations=12), reward=TargetWords())
    rewards = result.series("reward/raw")  # policies 0 … 12 (the last row: the final policy's samples)
    assert len(rewards) == 13
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.5 and rewards[-1] > 5 * max(rewards[0], 0.1)
    assert all(math.isfinite(k) for k in result.series("kl")) and result.best_iteration is None
