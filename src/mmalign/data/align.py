"""Token alignment of a corrected (chosen) response against the original (rejected) one.

Used by DDPO (RLHF-V dense DPO): tokens inside long-enough matched runs are *unchanged*, every other
token is *changed* and gets the weight γ in :func:`mmalign.losses.dpo.sequence_scores`. It lives in the
data layer because the pair collator builds the ``changed`` masks; ``mmalign.losses`` re-exports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher


def align_tokens(
    chosen_ids: Sequence[int], rejected_ids: Sequence[int], min_match: int = 3
) -> tuple[list[bool], list[bool]]:
    """Mark each token of both responses as changed (``True``) or unchanged (``False``).

    Matching is :class:`difflib.SequenceMatcher` on the token ids with ``autojunk`` off (so frequent
    tokens are never ignored). A token is unchanged only if it lies in a matched block of at least
    ``min_match`` tokens: short coincidental matches (e.g. a shared "the" between two rewritten
    phrases) count as changed.
    """
    if min_match < 1:
        raise ValueError(f"align_tokens: min_match: must be >= 1, got {min_match}")
    a, b = [int(t) for t in chosen_ids], [int(t) for t in rejected_ids]
    changed_a, changed_b = [True] * len(a), [True] * len(b)
    for block in SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        if block.size >= min_match:
            changed_a[block.a : block.a + block.size] = [False] * block.size
            changed_b[block.b : block.b + block.size] = [False] * block.size
    return changed_a, changed_b
