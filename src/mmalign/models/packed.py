"""Padding-free ("packed") continuation of a shared prompt prefix.

After :class:`mmalign.models.logprobs.PrefixCache` has encoded a batch's prompts (+ images) once, the
responses of the batch still have different lengths. Running them as a padded (N, W) batch spends every
linear layer on the padding: on the DPO benchmark's pairs a quarter of all response tokens are padding.
Here the real response tokens of all rows are concatenated into **one row** (1, T) — no padding at all —
and only attention sees the per-row layout again:

* :class:`PackedLayout` records, for every response *segment* s (one response row), which prompt row it
  continues (``rows``), and where its tokens sit in the packed row (``index`` (S, L), ``valid`` (S, L));
* the text model runs on the packed row with an attention implementation registered under
  :data:`PACKED_ATTENTION` (transformers' ``AttentionInterface``), switched on for the text decoder only
  inside :func:`packed_attention`; its mask creation is skipped (the name has no mask function, so the
  model builds none);
* per layer the attention function gathers the packed queries/keys/values into one block per **prompt
  row** (B, H, G * L, D): the G responses continuing that prompt side by side. Their keys follow the row's
  prompt K/V (taken from the prefix cache, layer by layer, with gradients; not copied per response), and
  ``scaled_dot_product_attention`` runs with the mask "the row's real prompt tokens + causal within the
  own response" (block-diagonal, so a pair's rejected response never sees its chosen one) — then the valid
  outputs are scattered back into the packed row. Projections, MLPs, norms and the LM head therefore only
  ever see real tokens; attention (a small part of the work) is the only place with padding.

Positions are passed explicitly (each segment continues right after its prompt), so the result equals the
padded continuation — and the plain concatenated forward — up to float round-off, gradients included
(tested per architecture in ``tests/models/test_logprobs.py`` and ``test_heads.py``).

The last-layer skip (:mod:`mmalign.models.partial`) composes with it: when the last layer asks attention
for a subset of the packed positions, :attr:`PackedLayout.query_positions` says which.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.errors import DataError

__all__ = ["PACKED_ATTENTION", "PackedLayout", "packed_attention"]

PACKED_ATTENTION = "mmalign_packed"
"""Name of the packed attention function in transformers' ``AttentionInterface``."""

_active: ContextVar[PackedLayout | None] = ContextVar("mmalign_packed_layout", default=None)
_registered = False


@dataclass
class PackedLayout:
    """Where the packed row's tokens come from (module docstring). S segments of at most L tokens.

    Attention works per **prompt row**: the G segments continuing prompt row b sit side by side in a block
    of G * L query slots that share that row's prompt K/V once (no copy of the prompt per segment), and a
    block-diagonal causal mask keeps the segments apart (e.g. a pair's rejected response never sees its
    chosen one).

    keys, values: per decoder layer the prompt cache (B, Hkv, P, D); prompt_mask: (B, P) bool;
    rows: (S,) the prompt row each segment continues; valid: (S, L) bool, the segment's tokens (a prefix of
    each segment); index: (S, L) packed position of each segment slot (0 in unused slots);
    block_index: (B * G * L,) packed position of each attention slot (0 in unused ones); block_of: (T,)
    attention slot of each packed token; mask: (B, 1, G * L, P + G * L) bool; query_positions: (k,) the
    packed positions whose attention output is asked for when a layer computes only some (last-layer
    skip), else ``None``.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    prompt_mask: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    block_index: torch.Tensor
    block_of: torch.Tensor
    mask: torch.Tensor
    groups: int
    query_positions: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        prompt_mask: torch.Tensor,
        rows: torch.Tensor,
        valid: torch.Tensor,
    ) -> PackedLayout:
        """Layout of response rows continuing prompt ``rows`` (S,), real tokens ``valid`` (S, W)."""
        device = valid.device
        lengths = valid.sum(1)  # (S,)
        if bool((lengths == 0).any()):
            raise DataError("packed continuation: a response row has no tokens", field="mask")
        if not bool((valid == (torch.arange(valid.shape[1], device=device) < lengths[:, None])).all()):
            raise DataError("packed continuation: response tokens must be a prefix of each row", field="mask")
        n_rows = prompt_mask.shape[0]
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n_rows):
            raise DataError(f"packed continuation: rows outside the {n_rows} cached prompts", field="rows")
        ell = int(lengths.max())
        slots = torch.arange(ell, device=device)
        ok = slots[None, :] < lengths[:, None]  # (S, L)
        starts = lengths.cumsum(0) - lengths  # (S,)
        index = torch.where(ok, starts[:, None] + slots[None, :], torch.zeros_like(ok, dtype=torch.long))
        # The g-th segment of its prompt row (in segment order) gets group g of that row's block.
        seg = torch.arange(len(rows), device=device)
        earlier = (rows[:, None] == rows[None, :]) & (seg[None, :] < seg[:, None])  # (S, S)
        group = earlier.sum(1)  # (S,)
        groups = int(group.max()) + 1
        slot_of = (rows * groups + group)[:, None] * ell + slots[None, :]  # (S, L) attention slot
        block_of = slot_of[ok]  # (T,)
        block_index = torch.zeros(n_rows * groups * ell, dtype=torch.long, device=device)
        block_index[block_of] = index[ok]
        # Mask: a query slot (g, j) sees the row's real prompt tokens and slots (g, j') with j' <= j.
        q_group = torch.arange(groups * ell, device=device) // ell
        q_slot = torch.arange(groups * ell, device=device) % ell
        own = (q_group[:, None] == q_group[None, :]) & (q_slot[None, :] <= q_slot[:, None])  # (GL, GL)
        prompt = prompt_mask.bool()[:, None, :].expand(-1, groups * ell, -1)  # (B, GL, P)
        mask = torch.cat([prompt, own[None].expand(n_rows, -1, -1)], dim=2)[:, None]  # (B, 1, GL, P + GL)
        return cls(keys, values, prompt_mask.bool(), rows, ok, index, block_index, block_of, mask, groups)

    @property
    def total(self) -> int:
        """T, the number of packed tokens."""
        return int(self.block_of.numel())

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(S, W, ...) per-segment values → (T, ...) packed (segment by segment)."""
        return x[:, : self.valid.shape[1]][self.valid]

    def unpack(self, x: torch.Tensor, width: int, fill: float = 0.0) -> torch.Tensor:
        """(T, ...) packed values → (S, width, ...) per segment, ``fill`` outside the segments."""
        s, ell = self.valid.shape
        picked = x.index_select(0, self.index.flatten()).unflatten(0, (s, ell))  # (S, L, ...)
        keep = self.valid.reshape(s, ell, *([1] * (x.dim() - 1)))
        out = torch.where(keep, picked, torch.full_like(picked, fill))
        if width > ell:
            out = torch.nn.functional.pad(out, (0, 0) * (x.dim() - 1) + (0, width - ell), value=fill)
        return out[:, :width]

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Packed (1, H, T, D) → attention blocks (B, H, G * L, D)."""
        blocks = x[0].index_select(1, self.block_index)  # (H, B * G * L, D)
        return blocks.unflatten(1, (self.prompt_mask.shape[0], -1)).transpose(0, 1)


def _packed_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` function: query (1, Hq, k, D), key/value (1, Hkv, T, D) → (1, k, Hq, D)."""
    layout = _active.get()
    if layout is None:
        raise DataError(f"attention {PACKED_ATTENTION!r} used outside mmalign.models.packed.packed_attention")
    if getattr(module, "attn_logit_softcapping", None) is not None:
        raise DataError("packed continuation: attention logit soft-capping is not supported")
    layer = int(module.layer_idx)
    keys = torch.cat([layout.keys[layer], layout.to_blocks(key)], dim=2)  # (B, Hkv, P + GL, D)
    values = torch.cat([layout.values[layer], layout.to_blocks(value)], dim=2)
    gqa = query.shape[1] != key.shape[1]
    p_drop = dropout if module.training else 0.0
    if query.shape[2] == layout.total:  # every packed position (all layers but a skipped last one)
        out = torch.nn.functional.scaled_dot_product_attention(
            layout.to_blocks(query),
            keys,
            values,
            attn_mask=layout.mask,
            dropout_p=p_drop,
            scale=scaling,
            enable_gqa=gqa,
        )  # (B, Hq, GL, D)
        out = out.transpose(1, 2).flatten(0, 1).index_select(0, layout.block_of)  # (T, Hq, D)
        return out[None], None  # (1, T, Hq, D)
    if layout.query_positions is None or layout.query_positions.numel() != query.shape[2]:
        raise DataError(
            f"packed continuation: {query.shape[2]} queries for {layout.total} packed tokens and no matching "
            "query_positions"
        )
    # Queries at some packed positions only (last-layer skip): one attention row per query.
    slot = layout.block_of[layout.query_positions]  # (k,) attention slot
    row = slot // layout.mask.shape[2]
    q = query[0].transpose(0, 1)[:, :, None]  # (k, Hq, 1, D)
    rows_mask = layout.mask[row, :, slot % layout.mask.shape[2]][:, :, None]  # (k, 1, 1, P + GL)
    out = torch.nn.functional.scaled_dot_product_attention(
        q,
        keys.index_select(0, row),
        values.index_select(0, row),
        attn_mask=rows_mask,
        dropout_p=p_drop,
        scale=scaling,
        enable_gqa=gqa,
    )  # (k, Hq, 1, D)
    return out[:, :, 0][None], None  # (1, k, Hq, D)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_ATTENTION, _packed_attention_forward)
        _registered = True


@contextmanager
def packed_attention(text_config: Any, layout: PackedLayout) -> Iterator[PackedLayout]:
    """Within the context the text decoder configured by ``text_config`` attends in ``layout``'s packed form.

    Only ``text_config``'s attention implementation is switched (vision towers keep theirs); it is restored on
    exit. Autograd does not need the context: backward may run after it."""
    _register()
    old = text_config._attn_implementation
    token = _active.set(layout)
    text_config._attn_implementation = PACKED_ATTENTION
    try:
        yield layout
    finally:
        text_config._attn_implementation = old
        _active.reset(token)
