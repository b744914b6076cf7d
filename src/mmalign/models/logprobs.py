"""Per-token log-probabilities of responses, plain and with a shared prompt prefix.

* :func:`sequence_token_logps` — one forward over full sequences (prompt + response), the plain path.
* :func:`pair_token_logps` — the preference-pair forward. With ``share_prefix`` the prompt and its images are
  encoded **once** (``use_cache=True``); then the responses continue the cache in one of three modes:
  ``"packed"`` (default): the real tokens of all chosen and rejected responses form one row without padding
  and attend to their prompt's cache through :mod:`mmalign.models.packed` (one call; on the DPO benchmark's
  pairs a quarter of the padded response tokens were padding); ``"sequential"``: the chosen responses run on
  the cache, the cache is cropped back to the prompt (a differentiable slice) and the rejected ones run;
  ``"batched"``: the cache is duplicated to 2B rows (``Cache.reorder_cache``) and both run in one call.
  Models whose text attention is not ``sdpa``/``eager`` use ``"sequential"`` instead of ``"packed"``.
  Gradients flow into the prompt through the cache, so training is exact, not only inference.

Exactness (log-probs and parameter gradients equal to the plain forward up to float round-off):

* prompts are right padded; each response continues right after its own prompt's last real token: the
  attention mask is ``[prompt_mask, response_valid]`` (pad holes masked) and position ids are passed
  explicitly as "next position after the prompt" + j. The first response token's log-prob comes from the
  prompt forward's logits at column ``P_b - 1``;
* PaliGemma: positions are 1-based; the prompt is a bidirectional prefix (``token_type_ids`` 0) and the
  continuation is causal (type 1), as in the plain prefix-LM training layout;
* Qwen2-VL: 3-D M-RoPE positions of the prompt come from the model's ``get_rope_index``; text after the
  prompt continues at ``max(prompt positions) + 1`` on all three axes (what ``rope_deltas`` encodes);
* last-layer skip (:mod:`mmalign.models.partial`, on by default in :func:`pair_token_logps`): the prompt
  forward's last decoder layer computes only K/V for the cache plus the output at each prompt's last real
  token; the responses still run on every position;
* models whose layout is not known to be exact (other architectures, sliding-window attention, gradient
  checkpointing, which disables the cache) fall back to the plain path; the fallback is logged once per arch.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Literal

import torch

from mmalign.data.pairs import PairBatch
from mmalign.errors import DataError
from mmalign.models.kernels import lean_kernels
from mmalign.models.packed import PackedLayout, packed_attention
from mmalign.models.partial import (
    SUPPORTED_ATTENTION,
    last_layer_queries,
    supports_last_layer_skip,
    text_decoder,
)

__all__ = [
    "SHARED_PREFIX_ARCHES",
    "PrefixCache",
    "base_model_of",
    "concat_to_pair_logps",
    "pair_token_logps",
    "prefix_sharing_supported",
    "sequence_token_logps",
    "stacked_responses",
    "token_logps_from_logits",
    "warn_unsupported",
]

logger = logging.getLogger(__name__)

SHARED_PREFIX_ARCHES: frozenset[str] = frozenset({"llava", "qwen2_vl", "idefics3", "paligemma", "llama"})
"""``config.model_type`` values whose prefix-shared forward is tested equal to the plain one."""

_ONE_BASED_POSITIONS = frozenset({"paligemma"})
_warned: set[str] = set()


def _config(model: Any) -> Any:
    return model.config


def _arch(model: Any) -> str:
    return str(getattr(_config(model), "model_type", type(model).__name__))


def _has_sliding_window(config: Any) -> bool:
    """True when attention is windowed (Qwen configs may set a window with ``use_sliding_window=False``)."""
    configs = [c for c in (config, getattr(config, "text_config", None)) if c is not None]
    return any(
        getattr(c, "sliding_window", None) is not None and getattr(c, "use_sliding_window", True)
        for c in configs
    )


def _unsupported_reason(model: Any) -> str | None:
    arch = _arch(model)
    if arch not in SHARED_PREFIX_ARCHES:
        return f"architecture {arch!r} has no tested prefix-shared layout"
    if _has_sliding_window(_config(model)):
        return "sliding-window attention"
    flag = (
        "is_activation_checkpointing"
        if hasattr(model, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    if getattr(model, flag, False):
        return "gradient checkpointing disables the KV cache"
    return None


def prefix_sharing_supported(model: Any) -> bool:
    """True when :func:`pair_token_logps` can encode the prompt once for this model exactly."""
    return _unsupported_reason(model) is None


def token_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under ``logits``: (..., V) and (...) → (...), at least float32."""
    if logits.dtype.itemsize < 4:  # bf16 / fp16 logits: normalise in float32
        logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_token_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    **image_inputs: Any,
) -> torch.Tensor:
    """(B, T) log-prob of each token given the ones before it; 0 where ``response_mask`` is False.

    input_ids, attention_mask, response_mask: (B, T) (right padding); ``image_inputs``: every other model
    input of the batch (``pixel_values``, ``image_grid_thw``, ``token_type_ids``, …). Column 0 is always 0.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **image_inputs)
    lp = token_logps_from_logits(out.logits[:, :-1], input_ids[:, 1:])  # (B, T-1)
    lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)  # (B, T)
    return torch.where(response_mask.bool(), lp, torch.zeros_like(lp))


def concat_to_pair_logps(token_logps: torch.Tensor, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the plain layout's (2B, T) token log-probs into (chosen (B, Tc), rejected (B, Tr))."""
    b = batch.batch_size
    out = []
    for rows, mask in ((token_logps[:b], batch.chosen_mask), (token_logps[b:], batch.rejected_mask)):
        cols = batch.prompt_lengths[:, None] + torch.arange(mask.shape[1])[None, :]  # (B, Tr)
        cols = cols.clamp(max=rows.shape[1] - 1).to(rows.device)
        picked = rows.gather(1, cols)
        out.append(torch.where(mask.to(rows.device), picked, torch.zeros_like(picked)))
    return out[0], out[1]


def _plain_pair_logps(model: Any, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    device = _device(model)
    c = {k: v.to(device) for k, v in batch.concat.items()}
    token_logps = sequence_token_logps(
        model, c.pop("input_ids"), c.pop("attention_mask"), c.pop("response_mask"), **c
    )  # (2B, T)
    return concat_to_pair_logps(token_logps, batch)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _rope_index_module(model: Any) -> Any:
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    raise DataError(f"{_arch(model)}: no get_rope_index on the model; cannot place M-RoPE positions")


def _valid_response(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: tokens up to each row's last labelled one (the real response tokens)."""
    return mask.flip(-1).long().cumsum(-1).flip(-1) > 0


def stacked_responses(batch: PairBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one width: ids and response mask (2B, W)."""
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    ids = torch.cat(
        [
            _pad_to(batch.chosen_ids, width, batch.pad_token_id),
            _pad_to(batch.rejected_ids, width, batch.pad_token_id),
        ]
    )
    mask = torch.cat([_pad_to(batch.chosen_mask, width, False), _pad_to(batch.rejected_mask, width, False)])
    return ids.to(device), mask.to(device)


def _pad_to(x: torch.Tensor, width: int, value: int | bool) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


class PrefixCache:
    """A batch's prompts (+ images) encoded once, ready to be continued by responses (module docstring).

    The prompt runs through ``model.base_model`` (hidden states only): the LM head is applied to each
    prompt's last position alone (:meth:`last_prompt_logits`), not to all P prompt positions — with ~150
    image tokens per prompt that head was ~40 % of the prompt's compute on the tiny benchmark model.
    ``module`` is what runs the responses (``continue_with``): the model itself (logits) or its
    ``base_model`` (hidden states, for reward and value heads); the cache then holds the responses too
    (``crop`` goes back). Only for models where :func:`prefix_sharing_supported` is True.

    Last-layer skip (opt-in, ``skip_last_layer=True``; :mod:`mmalign.models.partial`): ``prompt_hidden``
    says which prompt outputs the caller reads — ``"all"`` (default), ``"last"`` (each prompt's last real
    token: :meth:`last_prompt_hidden` / :meth:`last_prompt_logits`) or ``"none"`` (only the cache) — and the
    prompt's last decoder layer then computes its output only there (``prompt_output`` is (B, 1 or 0, ·)).
    :meth:`hidden_at` does the same for responses read at one column per row. Models without support
    (:func:`~mmalign.models.partial.supports_last_layer_skip`, logged once) compute every position.
    """

    def __init__(
        self,
        model: Any,
        batch: PairBatch,
        module: Any = None,
        *,
        prompt_hidden: Literal["all", "last", "none"] = "all",
        skip_last_layer: bool = False,
    ) -> None:
        from transformers import DynamicCache

        if prompt_hidden not in ("all", "last", "none"):
            raise DataError(f"prompt_hidden must be 'all', 'last' or 'none', got {prompt_hidden!r}")
        self.model, self.module = model, module if module is not None else model
        self.skip = skip_last_layer and supports_last_layer_skip(model, log=True)
        self.prompt_hidden = prompt_hidden if self.skip else "all"
        self.arch = _arch(model)
        self.device = device = _device(model)
        prompt_ids = batch.prompt_input_ids.to(device)  # (B, P)
        self.prompt_mask = batch.prompt_attention_mask.to(device)  # (B, P)
        self.lengths = batch.prompt_lengths.to(device)  # (B,)
        extras = {k: v.to(device) for k, v in batch.prompt_inputs.items()}

        # Positions: prompt (if not the model's default) and the first position after each prompt.
        prompt_kwargs: dict[str, Any] = {}
        if self.arch == "qwen2_vl" and "image_grid_thw" in extras:
            rope = _rope_index_module(model)
            pos3, _ = rope.get_rope_index(
                prompt_ids,
                extras["mm_token_type_ids"],
                image_grid_thw=extras["image_grid_thw"],
                attention_mask=self.prompt_mask,
            )  # (3, B, P)
            prompt_kwargs["position_ids"] = pos3
            masked = pos3.masked_fill(self.prompt_mask[None] == 0, -1)
            self.next_pos = masked.amax(dim=(0, 2)) + 1  # (B,)
        else:
            self.next_pos = self.lengths + (1 if self.arch in _ONE_BASED_POSITIONS else 0)  # (B,)

        # Last-layer skip: the prompt's last decoder layer only fills the cache (and, for "last", computes
        # the output at each prompt's last real token); the output is then (B, 1 or 0, ·).
        keep = (
            (self.lengths - 1)[:, None]
            if self.prompt_hidden == "last"
            else self.lengths.new_zeros(len(self.lengths), 0)
        )
        with last_layer_queries(model, keep) if self.prompt_hidden != "all" else nullcontext():
            self.prompt_output = _prompt_module(model)(
                input_ids=prompt_ids,
                attention_mask=self.prompt_mask,
                past_key_values=DynamicCache(config=_config(model)),
                use_cache=True,
                **prompt_kwargs,
                **extras,
            )
        self.cache = self.prompt_output.past_key_values

    def _at_last_prompt_token(self, out: torch.Tensor) -> torch.Tensor:
        """(B, P or 1, X) prompt outputs → (B, X) at each prompt's last real token."""
        if self.prompt_hidden == "none":
            raise DataError("PrefixCache(prompt_hidden='none') computed no prompt outputs")
        if self.prompt_hidden == "last":
            return out[:, 0]
        return out[torch.arange(out.shape[0], device=self.device), self.lengths - 1]

    def last_prompt_hidden(self) -> torch.Tensor:
        """(B, H) final hidden state at each prompt's last real token."""
        return self._at_last_prompt_token(_hidden_of(self.prompt_output))

    def last_prompt_logits(self) -> torch.Tensor:
        """(B, V) next-token logits after each prompt (they predict the first response token)."""
        if _prompt_module(self.model) is self.model:
            return self._at_last_prompt_token(self.prompt_output.logits)
        return self.model.get_output_embeddings()(self.last_prompt_hidden())

    def continue_with(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> Any:
        """Run responses ``ids``/``mask`` (N, W) on the cache laid out as prompt ``rows`` (N,)."""
        n, width = ids.shape
        valid = _valid_response(mask)  # (N, W)
        attn = torch.cat([self.prompt_mask[rows], valid.long()], dim=1)  # (N, P + W)
        pos = self.next_pos[rows][:, None] + torch.arange(width, device=self.device)[None, :]  # (N, W)
        kwargs: dict[str, Any] = {}
        if self.arch == "qwen2_vl":
            pos = pos[None].expand(3, n, width)  # (3, N, W): text continues on every M-RoPE axis
        if self.arch == "paligemma":
            kwargs["token_type_ids"] = torch.ones_like(ids)  # causal suffix
        return self.module(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )

    def packing_supported(self) -> bool:
        """True when :meth:`continue_packed` applies: a text decoder whose attention is ``sdpa``/``eager``."""
        decoder = text_decoder(self.model)
        impl = getattr(getattr(decoder, "config", None), "_attn_implementation", None)
        return decoder is not None and impl in SUPPORTED_ATTENTION

    def continue_packed(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        rows: torch.Tensor,
        *,
        query_cols: torch.Tensor | None = None,
    ) -> tuple[Any, PackedLayout]:
        """Run responses ``ids``/``mask`` (N, W) on prompt ``rows`` (N,) without padding
        (:mod:`mmalign.models.packed`): their real tokens form one (1, T) row. Returns the module's output on
        that row and the layout (``layout.unpack`` puts packed values back to (N, W)). The cache is read, not
        extended. ``query_cols`` (N,): with the last-layer skip, the one column per row whose output is
        wanted; the output then has those N positions only, in row order."""
        valid = _valid_response(mask)  # (N, W)
        layers = self.cache.layers
        layout = PackedLayout.build(
            [layer.keys for layer in layers],
            [layer.values for layer in layers],
            self.prompt_mask,
            rows,
            valid,
        )
        width = ids.shape[1]
        packed_ids = layout.pack(ids)[None]  # (1, T)
        pos = self.next_pos[rows][:, None] + torch.arange(width, device=self.device)[None, :]  # (N, W)
        pos = layout.pack(pos)[None]  # (1, T)
        kwargs: dict[str, Any] = {}
        if self.arch == "qwen2_vl":
            pos = pos[None].expand(3, 1, pos.shape[1])  # (3, 1, T)
        if self.arch == "paligemma":
            kwargs["token_type_ids"] = torch.ones_like(packed_ids)  # causal suffix
        skip = nullcontext()
        if query_cols is not None:
            layout.query_positions = layout.index[torch.arange(len(rows), device=self.device), query_cols]
            if self.skip:
                skip = last_layer_queries(self.model, layout.query_positions[None])  # type: ignore[assignment]
        with packed_attention(text_decoder(self.model).config, layout), skip:
            out = self.module(input_ids=packed_ids, position_ids=pos, use_cache=False, **kwargs)
        return out, layout

    def packed_hidden_at(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`hidden_at` through :meth:`continue_packed`: (N, H) final hidden states of responses
        ``ids``/``mask`` (N, W) at columns ``cols`` (N,), one padding-free continuation for all rows."""
        out, layout = self.continue_packed(ids, mask, rows, query_cols=cols % ids.shape[1])
        hidden = _hidden_of(out)[0]  # (N, H) with the last-layer skip, else (T, H)
        return hidden if self.skip else hidden[layout.query_positions]

    def hidden_at(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """(N, H) final hidden states of responses ``ids``/``mask`` (N, W) at columns ``cols`` (N,) (negative
        columns count from the end), continuing prompt ``rows``. ``module`` must return hidden states. With
        the last-layer skip only those columns go through the last decoder layer."""
        cols = cols % ids.shape[1]
        if self.skip:
            with last_layer_queries(self.model, cols[:, None]):
                return _hidden_of(self.continue_with(ids, mask, rows))[:, 0]
        hidden = _hidden_of(self.continue_with(ids, mask, rows))  # (N, W, H)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), cols]

    def crop(self, width: int) -> None:
        """Drop the last ``width`` cached positions (back to the prompt after a continuation)."""
        self.cache.crop(-int(width))

    def reorder(self, rows: torch.Tensor) -> None:
        """Lay the cache out as prompt ``rows`` (e.g. ``[0..B-1, 0..B-1]`` for two responses per prompt)."""
        self.cache.reorder_cache(rows)


def base_model_of(model: Any) -> Any:
    """The transformer under the LM head (``LlavaModel``, ``LlamaModel``, …): it returns hidden states, not
    logits. Sees through a peft ``PeftModel`` (whose own ``base_model`` is the LoRA wrapper)."""
    hf = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return hf.base_model


def _prompt_module(model: Any) -> Any:
    """What encodes prompts: the base model, unless the LM head is more than a linear map of its output
    (Gemma-2 style logit soft-capping), where the full model keeps the logits exact."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text, "final_logit_softcapping", None) is not None:
        return model
    return base_model_of(model)


def _hidden_of(output: Any) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise DataError("the prompt forward returned no last_hidden_state")
    return hidden


def warn_unsupported(model: Any) -> bool:
    """True (after logging once per architecture) when the prefix-shared forward is unavailable."""
    reason = _unsupported_reason(model)
    if reason is None:
        return False
    arch = _arch(model)
    if arch not in _warned:
        _warned.add(arch)
        logger.warning("%s: prefix-shared pair forward unavailable (%s); using the plain path", arch, reason)
    return True


def pair_token_logps(
    model: Any,
    batch: PairBatch,
    *,
    share_prefix: bool = True,
    mode: Literal["packed", "sequential", "batched"] = "packed",
    skip_last_layer: bool = True,
    lean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs of the chosen (B, Tc) and rejected (B, Tr) responses (0 outside their masks).

    ``share_prefix``: encode prompt + images once and reuse the KV cache (see the module docstring); when the
    model does not support it exactly, the plain concatenated forward runs instead (logged once per arch).
    ``mode``: ``"sequential"`` runs chosen, crops the cache back to the prompt, then runs rejected;
    ``"batched"`` runs both responses in one call on a cache duplicated to 2B rows.
    ``skip_last_layer`` (with ``share_prefix``): the prompt's last decoder layer computes only its K/V and the
    output at each prompt's last real token (:mod:`mmalign.models.partial`; same result up to round-off);
    ignored, with a one-time log, for models where :func:`~mmalign.models.partial.supports_last_layer_skip`
    is False.
    ``lean``: run the forward with :func:`~mmalign.models.kernels.lean_kernels` (leaner RMSNorm and rotary
    autograd for Llama/Qwen2-family decoders; same values).
    """
    with lean_kernels(lean):
        return _pair_token_logps(model, batch, share_prefix, mode, skip_last_layer)


def _pair_token_logps(
    model: Any,
    batch: PairBatch,
    share_prefix: bool,
    mode: Literal["packed", "sequential", "batched"],
    skip_last_layer: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not share_prefix or warn_unsupported(model):
        return _plain_pair_logps(model, batch)
    if mode not in ("packed", "sequential", "batched"):
        raise DataError(f"mode must be 'packed', 'sequential' or 'batched', got {mode!r}", field="mode")

    prefix = PrefixCache(model, batch, prompt_hidden="last", skip_last_layer=skip_last_layer)
    last = prefix.last_prompt_logits()  # (B, V): predicts response token 0

    def run(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Continue the cache (laid out as ``rows``) with response ids/mask (N, W) → (N, W) logps."""
        logits = prefix.continue_with(ids, mask, rows).logits  # (N, W, V)
        first = token_logps_from_logits(last[rows], ids[:, 0])[:, None]  # (N, 1)
        rest = token_logps_from_logits(logits[:, :-1], ids[:, 1:])  # (N, W-1)
        lp = torch.cat([first, rest], dim=1)  # (N, W)
        return torch.where(mask, lp, torch.zeros_like(lp))

    if mode == "packed" and prefix.packing_supported():
        return _packed_pair_logps(prefix, last, batch)
    device = prefix.device
    chosen_ids, chosen_mask = batch.chosen_ids.to(device), batch.chosen_mask.to(device)
    rejected_ids, rejected_mask = batch.rejected_ids.to(device), batch.rejected_mask.to(device)
    rows = torch.arange(batch.batch_size, device=device)
    if mode != "batched":
        chosen = run(chosen_ids, chosen_mask, rows)
        prefix.crop(chosen_ids.shape[1])
        rejected = run(rejected_ids, rejected_mask, rows)
        return chosen, rejected
    b = batch.batch_size
    ids, mask = stacked_responses(batch, device)  # (2B, W)
    both = torch.cat([rows, rows])  # (2B,)
    prefix.reorder(both)
    lp = run(ids, mask, both)  # (2B, W)
    return lp[:b, : chosen_ids.shape[1]], lp[b:, : rejected_ids.shape[1]]


def _packed_pair_logps(
    prefix: PrefixCache, last: torch.Tensor, batch: PairBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both responses of every pair in one padding-free continuation (:mod:`mmalign.models.packed`)."""
    b = batch.batch_size
    ids, mask = stacked_responses(batch, prefix.device)  # (2B, W)
    width = ids.shape[1]
    rows = torch.arange(b, device=prefix.device).repeat(2)  # (2B,)
    out, layout = prefix.continue_packed(ids, mask, rows)
    packed_ids = layout.pack(ids)  # (T,)
    # Packed position p predicts packed token p + 1 (across a segment end the value is never read).
    following = token_logps_from_logits(out.logits[0, :-1], packed_ids[1:])  # (T-1,)
    following = torch.cat([following, following.new_zeros(1)])  # (T,)
    rest = layout.unpack(following, width)  # (2B, W): [s, j] = log p(token j + 1 | ≤ j)
    first = token_logps_from_logits(last[rows], ids[:, 0])[:, None]  # (2B, 1)
    lp = torch.cat([first, rest[:, :-1]], dim=1)  # (2B, W)
    lp = torch.where(mask, lp, torch.zeros_like(lp))
    return lp[:b, : batch.chosen_ids.shape[1]], lp[b:, : batch.rejected_ids.shape[1]]
