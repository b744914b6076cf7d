"""The six PPO roles: advantages equal hand-computed GAE of the KL-penalised token rewards, reference
log-probs equal the plain forward, the critic reads the value before each action, the LLaVA-RLHF shaping
adds exactly its terms, training moves the policy only along the advantages, and the runner adapts β."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import statistics
from typing import Any

import pytest
import torch

from mmalign.data.schema import Message
from mmalign.errors import DataError
from mmalign.eval.runner import caption_messages
from mmalign.losses.ppo import AdaptiveKLController, FixedKLController
from mmalign.models.heads import ValueModel
from mmalign.models.load import image_token_id
from mmalign.models.logprobs import sequence_token_logps
from mmalign.models.tiny import build_tiny
from mmalign.rollout import roles
from mmalign.rollout.experience import Experience
from mmalign.rollout.rewards import RewardBatch, RewardOutput
from mmalign.rollout.roles import (
    LocalRunner,
    PPOSettings,
    RewardShaping,
    SampleSettings,
    actor_generate,
    actor_train,
    compute_advantages,
    correctness,
    critic_infer,
    critic_train,
    ref_infer,
    reward_infer,
)
from mmalign.world.corpus import train_scenes
from mmalign.world.grammar import caption
from mmalign.world.render import render

ONE_THREAD = True  # see tests/conftest.py

TINY = dict(image_size=32, patch_size=8, text_hidden=64, text_layers=2, vision_hidden=32)


@pytest.fixture(scope="module")
def llava() -> tuple[Any, Any]:
    return build_tiny("llava", **TINY)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def prompts() -> tuple[list[list[Message]], list[list[Any]]]:
    """Two caption prompts with an image, one text-only question."""
    scenes = train_scenes(2, 0)
    messages = [caption_messages(), caption_messages(), [Message.user("Is there a star?")]]
    return messages, [[render(scenes[0])], [render(scenes[1])], []]


@pytest.fixture(scope="module")
def sampled(llava: tuple[Any, Any], prompts: Any) -> tuple[Experience, list[str]]:
    (model, processor), (messages, images) = llava, prompts
    return actor_generate(model, processor, messages, images, SampleSettings(k=2, max_new_tokens=8, seed=3))


def model_kwargs(exp: Experience) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    inputs = exp.model_inputs()
    return inputs.pop("input_ids"), inputs.pop("attention_mask"), inputs


def hand_made(**fields: Any) -> Experience:
    """B = 2 rows, R = 3 response columns; row 1 has two response tokens."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    base = dict(
        sequences=torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 0]]),
        attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        prompt_lengths=torch.tensor([2, 2]),
        action_mask=mask,
        response_length=torch.tensor([3, 2]),
        has_eos=torch.tensor([True, True]),
        prompt_index=torch.tensor([0, 1]),
        old_logps=torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, 0.0]]),
        ref_logps=torch.tensor([[-1.2, -1.5, -1.0], [-0.4, -0.9, 0.0]]),
        values=torch.tensor([[0.5, 0.4, 0.3], [0.1, -0.2, 9.9]]),  # 9.9 is off the mask: never used
        scores=torch.tensor([2.0, -1.0]),
    )
    return Experience(**{**base, **fields})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- advantages
def test_compute_advantages_is_the_hand_computed_gae_of_the_clamped_kl_penalised_rewards() -> None:
    settings = PPOSettings(gamma=0.9, lam=0.8, kl_clamp=0.5, whiten_advantages=False)
    out = compute_advantages(hand_made(), 0.1, settings)
    # k1 log-ratios 0.2, 1.0, -1.0 | 0.2, -2.1 clamped to ±0.5; r_t = −0.1·kl_t, + score on the last token
    rewards = [[-0.02, -0.05, 0.05 + 2.0], [-0.02, 0.05 - 1.0]]
    # δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1} (γλ = 0.72), backwards from the last token
    a02 = 2.05 - 0.3
    a01 = -0.05 + 0.9 * 0.3 - 0.4 + 0.72 * a02
    a00 = -0.02 + 0.9 * 0.4 - 0.5 + 0.72 * a01
    a11 = -0.95 + 0.2
    a10 = -0.02 + 0.9 * -0.2 - 0.1 + 0.72 * a11
    advantages = [[a00, a01, a02], [a10, a11, 0.0]]
    returns = [[a00 + 0.5, a01 + 0.4, a02 + 0.3], [a10 + 0.1, a11 - 0.2, 0.0]]
    assert out.rewards is not None and out.advantages is not None and out.returns is not None
    torch.testing.assert_close(out.rewards, torch.tensor([[*rewards[0]], [*rewards[1], 0.0]]))
    torch.testing.assert_close(out.advantages, torch.tensor(advantages))
    torch.testing.assert_close(out.returns, torch.tensor(returns))
    torch.testing.assert_close(out.info["kl"], torch.tensor([0.2, -1.9]))  # unclamped Σ log-ratio
    torch.testing.assert_close(out.info["kl_penalty"], torch.tensor([0.2, -0.3]))  # clamped
    torch.testing.assert_close(out.info["adv_mean"], torch.tensor([(a00 + a01 + a02) / 3, (a10 + a11) / 2]))

    # advantage whitening: (A − mean) / sqrt(unbiased var + 1e-8) over the 5 valid tokens
    valid = [a00, a01, a02, a10, a11]
    mu, sd = statistics.mean(valid), (statistics.variance(valid) + 1e-8) ** 0.5
    whitened = compute_advantages(hand_made(), 0.1, dataclasses.replace(settings, whiten_advantages=True))
    assert whitened.advantages is not None
    torch.testing.assert_close(
        whitened.advantages,
        torch.tensor([[(a - mu) / sd for a in advantages[0]], [(a10 - mu) / sd, (a11 - mu) / sd, 0.0]]),
    )
    # reward whitening keeps the mean, rescales to unit variance, before GAE
    flat = [*rewards[0], *rewards[1]]
    rmu, rsd = statistics.mean(flat), (statistics.variance(flat) + 1e-8) ** 0.5
    scaled = compute_advantages(hand_made(), 0.1, dataclasses.replace(settings, whiten_rewards=True))
    assert scaled.rewards is not None
    expected = [
        [(r - rmu) / rsd + rmu for r in rewards[0]],
        [(r - rmu) / rsd + rmu for r in rewards[1]] + [0.0],
    ]
    torch.testing.assert_close(scaled.rewards, torch.tensor(expected))


def test_compute_advantages_names_a_missing_input() -> None:
    with pytest.raises(DataError, match="ref_logps: compute_advantages needs it"):
        compute_advantages(hand_made(ref_logps=None), 0.1, PPOSettings())


# ----------------------------------------------------------------------------------------------- inference
def test_ref_infer_equals_sequence_token_logps_over_the_full_sequences(
    llava: tuple[Any, Any], sampled: tuple[Experience, list[str]]
) -> None:
    model, _ = llava
    exp, texts = sampled
    assert exp.batch_size == 6 == len(texts) and exp.old_logps is not None
    ids, attn, inputs = model_kwargs(exp)
    with torch.no_grad():
        plain = sequence_token_logps(model, ids, attn, exp.sequence_action_mask(), **inputs)  # (B, T)
    expected = exp.gather_response(plain)  # (B, R)
    torch.testing.assert_close(ref_infer(model, exp), expected)
    torch.testing.assert_close(ref_infer(model, exp, batch_size=4), expected, atol=1e-5, rtol=1e-5)
    # the sampler's log-probs are the policy's own: PPO's first ratio is 1
    torch.testing.assert_close(exp.old_logps, expected, atol=1e-4, rtol=1e-4)


def test_critic_infer_reads_the_value_of_the_state_before_each_response_token(
    llava: tuple[Any, Any], sampled: tuple[Experience, list[str]]
) -> None:
    critic = ValueModel(copy.deepcopy(llava[0]))
    exp, _ = sampled
    values = critic_infer(critic, exp, batch_size=4)
    assert values.shape == exp.action_mask.shape
    assert bool((values[~exp.action_mask] == 0).all())
    ids, attn, inputs = model_kwargs(exp)
    with torch.no_grad():
        full = critic(ids, attn, **inputs)  # (B, T)
    for b in range(exp.batch_size):
        p, n = int(exp.prompt_lengths[b]), int(exp.response_length[b])
        torch.testing.assert_close(values[b, :n], full[b, p - 1 : p + n - 1], atol=1e-5, rtol=1e-5)


def test_actor_generate_drops_samples_whose_response_holds_an_image_token(
    llava: tuple[Any, Any], prompts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (model, processor), (messages, images) = llava, prompts
    real_sample = roles.sample

    def with_image_token(*args: Any, **kwargs: Any) -> Any:
        rollouts = real_sample(*args, **kwargs)
        image_id = image_token_id(processor)
        assert image_id is not None
        rollouts.token_ids[0, 1, 0] = image_id  # prompt 0, sample 1, first token
        return rollouts

    monkeypatch.setattr(roles, "sample", with_image_token)
    exp, texts = actor_generate(
        model, processor, messages, images, SampleSettings(k=2, max_new_tokens=8, seed=3)
    )
    assert exp.batch_size == 5 == len(texts)
    assert exp.prompt_index.tolist() == [0, 1, 1, 2, 2] and exp.info["dropped"].tolist() == [1.0] * 5


# ----------------------------------------------------------------------------------------------- reward
class Scripted:
    """Returns ``scores`` whatever the responses; remembers the batch."""

    name = "scripted"

    def __init__(self, scores: list[float]) -> None:
        self.scores, self.batches = scores, []  # type: ignore[var-annotated]

    def score(self, batch: RewardBatch) -> RewardOutput:
        self.batches.append(batch)
        return RewardOutput(
            scores=torch.tensor(self.scores), aspects={"double": 2 * torch.tensor(self.scores)}
        )


def test_correctness_passes_responses_without_hallucinated_objects_and_needs_a_mention() -> None:
    scene = train_scenes(1, 0)[0]  # a large blue circle and a small blue square
    truth = {"scene": scene.to_dict()}
    star = "There is a small red star in the top left."
    assert correctness(caption(scene), truth) == 1.0
    assert correctness("There is a circle.", truth) == 1.0  # incomplete but not hallucinated
    assert correctness(caption(scene) + " " + star, truth) == 0.0
    assert correctness("", truth) == 0.0 and correctness("Hello.", truth) == 0.0
    facts = {"facts": ["There is a large blue circle in the bottom left.", "The background is black."]}
    assert correctness("There is a red circle.", facts) == 1.0  # facts check shapes only
    assert correctness(star, facts) == 0.0
    assert correctness(star, {"answer": "3"}) is None


def test_reward_infer_adds_the_length_penalty_and_bonus_and_replaces_unfinished_rewards() -> None:
    scene = train_scenes(1, 0)[0]
    exp = hand_made(
        prompt_index=torch.tensor([1, 0, 1]),
        response_length=torch.tensor([2, 4, 3]),
        has_eos=torch.tensor([True, True, False]),
        action_mask=torch.ones(3, 4, dtype=torch.bool),
    )
    texts = [caption(scene), "There is a small red star.", caption(scene)]
    reward = Scripted([1.0, 2.0, 3.0])
    prompts = [[Message.user("A?")], [Message.user("B?")]]
    truths = [{"scene": scene.to_dict()}, {"scene": scene.to_dict()}]
    shaping = RewardShaping(max_length=4, length_penalty=0.5, correctness_bonus=2.0, no_eos_penalty=-8.0)
    out = reward_infer(reward, exp, texts, prompts, None, truths, shaping)
    torch.testing.assert_close(out.scores, torch.tensor([1.0 - 0.5 * 2 / 4 + 2.0, 2.0 - 0.5 * 4 / 4, -8.0]))
    torch.testing.assert_close(out.raw, torch.tensor([1.0, 2.0, 3.0]))
    assert out.correctness is not None and out.correctness.tolist() == [1.0, 0.0, 1.0]
    assert [p[0].content[0].text for p in reward.batches[0].prompts] == ["B?", "A?", "B?"]  # type: ignore[union-attr]
    assert reward.batches[0].responses == texts and out.aspects["double"].tolist() == [2.0, 4.0, 6.0]
    assert out.metrics["no_eos_frac"] == pytest.approx(1 / 3)

    no_replace = dataclasses.replace(shaping, no_eos_penalty=None)
    assert reward_infer(reward, exp, texts, prompts, None, truths, no_replace).scores[2] == pytest.approx(
        3.0 - 0.5 * 3 / 4 + 2.0
    )
    plain = reward_infer(reward, exp, texts, prompts, None, truths, RewardShaping(max_length=4))
    assert plain.correctness is None and plain.scores.tolist() == [1.0, 2.0, -8.0]
    with pytest.raises(DataError, match="scores of shape"):
        reward_infer(Scripted([1.0]), exp, texts, prompts, None, truths, shaping)


# ----------------------------------------------------------------------------------------------- training
def with_advantages(exp: Experience, value: float) -> Experience:
    return dataclasses.replace(exp, advantages=torch.where(exp.action_mask, value, 0.0))


def test_actor_train_with_zero_advantages_leaves_the_policy_unchanged(
    llava: tuple[Any, Any], sampled: tuple[Experience, list[str]]
) -> None:
    policy = copy.deepcopy(llava[0])
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0)
    metrics = actor_train(policy, optimizer, with_advantages(sampled[0], 0.0), PPOSettings(mini_batch_size=3))
    assert metrics["pg_loss"] == 0.0 and metrics["grad_norm"] == 0.0
    assert metrics["clip_frac"] == 0.0 and metrics["entropy"] > 0
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_a_kl_loss_term_needs_reference_log_probs_and_is_zero_at_the_reference(
    llava: tuple[Any, Any], sampled: tuple[Experience, list[str]]
) -> None:
    policy = copy.deepcopy(llava[0])
    exp = with_advantages(sampled[0], 0.0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    settings = PPOSettings(kl_loss_coef=0.5, mini_batch_size=exp.batch_size)
    with pytest.raises(DataError, match="needs ref_logps"):
        actor_train(policy, optimizer, exp, settings)
    exp = dataclasses.replace(exp, ref_logps=ref_infer(policy, exp))
    metrics = actor_train(policy, optimizer, exp, settings)
    assert metrics["kl_loss"] == pytest.approx(0.0, abs=1e-6) and metrics["loss"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_one_actor_step_with_positive_advantages_raises_the_sampled_tokens_log_probs(
    llava: tuple[Any, Any], sampled: tuple[Experience, list[str]]
) -> None:
    policy = copy.deepcopy(llava[0])
    exp = with_advantages(sampled[0], 1.0)
    before = ref_infer(policy, exp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    metrics = actor_train(policy, optimizer, exp, PPOSettings(mini_batch_size=exp.batch_size))
    after = ref_infer(policy, exp)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["pg_loss"] == pytest.approx(
        -1.0, abs=1e-4
    )
    gained = (after - before)[exp.action_mask]
    assert float(gained.mean()) > 0.01 and float((gained > 0).float().mean()) > 0.9


def test_critic_train_moves_the_values_towards_the_returns_and_a_shared_critic_trains_only_its_head(
    llava: tuple[Any, Any], sampled: tuple[Experience, list[str]]
) -> None:
    backbone = copy.deepcopy(llava[0])
    critic = ValueModel(backbone)  # shared: the head sits on the policy's backbone
    exp = sampled[0]
    exp = dataclasses.replace(
        exp, values=critic_infer(critic, exp), returns=torch.where(exp.action_mask, 1.0, 0.0)
    )
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    optimizer = torch.optim.AdamW(critic.head.parameters(), lr=3e-2, weight_decay=0.0)
    settings = PPOSettings(ppo_epochs=4, mini_batch_size=3, value_clip=10.0)
    first = critic_train(critic, optimizer, exp, settings)
    error = lambda: float(((critic_infer(critic, exp) - 1.0) ** 2)[exp.action_mask].mean())  # noqa: E731
    assert error() < first["value_error"] / 2
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())
    assert all(p.grad is None for p in backbone.parameters())


# ----------------------------------------------------------------------------------------------- runner
class CountWords:
    """Reward = number of colour words in the response."""

    name = "colours"

    def score(self, batch: RewardBatch) -> RewardOutput:
        words = {"red", "blue", "green", "yellow"}
        counts = [sum(w.strip(".,").lower() in words for w in r.split()) for r in batch.responses]
        return RewardOutput(scores=torch.tensor(counts, dtype=torch.float32))


def test_the_runner_calls_the_roles_in_order_and_the_adaptive_kl_coefficient_follows_the_kl() -> None:
    policy, tok = build_tiny("llama", text_hidden=64, text_layers=2)
    critic = ValueModel(copy.deepcopy(policy))
    prompts = [[Message.user("Say a colour.")], [Message.user("Name a shape.")]]
    sampling = SampleSettings(k=4, max_new_tokens=6)
    horizon = 8  # = rows per iteration: β changes by up to 20 % per iteration
    runner = LocalRunner(
        policy=policy, processor=tok, ref_model=copy.deepcopy(policy), critic=critic, reward=CountWords(),
        actor_optimizer=torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.0),
        critic_optimizer=torch.optim.AdamW(critic.parameters(), lr=1e-3, weight_decay=0.0),
        kl_controller=AdaptiveKLController(0.1, target=0.5, horizon=horizon), sampling=sampling,
        shaping=RewardShaping(max_length=6, no_eos_penalty=None),
        settings=PPOSettings(ppo_epochs=2, mini_batch_size=4),
    )  # fmt: skip
    truths: list[dict[str, Any]] = [{}, {}]
    rows = []
    for it in range(3):
        exp, texts, metrics = runner.step(prompts, None, truths, seed=it)
        rows.append(metrics)
        assert exp.batch_size == 8 == len(texts)
        assert all(getattr(exp, f) is not None for f in ("old_logps", "ref_logps", "values", "advantages"))
    # iteration 1: the policy is still the reference (KL ≈ 0 < target): β shrinks by the clipped 20 %
    assert abs(rows[0]["kl"]) < 1e-3 and rows[0]["kl_coef"] == 0.1
    for row, nxt in itertools.pairwise(rows):
        error = min(max(row["kl"] / 0.5 - 1, -0.2), 0.2)
        assert row["kl_coef_next"] == pytest.approx(row["kl_coef"] * (1 + error * 8 / horizon))
        assert nxt["kl_coef"] == row["kl_coef_next"]
    assert rows[0]["kl_coef_next"] == pytest.approx(0.08)
    assert rows[2]["kl"] != 0 and all(torch.isfinite(torch.tensor(r["kl"])) for r in rows)
    for key in ("reward/shaped", "reward/raw", "policy/loss", "policy/clip_frac", "policy/approx_kl",
                "policy/entropy", "value/loss", "value/clip_frac", "advantages/mean", "advantages/std",
                "response_length", "has_eos", "kl_penalty"):  # fmt: skip
        assert all(key in r for r in rows), key

    fixed = dataclasses.replace(runner, kl_controller=FixedKLController(0.05))
    assert fixed.step(prompts, None, truths, seed=9)[2]["kl_coef_next"] == 0.05
