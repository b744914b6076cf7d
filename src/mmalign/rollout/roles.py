"""The six calls of one PPO iteration (ReaLHF's function calls) as plain functions over ``Experience``.

One iteration, in the order :class:`LocalRunner` calls them::

    exp, texts = actor_generate(policy, processor, prompts, images, sampling)   # sequences, old_logps (B, R)
    scored = reward_infer(reward, exp, texts, prompts, images, truths, shaping)  # scores (B,), shaped
    exp.ref_logps = ref_infer(ref_model, exp)                                     # (B, R)
    exp.values = critic_infer(critic, exp)                                        # (B, R)
    exp = compute_advantages(exp, kl_coef, settings)                              # rewards/advantages/returns
    actor_train(policy, actor_optimizer, exp, settings)                           # clipped policy loss
    critic_train(critic, critic_optimizer, exp, settings)                         # clipped value loss

Every call takes and returns tensors, strings or an :class:`~mmalign.rollout.experience.Experience`, never a
shared object, so the calls can run on different devices or processes: :class:`LocalRunner` runs them in
this process one after the other; a Ray runner would place each model on its own worker (the planner picks
the placement) and ship the Experience between them — the functions stay the same.

Conventions (all per-token tensors are (B, R) over the response tokens, see ``experience.py``):

* log-probs: response token ``t`` (sequence column ``c = prompt_length + t``) is scored by the logits at
  column ``c − 1`` — :func:`~mmalign.models.logprobs.sequence_token_logps`;
* values: ``V(s_t)`` is the critic head on the hidden state at column ``c − 1`` (the state the action is
  taken from), so the value of the first response token is read at the prompt's last token;
* KL in the reward: ``kl_penalty(old_logps, ref_logps, kind, clamp)`` per token, ``token_rewards`` adds
  ``−β·kl_t`` on every token and the sequence score on the last one, then GAE (``losses/ppo.py``).

Responses that contain an image placeholder token (a VLM may sample ``<image>``) cannot be re-encoded next
to the prompt's images (the model would expect an image for it), so :func:`actor_generate` drops those rows
and reports how many it dropped.

The critic is a :class:`~mmalign.models.heads.ValueModel`: normally its own backbone (a copy of the policy
initialisation or a given model/reward-model folder), optionally a value head on the policy's backbone
(``shared``: the value loss then trains only the head; the backbone learns from the policy loss alone).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from mmalign.errors import DataError
from mmalign.losses.ppo import (
    KLController,
    KLKind,
    gae,
    kl_penalty,
    llava_rlhf_reward,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from mmalign.models.heads import ValueModel
from mmalign.models.load import image_token_id, is_vision_model
from mmalign.models.logprobs import token_logps_from_logits
from mmalign.rollout.experience import Experience, experience_from_rollouts
from mmalign.rollout.rewards import Reward, RewardBatch
from mmalign.rollout.sampler import sample
from mmalign.world.oracle import judge_exact
from mmalign.world.parse import parse_response
from mmalign.world.scene import Scene

__all__ = [
    "ROLES",
    "LocalRunner",
    "PPOSettings",
    "RewardShaping",
    "SampleSettings",
    "ScoredResponses",
    "actor_generate",
    "actor_train",
    "compute_advantages",
    "correctness",
    "critic_infer",
    "critic_train",
    "ref_infer",
    "reward_infer",
]


# --------------------------------------------------------------------------------------------------- settings
@dataclass
class SampleSettings:
    """How :func:`actor_generate` samples (see :func:`mmalign.rollout.sampler.sample`)."""

    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    """Prompts per sampling batch."""
    seed: int = 0


@dataclass
class RewardShaping:
    """LLaVA-RLHF's sequence reward: ``score − length_penalty·len/max_length + correctness_bonus·correct``;
    a response without EOS gets ``no_eos_penalty`` instead (``None``: no replacement)."""

    max_length: int
    """L: the generation budget (``max_new_tokens``)."""
    length_penalty: float = 0.0
    correctness_bonus: float = 0.0
    no_eos_penalty: float | None = -8.0


@dataclass
class PPOSettings:
    """Advantage estimation and the two training calls."""

    gamma: float = 1.0
    lam: float = 0.95
    kl_kind: KLKind = "k1"
    """KL estimator of the per-token penalty in the reward."""
    kl_clamp: float | None = 5.0
    """Clamp the per-token KL penalty to [−clamp, clamp] (null: no clamp)."""
    whiten_rewards: bool = False
    """Rescale the per-token rewards to unit variance (mean kept) before GAE."""
    whiten_advantages: bool = True
    ppo_epochs: int = 1
    mini_batch_size: int = 8
    clip_eps: float = 0.2
    value_clip: float = 0.2
    kl_loss_coef: float = 0.0
    """Weight of a KL(π ‖ π_ref) term in the policy loss (``kl_loss_kind`` estimate; 0: KL only in the
    reward)."""
    kl_loss_kind: KLKind = "k3"
    max_grad_norm: float = 1.0
    """Clip the gradient norm of each policy step (0: no clipping)."""
    critic_max_grad_norm: float = 1.0
    """Clip the gradient norm of each critic step (0: no clipping)."""
    forward_batch_size: int = 16
    """Rows per inference forward (reference, critic)."""
    seed: int = 0
    """Seeds the mini-batch order."""


# ---------------------------------------------------------------------------------------------------- helpers
def _split_inputs(exp: Experience) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    inputs = exp.model_inputs()
    return inputs.pop("input_ids"), inputs.pop("attention_mask"), inputs


def _response_logps(model: Any, exp: Experience, *, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, R) log π(response token) with gradient, and (B, R) entropies of π at those positions (no
    gradient) when asked; 0 outside ``action_mask``."""
    ids, attn, inputs = _split_inputs(exp)
    out = model(input_ids=ids, attention_mask=attn, use_cache=False, **inputs)
    logits = out.logits[:, :-1]  # (B, T-1, V): column c-1 predicts token c
    lp = token_logps_from_logits(logits, ids[:, 1:])  # (B, T-1)
    logps = exp.gather_response(torch.nn.functional.pad(lp, (1, 0)))  # (B, R)
    if not entropy:
        return logps, None
    with torch.no_grad():
        logz = torch.logsumexp(logits.float(), dim=-1, keepdim=True)  # (B, T-1, 1)
        probs = torch.exp(logits.float() - logz)
        ent = (logz.squeeze(-1) - (probs * logits.float()).sum(-1)).float()  # (B, T-1)
        ent = exp.gather_response(torch.nn.functional.pad(ent, (1, 0)))  # (B, R)
    return logps, ent


def _response_values(critic: ValueModel, exp: Experience) -> Tensor:
    """(B, R) V(s_t): the value head on the hidden state before response token t; 0 off the mask."""
    ids, attn, inputs = _split_inputs(exp)
    values = critic(ids, attn, **inputs).float()  # (B, T): head on every column's hidden state
    return exp.gather_response(torch.nn.functional.pad(values[:, :-1], (1, 0)))  # (B, R)


def _in_chunks(exp: Experience, batch_size: int, fn: Callable[[Experience], Tensor]) -> Tensor:
    """``fn(chunk) -> (b, r)`` over consecutive chunks of ``exp``, stitched back to (B, R)."""
    width = exp.action_mask.shape[1]
    parts = [
        torch.nn.functional.pad(out, (0, width - out.shape[1])) for out in map(fn, exp.split(batch_size))
    ]
    return torch.cat(parts)


class _Means:
    """Running means of scalar metrics over mini-batches."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.n += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(1, self.n) for key, value in self.sums.items()}


def _clip_and_step(params: list[Tensor], optimizer: Any, scheduler: Any, max_norm: float) -> float:
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return grad_norm


def _optimised_params(optimizer: Any) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _placeholder_ids(model: Any, processor: Any) -> list[int]:
    """Token ids a response must not contain to be re-encoded with its images (VLMs only)."""
    if not is_vision_model(model):
        return []
    ids = {image_token_id(processor)}
    config = model.config
    for name in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id"):
        ids.add(getattr(config, name, None))
    return sorted(int(i) for i in ids if i is not None)


# ------------------------------------------------------------------------------------------ 1. actor_generate
@torch.no_grad()
def actor_generate(
    policy: Any,
    processor: Any,
    prompts: Sequence[Sequence[Any]],
    images: Sequence[Sequence[Any]] | None,
    sampling: SampleSettings,
) -> tuple[Experience, list[str]]:
    """``sampling.k`` samples per prompt → (Experience with ``old_logps`` (B, R), B decoded responses).

    Row ``i * k + j`` is sample ``j`` of prompt ``i`` (``exp.prompt_index`` maps rows to prompts), except
    that rows whose response holds an image placeholder token are dropped (module docstring;
    ``exp.info["dropped"]`` (B,) repeats how many were). Raises :class:`DataError` when every row is dropped.
    """
    rollouts = sample(
        policy,
        processor,
        prompts,
        images,
        k=sampling.k,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        batch_size=sampling.batch_size,
        return_logps=True,
    )
    exp, texts = experience_from_rollouts(rollouts), rollouts.flat_texts()
    banned = _placeholder_ids(policy, processor)
    keep = list(range(exp.batch_size))
    if banned:
        response = torch.where(exp.sequence_action_mask(), exp.sequences, -1)  # (B, T)
        bad = torch.isin(response, torch.tensor(banned, device=response.device)).any(dim=1)  # (B,)
        keep = (~bad).nonzero().flatten().tolist()
        if not keep:
            raise DataError("every sampled response contains an image placeholder token", field="responses")
        if len(keep) < exp.batch_size:
            exp, texts = exp.select(keep), [texts[i] for i in keep]
    exp.info["dropped"] = torch.full((exp.batch_size,), float(len(rollouts.flat_texts()) - len(keep)))
    return exp, texts


# -------------------------------------------------------------------------------------------- 2. reward_infer
def correctness(response: str, truth: Mapping[str, Any]) -> float | None:
    """Symbolic check of a response against the ground truth of its prompt, for the correctness bonus.

    With a ``scene``: 1.0 when the response mentions at least one object and none of its mentions is a
    hallucinated object (a shape absent from the scene, or one object too many — :func:`judge_exact`);
    with only ``facts`` (sentences): 1.0 when it mentions at least one object and every mentioned shape is
    one the facts mention. Else 0.0; ``None`` when the truth has neither (no bonus can be computed). An
    empty or object-free response earns no bonus, so the bonus cannot be won by saying nothing.
    """
    if "scene" in truth:
        judgement = judge_exact(Scene.from_dict(truth["scene"]), response)
        return float(bool(judgement.mentions) and judgement.n_object_hallucinations == 0)
    if "facts" in truth:
        true_shapes = {m.shape for fact in truth["facts"] for m in parse_response(fact).mentions}
        mentions = parse_response(response).mentions
        return float(bool(mentions) and all(m.shape in true_shapes for m in mentions))
    return None


@dataclass
class ScoredResponses:
    """What :func:`reward_infer` computed for the B rows of an Experience."""

    scores: Tensor  # (B,) shaped sequence reward (what PPO optimises)
    raw: Tensor  # (B,) the Reward's own score (RM / oracle / verifier)
    correctness: Tensor | None  # (B,) in {0, 1}; 0 for rows without ground truth; None: no bonus
    aspects: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,)
    metrics: dict[str, float] = field(default_factory=dict)
    """``llava_rlhf_reward``'s: reward, rm_score, length_penalty, correctness, no_eos_frac."""


def reward_infer(
    reward: Reward,
    exp: Experience,
    texts: Sequence[str],
    prompts: Sequence[Sequence[Any]],
    images: Sequence[Sequence[Any]] | None,
    truths: Sequence[Mapping[str, Any]],
    shaping: RewardShaping,
) -> ScoredResponses:
    """Score the B responses with ``reward`` (row b answers ``prompts[exp.prompt_index[b]]``) and shape the
    score the LLaVA-RLHF way (:class:`RewardShaping`); the correctness bonus uses :func:`correctness`."""
    rows = exp.prompt_index.tolist()
    if len(texts) != len(rows):
        raise DataError(f"{len(texts)} responses for {len(rows)} rows", field="texts")
    batch = RewardBatch(
        prompts=[list(prompts[i]) for i in rows],
        responses=list(texts),
        images=[list(images[i]) for i in rows] if images is not None else [],
        truths=[dict(truths[i]) for i in rows],
    )
    out = reward.score(batch)
    if out.scores.shape != (len(rows),):
        raise DataError(
            f"reward {reward.name!r} returned scores of shape {tuple(out.scores.shape)} "
            f"for {len(rows)} responses"
        )
    raw = out.scores.detach().float().cpu()  # (B,)
    correct = None
    if shaping.correctness_bonus:
        checks = [correctness(text, truth) for text, truth in zip(texts, batch.truths, strict=True)]
        if any(c is not None for c in checks):
            correct = torch.tensor([c or 0.0 for c in checks])  # (B,)
    ended = exp.has_eos.cpu()  # (B,)
    if shaping.no_eos_penalty is None:
        ended = torch.ones_like(ended)
    shaped, metrics = llava_rlhf_reward(
        raw,
        exp.response_length.cpu(),
        shaping.max_length,
        ended,
        correct,
        shaping.length_penalty,
        shaping.correctness_bonus,
        shaping.no_eos_penalty if shaping.no_eos_penalty is not None else 0.0,
    )
    aspects = {name: v.detach().float().cpu() for name, v in out.aspects.items()}
    return ScoredResponses(shaped, raw, correct, aspects, metrics)


# -------------------------------------------------------------------------------------------- 3./4. inference
@torch.no_grad()
def ref_infer(ref_model: Any, exp: Experience, batch_size: int = 16) -> Tensor:
    """(B, R) log π_ref of the response tokens (0 off ``action_mask``), ``batch_size`` rows per forward."""
    was_training = ref_model.training
    ref_model.eval()
    try:
        return _in_chunks(exp, batch_size, lambda chunk: _response_logps(ref_model, chunk)[0].float())
    finally:
        ref_model.train(was_training)


@torch.no_grad()
def critic_infer(critic: ValueModel, exp: Experience, batch_size: int = 16) -> Tensor:
    """(B, R) V(s_t) of the rollout critic (0 off ``action_mask``), ``batch_size`` rows per forward."""
    was_training = critic.training
    critic.eval()
    try:
        return _in_chunks(exp, batch_size, lambda chunk: _response_values(critic, chunk))
    finally:
        critic.train(was_training)


# ------------------------------------------------------------------------------------------------- advantages
@torch.no_grad()
def compute_advantages(exp: Experience, kl_coef: float, settings: PPOSettings) -> Experience:
    """A copy of ``exp`` with ``rewards``, ``advantages`` and ``returns`` (B, R) and ``info`` statistics.

    Needs ``scores`` (B,), ``old_logps``, ``ref_logps`` and ``values`` (B, R). Per token
    ``kl_t = kl_penalty(old, ref, kl_kind, kl_clamp)``; ``rewards = token_rewards(scores, kl, mask, β)``
    (optionally whitened, mean kept); ``advantages, returns = gae(rewards, values, mask, γ, λ)``; advantages
    whitened when ``whiten_advantages``. ``info``: ``kl`` (B,) = Σ_t (old − ref) (the unclamped k1 KL of
    each sequence), ``kl_penalty`` (B,) = Σ_t kl_t, ``adv_mean``/``adv_std`` (B,) per-row statistics of the
    advantages *before* whitening.
    """
    for name in ("scores", "old_logps", "ref_logps", "values"):
        if getattr(exp, name) is None:
            raise DataError("compute_advantages needs it (run the roles before it)", field=name)
    assert exp.scores is not None and exp.old_logps is not None and exp.ref_logps is not None
    assert exp.values is not None
    mask = exp.action_mask  # (B, R)
    kl = kl_penalty(exp.old_logps, exp.ref_logps, settings.kl_kind, clamp=settings.kl_clamp)  # (B, R)
    rewards = token_rewards(exp.scores.to(kl.dtype), kl, mask, kl_coef)  # (B, R)
    if settings.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, exp.values, mask, settings.gamma, settings.lam)  # (B, R), (B, R)
    n = mask.sum(1).clamp(min=1)  # (B,)
    adv_mean = advantages.sum(1) / n  # (B,)
    adv_var = torch.where(mask, (advantages - adv_mean[:, None]) ** 2, 0.0).sum(1) / n
    info = {
        **exp.info,
        "kl": torch.where(mask, exp.old_logps - exp.ref_logps, 0.0).sum(1),
        "kl_penalty": torch.where(mask, kl, 0.0).sum(1),
        "adv_mean": adv_mean,
        "adv_std": adv_var.sqrt(),
    }
    if settings.whiten_advantages:
        advantages = whiten(advantages, mask)
    return dataclasses.replace(exp, rewards=rewards, advantages=advantages, returns=returns, info=info)


# --------------------------------------------------------------------------------------------- 5./6. training
def _mini_batches(exp: Experience, settings: PPOSettings, salt: int) -> list[Experience]:
    """``ppo_epochs`` passes over ``exp`` in a seeded random order, ``mini_batch_size`` rows each."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + salt)
    out = []
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(exp.batch_size, generator=generator).tolist()
        for start in range(0, exp.batch_size, settings.mini_batch_size):
            out.append(exp.select(order[start : start + settings.mini_batch_size]))
    return out


def actor_train(
    policy: Any, optimizer: Any, exp: Experience, settings: PPOSettings, *, scheduler: Any = None
) -> dict[str, float]:
    """``ppo_epochs`` × mini-batches of clipped policy-loss steps (+ ``kl_loss_coef`` · KL to the reference).

    Needs ``old_logps`` and ``advantages`` (and ``ref_logps`` with a KL loss). Returns the means over the
    steps of ``loss`` (the optimised total), ``pg_loss``, ``clip_frac``, ``approx_kl``, ``ratio_mean``,
    ``entropy`` (mean per-token entropy of π), ``kl_loss`` and ``grad_norm``.
    """
    if exp.old_logps is None or exp.advantages is None:
        raise DataError("actor_train needs old_logps and advantages", field="exp")
    if settings.kl_loss_coef and exp.ref_logps is None:
        raise DataError("a KL loss (kl_loss_coef > 0) needs ref_logps", field="exp")
    policy.train()
    params = _optimised_params(optimizer)
    means = _Means()
    for mb in _mini_batches(exp, settings, salt=1):
        assert mb.old_logps is not None and mb.advantages is not None
        logps, entropy = _response_logps(policy, mb, entropy=True)  # (b, r), (b, r)
        assert entropy is not None
        loss, info = policy_loss(logps, mb.old_logps, mb.advantages, mb.action_mask, settings.clip_eps)
        info["pg_loss"] = info.pop("loss")
        if settings.kl_loss_coef:
            assert mb.ref_logps is not None
            kl = masked_mean(kl_penalty(logps, mb.ref_logps, settings.kl_loss_kind), mb.action_mask)
            loss = loss + settings.kl_loss_coef * kl
            info["kl_loss"] = float(kl.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        info["grad_norm"] = _clip_and_step(params, optimizer, scheduler, settings.max_grad_norm)
        info.update(loss=float(loss.detach()), entropy=float(masked_mean(entropy, mb.action_mask)))
        means.add(info)
    optimizer.zero_grad(set_to_none=True)
    return means.means()


def critic_train(
    critic: ValueModel, optimizer: Any, exp: Experience, settings: PPOSettings, *, scheduler: Any = None
) -> dict[str, float]:
    """``ppo_epochs`` × mini-batches of clipped value-loss steps (``value_clip``) towards the GAE returns.

    Needs ``values`` (the rollout critic's) and ``returns``. Returns the means over the steps of ``loss``,
    ``clip_frac``, ``value_mean``, ``return_mean``, ``value_error`` and ``grad_norm``.
    """
    if exp.values is None or exp.returns is None:
        raise DataError("critic_train needs values and returns", field="exp")
    critic.train()
    params = _optimised_params(optimizer)
    means = _Means()
    for mb in _mini_batches(exp, settings, salt=2):
        assert mb.values is not None and mb.returns is not None
        values = _response_values(critic, mb)  # (b, r)
        loss, info = value_loss(values, mb.values, mb.returns, mb.action_mask, settings.value_clip)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        info["grad_norm"] = _clip_and_step(params, optimizer, scheduler, settings.critic_max_grad_norm)
        means.add(info)
    critic.zero_grad(set_to_none=True)  # also the shared backbone's (a shared critic trains only its head)
    return means.means()


# ----------------------------------------------------------------------------------------------------- runner
@dataclass
class LocalRunner:
    """Owns the models of a PPO run and calls the six roles in order, in this process.

    ``critic`` may share the policy's backbone (``ValueModel(policy)``; then ``critic_optimizer`` covers
    only its head). A distributed runner would hold the same pieces on workers and make the same calls.
    """

    policy: Any
    processor: Any
    ref_model: Any
    critic: ValueModel
    reward: Reward
    actor_optimizer: Any
    critic_optimizer: Any
    kl_controller: KLController
    sampling: SampleSettings
    shaping: RewardShaping
    settings: PPOSettings
    actor_scheduler: Any = None
    critic_scheduler: Any = None
    critic_warmup: int = 0
    """First iterations (calls of :meth:`step`) in which only the critic trains (the policy waits)."""
    iteration: int = 0

    def generate_and_score(
        self,
        prompts: Sequence[Sequence[Any]],
        images: Sequence[Sequence[Any]] | None,
        truths: Sequence[Mapping[str, Any]],
        seed: int,
    ) -> tuple[Experience, list[str], ScoredResponses]:
        """Roles 1–2: sample from the policy and score the samples (``exp.scores`` = shaped rewards)."""
        sampling = dataclasses.replace(self.sampling, seed=seed)
        exp, texts = actor_generate(self.policy, self.processor, prompts, images, sampling)
        scored = reward_infer(self.reward, exp, texts, prompts, images, truths, self.shaping)
        exp.scores = scored.scores.to(exp.sequences.device)
        exp.info["raw_score"] = scored.raw.to(exp.sequences.device)
        return exp, texts, scored

    def step(
        self,
        prompts: Sequence[Sequence[Any]],
        images: Sequence[Sequence[Any]] | None,
        truths: Sequence[Mapping[str, Any]],
        seed: int,
    ) -> tuple[Experience, list[str], dict[str, float]]:
        """One PPO iteration on ``prompts``; returns the trained-on Experience, its responses and the
        iteration's metrics (``reward/*``, ``kl``, ``kl_coef``, ``policy/*``, ``value/*``, …)."""
        exp, texts, scored = self.generate_and_score(prompts, images, truths, seed)
        bs = self.settings.forward_batch_size
        exp.ref_logps = ref_infer(self.ref_model, exp, bs)
        exp.values = critic_infer(self.critic, exp, bs)
        kl_coef = self.kl_controller.value
        exp = compute_advantages(exp, kl_coef, self.settings)
        assert exp.returns is not None
        self.iteration += 1
        actor = {}
        if self.iteration > self.critic_warmup:
            actor = actor_train(
                self.policy, self.actor_optimizer, exp, self.settings, scheduler=self.actor_scheduler
            )
        critic = critic_train(
            self.critic, self.critic_optimizer, exp, self.settings, scheduler=self.critic_scheduler
        )
        mean_kl = float(exp.info["kl"].mean())
        self.kl_controller.update(mean_kl, n_steps=exp.batch_size)
        metrics = {
            **response_metrics(exp, scored),
            "kl": mean_kl,
            "kl_penalty": float(exp.info["kl_penalty"].mean()),
            "kl_coef": kl_coef,
            "kl_coef_next": self.kl_controller.value,
            "advantages/mean": float(exp.info["adv_mean"].mean()),
            "advantages/std": float(exp.info["adv_std"].mean()),
            "returns/mean": float(masked_mean(exp.returns, exp.action_mask)),
            **{f"policy/{k}": v for k, v in actor.items()},
            **{f"value/{k}": v for k, v in critic.items()},
        }
        return exp, texts, metrics


def response_metrics(exp: Experience, scored: ScoredResponses) -> dict[str, float]:
    """``reward/shaped|raw|correctness|length_penalty|no_eos_frac|<aspect>``, ``response_length``,
    ``has_eos``, ``rows``, ``dropped`` of a scored batch."""
    metrics = {
        "reward/shaped": float(scored.scores.mean()),
        "reward/raw": float(scored.raw.mean()),
        "reward/raw_std": float(scored.raw.std()) if scored.raw.numel() > 1 else 0.0,
        "reward/correctness": scored.metrics["correctness"],
        "reward/length_penalty": scored.metrics["length_penalty"],
        "reward/no_eos_frac": scored.metrics["no_eos_frac"],
        **{f"reward/{name}": float(v.mean()) for name, v in scored.aspects.items()},
        "response_length": float(exp.response_length.float().mean()),
        "has_eos": float(exp.has_eos.float().mean()),
        "rows": float(exp.batch_size),
    }
    if "dropped" in exp.info:
        metrics["dropped"] = float(exp.info["dropped"][0])
    return metrics


Role = Literal["actor_generate", "reward_infer", "ref_infer", "critic_infer", "actor_train", "critic_train"]
ROLES: tuple[Role, ...] = (
    "actor_generate",
    "reward_infer",
    "ref_infer",
    "critic_infer",
    "actor_train",
    "critic_train",
)
"""The six calls of a PPO iteration in execution order (ReaLHF's dataflow graph)."""
