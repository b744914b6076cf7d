"""align_tokens: difflib matching on token ids; matched runs shorter than min_match count as changed."""

from __future__ import annotations

import pytest

from mmalign.data.align import align_tokens

F, T = False, True


def test_identical_sequences_have_no_changed_tokens() -> None:
    assert align_tokens([5, 6, 7, 8], [5, 6, 7, 8]) == ([F, F, F, F], [F, F, F, F])


def test_empty_sequences_align_to_empty_masks() -> None:
    assert align_tokens([], []) == ([], [])
    assert align_tokens([1, 2, 3], []) == ([T, T, T], [])


def test_deletion_in_the_middle_marks_only_the_deleted_tokens() -> None:
    chosen, rejected = [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 6, 7, 8]  # 4, 5 only in chosen
    assert align_tokens(chosen, rejected) == ([F, F, F, T, T, F, F, F], [F] * 6)


def test_substitution_of_one_token_marks_it_on_both_sides() -> None:
    chosen, rejected = [1, 2, 3, 40, 5, 6, 7], [1, 2, 3, 90, 5, 6, 7]
    assert align_tokens(chosen, rejected) == ([F, F, F, T, F, F, F], [F, F, F, T, F, F, F])


def test_substitution_makes_neighbouring_runs_shorter_than_min_match_changed() -> None:
    # Runs [1, 2, 3, 4] (length 4) stays unchanged; the run [6, 7] after the substitution is too short.
    chosen, rejected = [1, 2, 3, 4, 50, 6, 7], [1, 2, 3, 4, 60, 6, 7]
    assert align_tokens(chosen, rejected) == ([F, F, F, F, T, T, T], [F, F, F, F, T, T, T])
    # With both runs of length 2, everything is changed; with min_match=2 only the substitution is.
    assert align_tokens([1, 2, 9, 4, 5], [1, 2, 8, 4, 5]) == ([T] * 5, [T] * 5)
    assert align_tokens([1, 2, 9, 4, 5], [1, 2, 8, 4, 5], min_match=2) == ([F, F, T, F, F], [F, F, T, F, F])


def test_frequent_tokens_are_not_treated_as_junk() -> None:
    # autojunk would drop a token occurring in >1% of a 200+ token sequence; it must still match here.
    # With autojunk on, difflib finds no match at all in this pair.
    chosen, rejected = [1] + [7] * 250 + [1], [2] + [7] * 250 + [3]
    assert align_tokens(chosen, rejected) == ([T] + [F] * 250 + [T], [T] + [F] * 250 + [T])


def test_min_match_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_match"):
        align_tokens([1], [1], min_match=0)
