"""Reference-model token log-probs of preference pairs, computed once and cached on disk by content hash.

DPO-family losses need the frozen reference model's log-probs of every chosen/rejected response. They never
change during a run, so :func:`compute_reference_logps` computes the missing ones (with the prefix-shared
pair forward, images included — unlike TRL's precompute, which is text-only) and stores them in a
:class:`ReferenceCache`:

* one key per pair: sha256 of the model identity (:func:`model_fingerprint`: config without paths/versions +
  a weights fingerprint), the rendered prompt ids, both responses' ids and masks, and the image bytes;
* values: the chosen and rejected token log-probs, each (R,) over the response tokens of
  :class:`mmalign.data.pairs.PairBatch` (0 on unlabelled tokens);
* storage: a folder with ``shard_XXXXX.safetensors`` files (tensors ``<key>.chosen`` / ``<key>.rejected``)
  and ``index.json`` (key → shard). Every ``flush`` writes one new shard then the index, both atomically
  (temporary file + ``os.replace``), so an interrupted run loses at most the unflushed entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.atomic import atomic_write_json
from mmalign.data.pairs import PairBatch, PairCollator
from mmalign.data.schema import PreferencePair
from mmalign.errors import DataError
from mmalign.models.logprobs import pair_token_logps

__all__ = [
    "INDEX_NAME",
    "ReferenceCache",
    "ReferenceLogps",
    "batch_reference_logps",
    "compute_reference_logps",
    "model_fingerprint",
    "pair_keys",
]

INDEX_NAME = "index.json"
_FORMAT = 1
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "_commit_hash"})
_SAMPLES_PER_TENSOR = 4096


def _stable_config(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable_config(v) for k, v in sorted(value.items()) if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list | tuple):
        return [_stable_config(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def model_fingerprint(model: Any) -> str:
    """sha256 of the model's config (without paths and library versions) and a weights fingerprint.

    The weights fingerprint covers every parameter and buffer by name, shape and dtype, plus up to
    ``4096`` evenly strided values and the float64 sum of each (so any real update changes it; hashing every
    byte of a large model would cost a full pass over memory).
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    h.update(json.dumps(_stable_config(cfg), sort_keys=True, default=str).encode())
    with torch.no_grad():
        tensors = [*model.named_parameters(), *model.named_buffers()]
        for name, t in sorted(tensors, key=lambda item: item[0]):
            flat = t.detach().reshape(-1).cpu()
            step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
            sample = flat[::step].to(torch.float64)
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{float(flat.double().sum())!r}".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def pair_keys(batch: PairBatch, model_fp: str) -> list[str]:
    """The cache key of each pair of ``batch`` under the model with fingerprint ``model_fp``."""
    keys = []
    for b in range(batch.batch_size):
        h = hashlib.sha256()
        h.update(f"mmalign-refcache-{_FORMAT}:{model_fp}:".encode())
        n = int(batch.prompt_lengths[b])
        parts = [batch.prompt_input_ids[b, :n]]
        for ids, mask in (
            (batch.chosen_ids[b], batch.chosen_mask[b]),
            (batch.rejected_ids[b], batch.rejected_mask[b]),
        ):
            real = int(_before_last(mask).sum())  # the response without the batch's padding
            parts += [ids[:real], mask[:real]]
        for part in parts:
            h.update(b"|" + part.to(torch.int64).numpy().tobytes())
        h.update(f"|{batch.image_digests[b] if batch.image_digests else ''}".encode())
        keys.append(h.hexdigest())
    return keys


def _before_last(mask: torch.Tensor) -> torch.Tensor:
    """(T,) bool: positions up to the last True (the real response tokens, padding excluded)."""
    return mask.flip(-1).long().cumsum(-1).flip(-1) > 0


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ReferenceCache:
    """Reference token log-probs by pair key, in a folder of safetensors shards + ``index.json``.

    ``put`` keeps entries in memory until ``flush`` (called by :func:`compute_reference_logps` after each
    batch) writes them as a new shard. ``get`` returns ``(chosen (Rc,), rejected (Rr,))`` float32 or ``None``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: the reference cache must be a folder, found a file")
        self._index: dict[str, str] = {}  # key -> shard file name
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}  # shard -> its tensors
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        index_path = self.path / INDEX_NAME
        if index_path.exists():
            try:
                data = json.loads(index_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise DataError(f"{index_path}:{err.lineno}: not valid JSON: {err.msg}") from None
            if (
                not isinstance(data, dict)
                or data.get("format") != _FORMAT
                or not isinstance(data.get("keys"), dict)
            ):
                raise DataError(f"{index_path}: format: expected a reference-cache index of format {_FORMAT}")
            self._index = {str(k): str(v) for k, v in data["keys"].items()}

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def __contains__(self, key: object) -> bool:
        return key in self._pending or key in self._index

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key in self._pending:
            return self._pending[key]
        shard = self._index.get(key)
        if shard is None:
            return None
        if shard not in self._loaded:
            from safetensors.torch import load_file

            shard_path = self.path / shard
            if not shard_path.exists():
                raise DataError(f"{self.path / INDEX_NAME}: keys.{key}: shard {shard} is missing")
            self._loaded[shard] = load_file(str(shard_path))
        tensors = self._loaded[shard]
        return tensors[f"{key}.chosen"], tensors[f"{key}.rejected"]

    def put(self, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """Store one pair's token log-probs (each 1-D); written to disk by the next ``flush``."""
        if chosen.dim() != 1 or rejected.dim() != 1:
            raise DataError(
                f"reference log-probs must be 1-D per side, got {tuple(chosen.shape)}, "
                f"{tuple(rejected.shape)}"
            )
        self._pending[key] = (
            chosen.detach().to("cpu", torch.float32).contiguous(),
            rejected.detach().to("cpu", torch.float32).contiguous(),
        )

    def flush(self) -> None:
        """Write pending entries as one new shard, then the index (each atomically)."""
        if not self._pending:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        n = len({*self._index.values()})
        while (shard := f"shard_{n:05d}.safetensors") in self._index.values() or (self.path / shard).exists():
            n += 1
        tensors: dict[str, torch.Tensor] = {}
        for key, (c, r) in self._pending.items():
            tensors[f"{key}.chosen"], tensors[f"{key}.rejected"] = c, r
        _atomic_save_safetensors(tensors, self.path / shard)
        self._loaded[shard] = tensors
        for key in self._pending:
            self._index[key] = shard
        self._pending = {}
        atomic_write_json(self.path / INDEX_NAME, {"format": _FORMAT, "keys": self._index})


def _pad_stack(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros((len(rows), width), dtype=torch.float32)  # (N, width)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def _response_lengths(mask: torch.Tensor) -> list[int]:
    """(B, T) labelled mask → real response length per row (up to the last labelled token)."""
    return [int(n) for n in _before_last(mask).sum(-1)]


def _store(
    cache: ReferenceCache, keys: Sequence[str], batch: PairBatch, model: Any, share_prefix: bool
) -> None:
    """Run ``batch`` through ``model`` without gradients and store every row under ``keys``."""
    with torch.no_grad():
        c, r = pair_token_logps(model, batch, share_prefix=share_prefix)  # (B, Tc), (B, Tr)
    lc, lr = _response_lengths(batch.chosen_mask), _response_lengths(batch.rejected_mask)
    for i, key in enumerate(keys):
        cache.put(key, c[i, : lc[i]].cpu(), r[i, : lr[i]].cpu())


def batch_reference_logps(
    model: Any,
    batch: PairBatch,
    cache: ReferenceCache,
    *,
    model_fp: str | None = None,
    share_prefix: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference token log-probs of one batch, (B, Tc) and (B, Tr) in its layout. When a pair is missing
    from ``cache`` the whole batch runs through ``model`` (no gradients) and is stored (not flushed)."""
    fp = model_fp if model_fp is not None else model_fingerprint(model)
    keys = pair_keys(batch, fp)
    if any(k not in cache for k in keys):
        _store(cache, keys, batch, model, share_prefix)
    chosen, rejected = [], []
    for k in keys:
        got = cache.get(k)
        assert got is not None
        chosen.append(got[0])
        rejected.append(got[1])
    return _pad_stack(chosen, batch.chosen_ids.shape[1]), _pad_stack(rejected, batch.rejected_ids.shape[1])


def _kept_positions(chunk: Sequence[PreferencePair], ids: Sequence[str]) -> list[int]:
    """Index in ``chunk`` of each kept pair (the collator keeps pairs in order, dropping some)."""
    out, i = [], 0
    for pid in ids:
        while chunk[i].id != pid:
            i += 1
        out.append(i)
        i += 1
    return out


@dataclass
class ReferenceLogps:
    """Reference token log-probs of a list of pairs, in pair order (rows of dropped pairs are zero)."""

    ids: list[str]
    chosen: torch.Tensor  # (N, Tc) float32, 0 outside the response's labelled tokens
    rejected: torch.Tensor  # (N, Tr)
    kept: torch.Tensor  # (N,) bool, False for pairs the collator dropped (too long)
    n_computed: int = 0
    """How many pairs were run through the model (the rest came from the cache)."""

    def sequence_logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs per pair: (N,), (N,)."""
        return self.chosen.sum(-1), self.rejected.sum(-1)


def compute_reference_logps(
    model: Any,
    pairs: Sequence[PreferencePair],
    collator: PairCollator,
    cache: ReferenceCache,
    batch_size: int = 8,
    *,
    share_prefix: bool = True,
) -> ReferenceLogps:
    """Fill ``cache`` with every pair's reference log-probs that is missing and return all, in pair order.

    Pairs are collated ``batch_size`` at a time; a batch whose pairs are all cached runs no forward. The cache
    is flushed after each batch that computed something.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
    fp = model_fingerprint(model)
    chosen: list[torch.Tensor | None] = [None] * len(pairs)
    rejected: list[torch.Tensor | None] = [None] * len(pairs)
    computed = 0
    for start in range(0, len(pairs), batch_size):
        chunk = list(pairs[start : start + batch_size])
        batch = collator(chunk)
        if batch is None:
            continue
        keys = pair_keys(batch, fp)
        where = _kept_positions(chunk, batch.ids)
        missing = [b for b, k in enumerate(keys) if k not in cache]
        if missing:
            todo = batch if len(missing) == len(keys) else collator([chunk[where[b]] for b in missing])
            assert todo is not None
            _store(cache, [keys[b] for b in missing], todo, model, share_prefix)
            computed += len(missing)
            cache.flush()
        for b, key in enumerate(keys):
            got = cache.get(key)
            assert got is not None
            chosen[start + where[b]], rejected[start + where[b]] = got
    width_c = max((t.numel() for t in chosen if t is not None), default=0)
    width_r = max((t.numel() for t in rejected if t is not None), default=0)
    empty = torch.zeros(0)
    return ReferenceLogps(
        ids=[p.id for p in pairs],
        chosen=_pad_stack([t if t is not None else empty for t in chosen], width_c),
        rejected=_pad_stack([t if t is not None else empty for t in rejected], width_r),
        kept=torch.tensor([t is not None for t in chosen], dtype=torch.bool),
        n_computed=computed,
    )
