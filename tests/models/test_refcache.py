"""Reference log-prob cache: values equal a direct pair forward, a second run (also from a fresh cache object
reading the folder) does no forward, keys follow content (weights, images, responses), not ids; files are
safetensors + a JSON index written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from mmalign.data.pairs import PairCollator
from mmalign.data.schema import ImageRef, Message, PreferencePair
from mmalign.errors import DataError
from mmalign.models.logprobs import pair_token_logps
from mmalign.models.refcache import (
    INDEX_NAME,
    ReferenceCache,
    batch_reference_logps,
    compute_reference_logps,
    model_fingerprint,
    pair_keys,
)

ONE_THREAD = True  # see tests/conftest.py


@pytest.fixture(scope="module")
def llava() -> tuple[Any, Any]:
    from mmalign.models.tiny import build_tiny

    return build_tiny("llava", image_size=32, patch_size=8, text_hidden=64, text_layers=2, vision_hidden=32)


def image(color: tuple[int, int, int]) -> ImageRef:
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((4, 4, 27, 27), fill=color)
    return ImageRef.from_pil(img)


def pair(pid: str, color: tuple[int, int, int], chosen: str = "There is a red circle.") -> PreferencePair:
    return PreferencePair(
        id=pid,
        images=[image(color)],
        prompt=[Message.user("Describe the image.", 1)],
        chosen=chosen,
        rejected="There is a blue square in the top left.",
    )


PAIRS = [
    pair("a", (220, 20, 20)),
    pair("b", (20, 220, 20), "There is a small green circle."),
    pair("c", (9, 9, 9)),
]


class Counter:
    """Counts forward passes of a model's text decoder (a forward pre-hook): one per prompt or response
    forward, whether it runs through the full model or its base model."""

    def __init__(self, model: Any) -> None:
        self.n = 0
        self.handle = model.get_decoder().register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.n += 1


def test_cached_values_equal_a_direct_pair_forward_and_a_second_run_does_no_forward(
    llava: tuple[Any, Any], tmp_path: Path
) -> None:
    model, proc = llava
    collator = PairCollator(proc)
    counter = Counter(model)
    try:
        first = compute_reference_logps(
            model, PAIRS, collator, ReferenceCache(tmp_path / "ref"), batch_size=2
        )
        assert first.n_computed == 3 and counter.n == 4  # 2 batches × (prompt, packed responses)
        batch = collator(PAIRS)
        assert batch is not None
        with torch.no_grad():
            want_c, want_r = pair_token_logps(model, batch)
        torch.testing.assert_close(first.chosen, want_c, atol=1e-5, rtol=0)
        torch.testing.assert_close(first.rejected, want_r, atol=1e-5, rtol=0)
        assert first.ids == ["a", "b", "c"] and first.kept.all()
        torch.testing.assert_close(first.sequence_logps()[0], want_c.sum(-1), atol=1e-5, rtol=0)

        counter.n = 0
        again = compute_reference_logps(
            model, PAIRS, collator, ReferenceCache(tmp_path / "ref"), batch_size=3
        )
        assert counter.n == 0 and again.n_computed == 0
        assert torch.equal(again.chosen, first.chosen) and torch.equal(again.rejected, first.rejected)

        # One new pair among cached ones: only it runs (a prompt and a packed-responses forward).
        more = [*PAIRS, pair("d", (100, 100, 0))]
        third = compute_reference_logps(model, more, collator, ReferenceCache(tmp_path / "ref"), batch_size=4)
        assert third.n_computed == 1 and counter.n == 2
        assert torch.equal(third.chosen[:3, : first.chosen.shape[1]], first.chosen)
    finally:
        counter.handle.remove()


def test_files_are_safetensors_shards_and_a_json_index_without_temporaries(
    llava: tuple[Any, Any], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    model, proc = llava
    cache = ReferenceCache(tmp_path / "ref")
    compute_reference_logps(model, PAIRS, PairCollator(proc), cache, batch_size=2)
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == [INDEX_NAME, "shard_00000.safetensors", "shard_00001.safetensors"]
    index = json.loads((tmp_path / "ref" / INDEX_NAME).read_text())
    assert index["format"] == 1 and len(index["keys"]) == 3 and len(cache) == 3
    shard = load_file(str(tmp_path / "ref" / "shard_00000.safetensors"))
    assert len(shard) == 4 and all(t.dtype == torch.float32 and t.dim() == 1 for t in shard.values())
    # shard 0 holds pairs a and b: "There is a red circle . <|end|>" (7) and "… a small green circle …" (8)
    in_first = [k for k, v in index["keys"].items() if v == "shard_00000.safetensors"]
    assert sorted(shard[f"{k}.chosen"].numel() for k in in_first) == [7, 8]
    assert all(k in cache for k in index["keys"])


def test_keys_follow_content_weights_and_images_not_ids(llava: tuple[Any, Any]) -> None:
    model, proc = llava
    collator = PairCollator(proc)
    fp = model_fingerprint(model)
    base = collator([PAIRS[0]])
    renamed = collator([PAIRS[0].model_copy(update={"id": "other"})])
    other_image = collator([pair("a", (221, 20, 20))])
    other_text = collator([pair("a", (220, 20, 20), "There is a red square.")])
    assert base and renamed and other_image and other_text
    key = pair_keys(base, fp)[0]
    assert pair_keys(renamed, fp)[0] == key
    assert pair_keys(collator([PAIRS[1], PAIRS[0]]), fp)[1] == key  # padding of the batch does not matter
    assert pair_keys(other_image, fp)[0] != key
    assert pair_keys(other_text, fp)[0] != key
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        param = next(model.parameters())
        param[0].add_(1e-3)
        try:
            assert model_fingerprint(model) != fp
        finally:
            param[0].sub_(1e-3)
    assert model_fingerprint(model) == fp


def test_batch_reference_logps_fills_the_batch_layout_once(llava: tuple[Any, Any], tmp_path: Path) -> None:
    model, proc = llava
    batch = PairCollator(proc)(PAIRS)
    assert batch is not None
    cache = ReferenceCache(tmp_path / "ref")
    counter = Counter(model)
    try:
        c1, r1 = batch_reference_logps(model, batch, cache)
        assert counter.n == 2 and c1.shape == batch.chosen_ids.shape and r1.shape == batch.rejected_ids.shape
        c2, r2 = batch_reference_logps(model, batch, cache)
        assert counter.n == 2 and torch.equal(c1, c2) and torch.equal(r1, r2)
    finally:
        counter.handle.remove()
    assert bool((c1[~batch.chosen_mask] == 0).all()) and bool((c1[batch.chosen_mask] < 0).all())
    cache.flush()
    assert len(ReferenceCache(tmp_path / "ref")) == 3


def test_dropped_pairs_give_zero_rows_and_bad_indexes_raise(llava: tuple[Any, Any], tmp_path: Path) -> None:
    model, proc = llava
    long_pair = pair("long", (1, 2, 3), "There is a red circle. " * 6)
    collator = PairCollator(proc, max_length=40, truncation="drop")
    got = compute_reference_logps(model, [PAIRS[0], long_pair], collator, ReferenceCache(tmp_path / "r"))
    assert got.kept.tolist() == [True, False] and float(got.chosen[1].abs().sum()) == 0.0
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / INDEX_NAME).write_text("{not json")
    with pytest.raises(DataError, match=INDEX_NAME):
        ReferenceCache(tmp_path / "bad")
    (tmp_path / "bad" / INDEX_NAME).write_text('{"format": 99, "keys": {}}')
    with pytest.raises(DataError, match="format"):
        ReferenceCache(tmp_path / "bad")
