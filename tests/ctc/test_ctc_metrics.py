"""WER / CER: hand-computed cases, and agreement with jiwer."""

from __future__ import annotations

import random

import pytest

from speechvq.metrics_asr import ErrorCounts, align, cer, char_errors, edit_distance, wer, word_errors


def test_align_counts_hand_computed_edits():
    # kitten -> sitting: k->s, e->i, +g
    assert align(list("kitten"), list("sitting")) == ErrorCounts(2, 0, 1, 6)
    assert align(["a", "b", "c", "d"], ["a", "c", "d", "e"]) == ErrorCounts(0, 1, 1, 4)
    assert align([], ["x", "y"]) == ErrorCounts(0, 0, 2, 0)
    assert align(["x", "y"], []) == ErrorCounts(0, 2, 0, 2)
    assert edit_distance("flaw", "lawn") == 2


def test_wer_is_corpus_level_not_a_mean_of_utterances():
    refs = ["the cat sat", "hello"]
    hyps = ["the cat sat", "yellow"]
    # 1 substitution over 4 reference words (the mean of utterance rates would be 0.5)
    assert wer(refs, hyps) == pytest.approx(0.25)
    assert word_errors(refs, hyps) == ErrorCounts(1, 0, 0, 4)


def test_wer_ignores_extra_whitespace_and_counts_insertions():
    assert wer("a b", "  a   b ") == 0.0
    assert wer("a b", "a x b y") == pytest.approx(1.0)  # 2 insertions / 2 words


def test_cer_counts_spaces_between_words():
    # "ab cd" (5 chars) vs "abcd": one deleted space
    assert char_errors(["ab cd"], ["abcd"]) == ErrorCounts(0, 1, 0, 5)
    assert cer("ab cd", "ab  cd") == 0.0
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)


def test_rate_of_empty_reference():
    assert wer([""], [""]) == 0.0
    assert wer([""], ["x"]) == float("inf")


def test_wer_raises_when_lists_differ_in_length():
    with pytest.raises(ValueError, match="one entry per reference"):
        wer(["a", "b"], ["a"])


def test_word_and_char_errors_match_jiwer_on_random_pairs():
    import jiwer  # a dev dependency

    rng = random.Random(0)
    words = ["a", "b", "cat", "dog", "the"]
    refs, hyps = [], []
    for _ in range(200):
        refs.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))))
        hyps.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 8))))
    ours = word_errors(refs, hyps)
    theirs = jiwer.process_words(refs, hyps)
    assert (ours.substitutions + ours.deletions + ours.insertions) == (
        theirs.substitutions + theirs.deletions + theirs.insertions
    )
    assert wer(refs, hyps) == pytest.approx(theirs.wer)
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
