from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from mmalign.world.grammar import CAPTION_PROMPT, caption
from mmalign.world.questions import (
    DECEPTIVE_CATEGORIES,
    make_deceptive,
    make_dialogue,
    make_questions,
    play_along_answer,
)
from mmalign.world.scene import WorldConfig, make_scene
from mmalign.world.textworld import make_arith_problems, make_fol_pairs
from mmalign.world.tokenizer import SPECIAL_TOKENS, build_tokenizer, chat_template, world_texts


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer()


def _fresh_world_strings() -> list[str]:
    """World strings from seeds the vocabulary sample never used."""
    rng = random.Random(12345)
    out: list[str] = []
    for grid in (2, 3):
        cfg = WorldConfig(grid=grid, n_shapes=6, n_colors=6, max_objects=4, text_prob=0.5)
        for i in range(300):
            scene = make_scene(777, i, cfg)
            out += [caption(scene), caption(scene, detailed=True)]
            out += [t for q in make_questions(scene, rng, config=cfg) for t in (q.text, q.answer)]
            for cat in DECEPTIVE_CATEGORIES:
                if (dq := make_deceptive(scene, rng, cat, cfg)) is not None:
                    out += [dq.text, dq.answer, play_along_answer(dq)]
            out += [t.answer for t in make_dialogue(scene, rng, cfg).turns]
    out += [t for p in make_fol_pairs(300, seed=99) for t in (p.sentence, p.formula)]
    out += [t for p in make_arith_problems(300, seed=99) for t in (p.question, p.solution)]
    return out


def test_round_trip_is_exact_and_has_no_unk_on_world_strings(tok: Any) -> None:
    strings = _fresh_world_strings()
    assert len(strings) > 5000
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.unk_token_id not in ids, s
        assert tok.decode(ids) == s


def test_one_token_per_word_with_space_markers_and_separate_punctuation(tok: Any) -> None:
    ids = tok.encode("There is an orange star in the center.", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "There",
        "▁is",
        "▁an",
        "▁orange",
        "▁star",
        "▁in",
        "▁the",
        "▁center",
        ".",
    ]
    ids = tok.encode("∀x (Red(x) → Circle(x))", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids)[:5] == ["∀", "x", "▁", "(", "Red"]


def test_special_tokens_are_single_ids_and_roles_are_set(tok: Any) -> None:
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == (
        "<pad>",
        "<s>",
        "<|end|>",
        "<unk>",
    )
    assert tok.pad_token_id == 0


def test_offsets_map_tokens_to_characters(tok: Any) -> None:
    s = "There is a red circle."
    enc = tok(s, return_offsets_mapping=True, add_special_tokens=False)
    assert enc["offset_mapping"] == [(0, 5), (5, 8), (8, 10), (10, 14), (14, 21), (21, 22)]


def test_chat_template_renders_roles_parts_and_generation_prompt(tok: Any) -> None:
    msgs = [
        {"role": "system", "content": "Hi"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": "There is a star."}]},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|system|>Hi<|end|><|user|><image>Describe the image.<|end|><|assistant|>There is a star.<|end|>"
    )
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|end|><|assistant|>"
    )


def test_chat_template_uses_the_given_image_placeholder() -> None:
    template = chat_template("<|vision_start|><|image_pad|><|vision_end|>")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in template and "<image>" not in template


def test_assistant_text_tokenises_the_same_alone_and_after_the_header(tok: Any) -> None:
    answer = "There is a large red circle in the top left. The background is gray."
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    header = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.encode(header + answer + "<|end|>", add_special_tokens=False)
    head = tok.encode(header, add_special_tokens=False)
    alone = tok.encode(answer + "<|end|>", add_special_tokens=False)
    assert full == head + alone


def test_save_and_load_round_trip(tok: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = "Why is the word cat written? The word sun is written, not cat."
    assert loaded.encode(s) == tok.encode(s)
    assert loaded.decode(loaded.encode(s, add_special_tokens=False)) == s
    assert loaded.chat_template == tok.chat_template and loaded.eos_token == "<|end|>"
    assert len(loaded) == len(tok)


def test_vocabulary_is_deterministic() -> None:
    assert list(world_texts(5)) == list(world_texts(5))
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()


def test_oracle_critiques_and_facts_tokenize_without_unk_and_round_trip() -> None:
    from mmalign.world.oracle import feedback_texts

    tok = build_tokenizer()
    for text in feedback_texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text
