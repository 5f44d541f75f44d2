"""Span masks and distractor sampling."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speechvq.models.masking import compute_span_mask, sample_distractors


def test_span_mask_masks_about_49_percent_with_the_paper_settings():
    lengths = torch.full((256,), 500)
    mask = compute_span_mask(
        lengths, 500, mask_prob=0.65, mask_length=10, min_masks=2, generator=torch.Generator().manual_seed(0)
    )
    fraction = mask.float().mean().item()
    assert 0.45 < fraction < 0.53  # paper: ~49%


def test_span_mask_is_reproducible_with_a_generator():
    lengths = torch.tensor([100, 70, 30])
    a = compute_span_mask(
        lengths, 100, mask_prob=0.65, mask_length=10, generator=torch.Generator().manual_seed(5)
    )
    b = compute_span_mask(
        lengths, 100, mask_prob=0.65, mask_length=10, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b)


def test_span_mask_require_same_masks_gives_equal_counts():
    lengths = torch.tensor([100, 70, 30])
    mask = compute_span_mask(
        lengths,
        100,
        mask_prob=0.65,
        mask_length=10,
        require_same_masks=True,
        generator=torch.Generator().manual_seed(1),
    )
    counts = mask.sum(1)
    assert (counts == counts[0]).all()


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=5),
    mask_prob=st.floats(min_value=0.0, max_value=1.0),
    mask_length=st.integers(min_value=1, max_value=12),
    min_masks=st.integers(min_value=0, max_value=3),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_span_mask_never_masks_padding(lengths, mask_prob, mask_length, min_masks, seed):
    lengths_t = torch.tensor(lengths)
    max_len = max(lengths) + 3
    mask = compute_span_mask(
        lengths_t,
        max_len,
        mask_prob=mask_prob,
        mask_length=mask_length,
        min_masks=min_masks,
        generator=torch.Generator().manual_seed(seed),
    )
    valid = torch.arange(max_len)[None, :] < lengths_t[:, None]
    assert not (mask & ~valid).any()
    for row, n in zip(mask, lengths):
        if min_masks > 0 and n > 1:
            assert row.any()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=4),
    k=st.integers(min_value=1, max_value=20),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_distractors_come_from_the_same_utterance_masked_frames_never_the_target(rows, k, seed):
    mask = torch.tensor(rows)
    target, distractors = sample_distractors(mask, k, torch.Generator().manual_seed(seed))
    assert target.numel() == int(mask.sum())
    assert distractors.shape == (target.numel(), k)
    flat = mask.reshape(-1)
    assert flat[distractors].all() if distractors.numel() else True
    utt_of = lambda i: i // mask.size(1)  # noqa: E731
    assert (utt_of(distractors) == utt_of(target)[:, None]).all()
    counts = mask.sum(1)[utt_of(target)]
    others = counts >= 2
    assert (distractors[others] != target[others][:, None]).all()


def test_distractor_draw_is_uniform_over_the_other_masked_frames():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [1, 3, 4, 8]] = True
    _target, distractors = sample_distractors(mask, 20000, torch.Generator().manual_seed(0))
    first = distractors[0]  # target frame 1: the others are 3, 4, 8
    counts = torch.bincount(first, minlength=10).float() / first.numel()
    for frame in (3, 4, 8):
        assert abs(counts[frame].item() - 1 / 3) < 0.02
    assert counts[1] == 0
