"""Reward and value heads on any supported VLM / LM backbone.

A :class:`RewardModel` is a backbone (the full HF model, so a critique RM can still generate) plus a linear
head on the final hidden state: ``dim`` = 1 for a scalar (Bradley–Terry) reward, K for one value per aspect.
The reward of a sequence is the head at its **last non-pad token** (right or left padding: the last
position whose attention mask is 1). Hidden states come from the backbone's base model (no LM-head
logits; LoRA-wrapped backbones too).

:meth:`RewardModel.pair_rewards` scores preference pairs; with ``share_prefix`` the prompt and images are
encoded once (:class:`mmalign.models.logprobs.PrefixCache`) and both responses continue the cache: equal to
the plain forward up to round-off (tested), ~2x fewer tokens through the backbone for image prompts. The
backbone's last decoder layer then only computes the prompt's K/V and each response's output at its last
valid token (:mod:`mmalign.models.partial`, where supported).

A :class:`ValueModel` puts a 1-dim head on every token (the PPO critic).

Saved as the backbone's own ``save_pretrained`` folder plus ``reward_head.safetensors`` (weights) and
``reward_head.json`` (dim, aspect names, kind) — no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmalign.atomic import atomic_write_json
from mmalign.data.pairs import PairBatch
from mmalign.data.rm_inputs import FACTS_PLACEMENTS, FactsPlacement
from mmalign.errors import ModelLoadError
from mmalign.models.kernels import lean_kernels
from mmalign.models.logprobs import PrefixCache, base_model_of, stacked_responses, warn_unsupported

HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_CONFIG = "reward_head.json"


def hidden_size(backbone: Any) -> int:
    """Width of the backbone's final hidden state (the text model's for VLMs)."""
    config = backbone.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) column of the last 1 in each row of a (B, T) mask (works for left and right padding)."""
    t = attention_mask.shape[1]
    cols = torch.arange(t, device=attention_mask.device)[None, :].expand_as(attention_mask)
    return torch.where(attention_mask.bool(), cols, torch.full_like(cols, -1)).amax(dim=1)


class _HeadModel(nn.Module):
    """Backbone + linear head; the shared part of reward and value models."""

    def __init__(self, backbone: Any, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"head dim must be >= 1, got {dim}")
        self.backbone = backbone
        self.head = nn.Linear(hidden_size(backbone), dim)
        # A small head keeps the initial rewards near 0 whatever the hidden-state scale.
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size(backbone) + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.head.to(next(backbone.parameters()).dtype)

    @property
    def config(self) -> Any:
        return self.backbone.config

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any
    ) -> torch.Tensor:
        """(B, T, H) final hidden states of the backbone's base model."""
        out = base_model_of(self.backbone)(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs
        )
        return out.last_hidden_state

    def hidden_and_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) final hidden states and (B, T, V) LM logits from one backbone pass (critique RMs train
        the LM head on critiques and the reward head on the same states)."""
        hidden = self.hidden_states(input_ids, attention_mask, **inputs)
        return hidden, self.backbone.get_output_embeddings()(hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head.weight.dtype))


class RewardModel(_HeadModel):
    """A reward model: ``forward`` → (B, dim) rewards at each sequence's last non-pad token.

    ``aspects`` names the head's outputs for multi-aspect models (len == dim); ``kind`` records how it was
    trained (``bt``, ``fact``, ``critique``, ``aspects``, ``pairwise``) so scoring can build the same input;
    ``facts_placement`` where a ``fact`` RM read its facts (``mmalign.data.rm_inputs.with_facts``).
    """

    def __init__(
        self,
        backbone: Any,
        dim: int = 1,
        aspects: Sequence[str] | None = None,
        kind: str = "bt",
        facts_placement: FactsPlacement = "system",
    ) -> None:
        super().__init__(backbone, dim)
        if aspects is not None and len(aspects) != dim:
            raise ValueError(f"{len(aspects)} aspect names for a {dim}-dim head")
        self.aspects = tuple(aspects) if aspects is not None else None
        self.kind = kind
        self.facts_placement = facts_placement

    @property
    def dim(self) -> int:
        return int(self.head.out_features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, **inputs)  # (B, T, H)
        return self.rewards_from_hidden(hidden, attention_mask)

    def rewards_from_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, dim) head outputs at each row's last non-pad token of (B, T, H) hidden states."""
        last = last_token_index(attention_mask)  # (B,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self._head(picked)  # (B, dim)

    def pair_rewards(
        self,
        batch: PairBatch,
        *,
        share_prefix: bool = True,
        skip_last_layer: bool = True,
        packed: bool = True,
        lean: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards (B, dim) of the chosen and of the rejected responses of ``batch``.

        ``skip_last_layer`` (with ``share_prefix``): the backbone's last decoder layer computes only K/V for
        the prompt and, for each response, its output only at the last valid token where the reward is read
        (:mod:`mmalign.models.partial`; same rewards and gradients up to round-off). Models without support
        compute every position (logged once). ``packed`` (with ``share_prefix``): both responses of every pair
        run in one padding-free continuation (:mod:`mmalign.models.packed`) instead of one padded call per
        side. ``lean``: forward under :func:`~mmalign.models.kernels.lean_kernels` (same values, leaner
        autograd for Llama/Qwen2-family decoders)."""
        with lean_kernels(lean):
            return self._pair_rewards(batch, share_prefix, skip_last_layer, packed)

    def _pair_rewards(
        self, batch: PairBatch, share_prefix: bool, skip_last_layer: bool, packed: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not share_prefix or warn_unsupported(self.backbone):
            return self._plain_pair_rewards(batch)
        prefix = PrefixCache(
            self.backbone,
            batch,
            module=base_model_of(self.backbone),
            prompt_hidden="none",
            skip_last_layer=skip_last_layer,
        )
        device = prefix.device
        rows = torch.arange(batch.batch_size, device=device)
        if packed and prefix.packing_supported():
            b = batch.batch_size
            ids, mask = stacked_responses(batch, device)  # (2B, W)
            hidden = prefix.packed_hidden_at(ids, mask, rows.repeat(2), last_token_index(mask))  # (2B, H)
            rewards = self._head(hidden)  # (2B, dim)
            return rewards[:b], rewards[b:]

        def run(side: str) -> torch.Tensor:
            ids, mask = (t.to(device) for t in batch.response(side))  # type: ignore[arg-type]  # (B, W)
            return self._head(prefix.hidden_at(ids, mask, rows, last_token_index(mask)))  # (B, dim)

        chosen = run("chosen")
        prefix.crop(batch.chosen_ids.shape[1])  # back to the prompt
        return chosen, run("rejected")

    def _plain_pair_rewards(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        c = {k: v.to(device) for k, v in batch.concat.items()}
        c.pop("response_mask")
        rewards = self(c.pop("input_ids"), c.pop("attention_mask"), **c)  # (2B, dim)
        b = batch.batch_size
        return rewards[:b], rewards[b:]

    def save(self, out_dir: str | Path, processor: Any = None) -> Path:
        """Write the backbone (``save_pretrained``), the head (safetensors) and its JSON description."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)
        if processor is not None:
            processor.save_pretrained(out)
        tmp = out / f".{HEAD_WEIGHTS}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, str(tmp))
        tmp.replace(out / HEAD_WEIGHTS)
        meta = {"dim": self.dim, "aspects": self.aspects, "kind": self.kind}
        if self.kind == "fact":
            meta["facts_placement"] = self.facts_placement
        atomic_write_json(out / HEAD_CONFIG, meta)
        return out


def load_reward_model(
    path: str | Path, *, dtype: str = "fp32", for_training: bool = False
) -> tuple[RewardModel, Any]:
    """``(reward_model, processor)`` from a folder written by :meth:`RewardModel.save`."""
    from safetensors.torch import load_file

    from mmalign.models.load import load_model

    folder = Path(path)
    head_cfg, head_weights = folder / HEAD_CONFIG, folder / HEAD_WEIGHTS
    if not head_cfg.exists() or not head_weights.exists():
        raise ModelLoadError(f"{folder}: not a reward model ({HEAD_CONFIG} and {HEAD_WEIGHTS} expected)")
    meta = json.loads(head_cfg.read_text())
    # fact RMs saved before the placement was recorded read their facts in the user turn
    placement = meta.get("facts_placement", "user" if meta.get("kind") == "fact" else "system")
    if placement not in FACTS_PLACEMENTS:
        raise ModelLoadError(
            f"{head_cfg}: facts_placement must be one of {FACTS_PLACEMENTS}, got {placement!r}"
        )
    backbone, processor = load_model(folder, dtype=dtype, for_training=for_training)  # type: ignore[arg-type]
    rm = RewardModel(
        backbone,
        dim=int(meta["dim"]),
        aspects=meta.get("aspects"),
        kind=str(meta["kind"]),
        facts_placement=placement,
    )
    rm.head.load_state_dict(load_file(str(head_weights)))
    rm.head.to(next(backbone.parameters()).dtype)
    rm.train(for_training)
    return rm, processor


class ValueModel(_HeadModel):
    """Per-token values (B, T) for PPO: a 1-dim head on every position's hidden state."""

    def __init__(self, backbone: Any) -> None:
        super().__init__(backbone, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: Any) -> torch.Tensor:
        hidden = self.hidden_states(input_ids, attention_mask, **inputs)  # (B, T, H)
        return self._head(hidden).squeeze(-1)  # (B, T)
