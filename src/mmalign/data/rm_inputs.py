"""How reward models read their input: fact-augmented prompts and critique conversations.

Both are plain data transforms, used identically at training and at scoring time (a reward model that
was trained with facts must be scored with the same facts):

- :func:`with_facts` (LLaVA-RLHF's fact-augmented RM): the ground-truth facts about the image, after
  ``FACTS_HEADER``, so the RM can check the response against them. Placement ``system`` (default) puts
  them in a system turn *before* the conversation, which leaves the user turn and the response exactly as
  the backbone saw them in SFT: with rotary positions every distance between response, question and image
  tokens is unchanged. Placement ``user`` appends them to the last user turn (LLaVA-RLHF's layout), which
  puts the facts between the question and the response. In the shapes world (SFT backbone, 2000 scenes,
  6000 steps, frozen vision) ``user`` left the fact RM well below the plain RM on hallucination pairs
  (0.899 vs 0.964) and ``system`` brings it level (0.945 vs 0.944 over 3 seeds); with a weak-vision
  backbone the fact RM is clearly ahead (docs/RESULTS.md);
- :func:`critique_conversation` (MM-RLHF's critique RM): the question and the response to judge become
  one user turn ending with ``CRITIQUE_REQUEST``; the RM's assistant turn is the critique, and the
  scalar head reads the state after it. Only the critique is an assistant turn, so the SFT collator's
  assistant-only labels train exactly the critique tokens.

The header strings are part of the shapes-world tokenizer's vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from mmalign.data.schema import ImagePart, Message, PreferencePair, TextPart
from mmalign.errors import DataError

FACTS_HEADER = "Facts:"
RESPONSE_HEADER = "Response:"
CRITIQUE_REQUEST = "Critique the response."
RM_TEXTS = (FACTS_HEADER, RESPONSE_HEADER, CRITIQUE_REQUEST)
"""Every fixed string a reward-model input adds (for tokenizer vocabularies)."""


FACTS_PLACEMENTS = ("system", "user")
FactsPlacement = Literal["system", "user"]


def with_facts(
    prompt: Sequence[Message], facts: Sequence[str] | None, placement: FactsPlacement = "system"
) -> list[Message]:
    """``prompt`` with ``FACTS_HEADER`` and the facts (unchanged if none): as a system turn after any
    existing system turns and before the first other turn (``system``), or appended to the last user
    turn (``user``)."""
    out = list(prompt)
    if not facts:
        return out
    if placement not in FACTS_PLACEMENTS:
        raise DataError(
            f"facts placement must be one of {FACTS_PLACEMENTS}, got {placement!r}", field="facts_placement"
        )
    extra = " ".join([FACTS_HEADER, *(f.strip() for f in facts)])
    if placement == "system":
        k = next((i for i, m in enumerate(out) if m.role != "system"), len(out))
        return [*out[:k], Message(role="system", content=[TextPart(text=extra)]), *out[k:]]
    users = [i for i, m in enumerate(out) if m.role == "user"]
    if not users:
        raise DataError("facts placement 'user' needs a user turn in the prompt", field="prompt")
    k = users[-1]
    content = list(out[k].content)
    if content and isinstance(content[-1], TextPart):
        content[-1] = TextPart(text=f"{content[-1].text} {extra}")
    else:
        content.append(TextPart(text=extra))
    out[k] = Message(role="user", content=content)
    return out


def pair_with_facts(pair: PreferencePair, placement: FactsPlacement = "system") -> PreferencePair:
    """The pair with its ``facts`` written into the prompt (see :func:`with_facts`)."""
    return pair.model_copy(update={"prompt": with_facts(pair.prompt, pair.facts, placement)})


def critique_conversation(
    prompt: Sequence[Message], response: str, critique: str | None = None
) -> list[Message]:
    """The critique RM's conversation about ``response``: system turns of ``prompt`` kept, its user turns'
    images and text merged into one user turn ``<images> question Response: <response> Critique the
    response.``, then the ``critique`` as the assistant turn (omitted when None, for generation)."""
    parts: list[TextPart | ImagePart] = []
    texts: list[str] = []
    system = [m for m in prompt if m.role == "system"]
    for m in prompt:
        if m.role != "user":
            continue
        parts.extend(p for p in m.content if isinstance(p, ImagePart))
        texts.append(m.text.strip())
    text = " ".join([*texts, RESPONSE_HEADER, response.strip(), CRITIQUE_REQUEST])
    messages = [*system, Message(role="user", content=[*parts, TextPart(text=text)])]
    if critique is not None:
        messages.append(Message.assistant(critique))
    return messages
