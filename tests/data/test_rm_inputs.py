"""Fact-augmented RM inputs (``with_facts``): exact message layouts of both placements and clear errors."""

from __future__ import annotations

import pytest

from mmalign.data.rm_inputs import FACTS_HEADER, pair_with_facts, with_facts
from mmalign.data.schema import ImagePart, ImageRef, Message, PreferencePair, TextPart
from mmalign.errors import DataError

FACTS = ["There is a red square. ", "The background is white."]
EXTRA = f"{FACTS_HEADER} There is a red square. The background is white."


def test_system_placement_adds_a_system_turn_before_the_conversation_and_keeps_the_user_turn() -> None:
    prompt = [Message.user("Describe the image.", 1)]
    out = with_facts(prompt, FACTS)
    assert [m.role for m in out] == ["system", "user"]
    assert out[0].content == [TextPart(text=EXTRA)]
    assert out[1] == prompt[0]  # the turn the SFT model saw, untouched


def test_system_placement_goes_after_existing_system_turns() -> None:
    prompt = [Message(role="system", content=[TextPart(text="Be brief.")]), Message.user("Hi.")]
    out = with_facts(prompt, FACTS, "system")
    assert [m.role for m in out] == ["system", "system", "user"]
    assert out[0] == prompt[0] and out[1].text == EXTRA and out[2] == prompt[1]


def test_user_placement_appends_to_the_last_user_turn() -> None:
    prompt = [Message.user("First."), Message.assistant("Ok."), Message.user("Describe the image.", 1)]
    out = with_facts(prompt, FACTS, "user")
    assert [m.role for m in out] == ["user", "assistant", "user"]
    assert out[:2] == prompt[:2]
    assert out[2].text == f"Describe the image. {EXTRA}"
    assert isinstance(out[2].content[0], ImagePart)  # the image part stays where it was


def test_no_facts_leave_the_prompt_unchanged_and_bad_placements_are_refused() -> None:
    prompt = [Message.user("Describe the image.")]
    assert with_facts(prompt, None) == prompt and with_facts(prompt, []) == prompt
    with pytest.raises(DataError, match="placement must be one of"):
        with_facts(prompt, FACTS, "middle")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="needs a user turn"):
        with_facts([Message(role="system", content=[TextPart(text="x")])], FACTS, "user")


def test_pair_with_facts_uses_the_pair_facts() -> None:
    pair = PreferencePair(
        id="p",
        images=[ImageRef(path="a.png")],
        prompt=[Message.user("Describe the image.", 1)],
        chosen="There is a red square.",
        rejected="There is a blue square.",
        facts=FACTS,
    )
    assert pair_with_facts(pair).prompt[0].text == EXTRA
    assert pair_with_facts(pair, "user").prompt[0].text == f"Describe the image. {EXTRA}"
