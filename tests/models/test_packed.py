"""The packed layout (responses without padding, attention per prompt row): exact indices and masks on a
hand-made layout, pack/unpack round trips, clear errors, and the attention switch being scoped. Equality of
packed forwards with the plain forward is tested in test_logprobs.py / test_heads.py / test_partial.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _models_kit import tiny_model as build

from mmalign.errors import DataError
from mmalign.models.packed import PACKED_ATTENTION, PackedLayout, _packed_attention_forward, packed_attention
from mmalign.models.partial import text_decoder


def layout() -> PackedLayout:
    """Two prompt rows (row 1 has a padded last prompt token), four segments: rows 0, 1, 0, 1 with
    lengths 2, 1, 3, 1."""
    valid = torch.tensor(
        [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]],
        dtype=torch.bool,
    )
    prompt_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kv = [torch.zeros(2, 1, 3, 4)]
    return PackedLayout.build(kv, kv, prompt_mask, torch.tensor([0, 1, 0, 1]), valid)


def test_layout_indices_groups_and_mask_are_exact() -> None:
    lay = layout()
    assert lay.total == 7 and lay.groups == 2
    # packed order: segment 0 → 0, 1; segment 1 → 2; segment 2 → 3, 4, 5; segment 3 → 6
    assert lay.index.tolist() == [[0, 1, 0], [2, 0, 0], [3, 4, 5], [6, 0, 0]]
    # attention slots (row * G + group) * L + j with L = 3: seg 0 (row 0, g 0) → 0, 1; seg 1 (row 1, g 0)
    # → 6; seg 2 (row 0, g 1) → 3, 4, 5; seg 3 (row 1, g 1) → 9
    assert lay.block_of.tolist() == [0, 1, 6, 3, 4, 5, 9]
    assert lay.block_index.tolist() == [0, 1, 0, 3, 4, 5, 2, 0, 0, 6, 0, 0]
    assert lay.mask.shape == (2, 1, 6, 3 + 6)
    # row 0, query slot (g 1, j 1) = packed token 4: all 3 prompt tokens, then own group slots 0..1 only
    assert lay.mask[0, 0, 4].int().tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 0]
    # row 1, query slot (g 0, j 0) = packed token 2: prompt without its padding, itself only
    assert lay.mask[1, 0, 0].int().tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0]


def test_pack_and_unpack_round_trip_and_fill_outside_segments() -> None:
    lay = layout()
    per_row = torch.arange(16.0).reshape(4, 4)  # (S, W)
    packed = lay.pack(per_row)
    assert packed.tolist() == [0.0, 1.0, 4.0, 8.0, 9.0, 10.0, 12.0]
    back = lay.unpack(packed, width=5, fill=-1.0)
    assert back.tolist() == [
        [0.0, 1.0, -1.0, -1.0, -1.0],
        [4.0, -1.0, -1.0, -1.0, -1.0],
        [8.0, 9.0, 10.0, -1.0, -1.0],
        [12.0, -1.0, -1.0, -1.0, -1.0],
    ]
    blocks = lay.to_blocks(torch.arange(7.0).reshape(1, 1, 7, 1))  # (B, H, G * L, D)
    assert blocks[:, 0, :, 0].tolist() == [[0, 1, 0, 3, 4, 5], [2, 0, 0, 6, 0, 0]]


@pytest.mark.parametrize(
    ("valid", "rows", "message"),
    [
        ([[1, 0], [0, 0]], [0, 1], "has no tokens"),
        ([[1, 0], [0, 1]], [0, 1], "must be a prefix"),
        ([[1, 0], [1, 1]], [0, 2], "rows outside the 2 cached prompts"),
    ],
)
def test_bad_layouts_are_refused_with_a_clear_error(
    valid: list[list[int]], rows: list[int], message: str
) -> None:
    kv = [torch.zeros(2, 1, 3, 4)]
    with pytest.raises(DataError, match=message):
        PackedLayout.build(
            kv, kv, torch.ones(2, 3), torch.tensor(rows), torch.tensor(valid, dtype=torch.bool)
        )


def test_attention_switch_is_scoped_to_the_text_decoder_and_restored() -> None:
    model, _ = build("llava")
    text = text_decoder(model).config
    vision_before = model.config.vision_config._attn_implementation
    before = text._attn_implementation
    with packed_attention(text, layout()):
        assert text._attn_implementation == PACKED_ATTENTION
        assert model.config.vision_config._attn_implementation == vision_before
    assert text._attn_implementation == before

    class Attn:
        layer_idx = 0
        training = False

    q = torch.zeros(1, 1, 7, 4)
    with pytest.raises(DataError, match="outside"):
        _packed_attention_forward(Attn(), q, q, q, None)


def test_packed_attention_equals_a_per_segment_reference() -> None:
    """The attention function itself, against a loop over segments with explicit softmax."""
    torch.manual_seed(0)
    lay = layout()
    keys = [torch.randn(2, 1, 3, 4)]
    values = [torch.randn(2, 1, 3, 4)]
    lay.keys, lay.values = keys, values
    q, k, v = (torch.randn(1, 1, 7, 4) for _ in range(3))

    class Attn:
        layer_idx = 0
        training = False

    attn: Any = Attn()
    with packed_attention(text_decoder(build("llama")[0]).config, lay):
        got, _ = _packed_attention_forward(attn, q, k, v, None, scaling=0.5)  # (1, T, H, D)
    segments = [(0, [0, 1]), (1, [2]), (0, [3, 4, 5]), (1, [6])]
    for row, tokens in segments:
        n_prompt = int(lay.prompt_mask[row].sum())
        for i, t in enumerate(tokens):
            ks = torch.cat([keys[0][row, 0, :n_prompt], k[0, 0, tokens[: i + 1]]])  # (S, D)
            vs = torch.cat([values[0][row, 0, :n_prompt], v[0, 0, tokens[: i + 1]]])
            weights = torch.softmax(q[0, 0, t] @ ks.T * 0.5, dim=-1)
            torch.testing.assert_close(got[0, t, 0], weights @ vs, atol=1e-6, rtol=0)
    # the last-layer-skip path: queries at packed positions 1 and 6 only
    lay.query_positions = torch.tensor([1, 6])
    with packed_attention(text_decoder(build("llama")[0]).config, lay):
        some, _ = _packed_attention_forward(attn, q[:, :, [1, 6]], k, v, None, scaling=0.5)
    torch.testing.assert_close(some[0], got[0, [1, 6]], atol=1e-6, rtol=0)
