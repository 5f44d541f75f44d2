"""BucketBatchSampler: budget, sharding, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest

from speechvq.data import BucketBatchSampler


def _sizes(n: int = 257, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1_000, 50_000, size=n)


def test_sampler_batches_stay_within_max_tokens() -> None:
    sizes = _sizes()
    s = BucketBatchSampler(sizes, 120_000, seed=3)
    for batch in s:
        assert len(batch) * sizes[batch].max() <= 120_000


def test_sampler_counts_cropped_items_at_max_sample_size() -> None:
    sizes = np.array([10_000, 200_000, 300_000, 5_000])
    s = BucketBatchSampler(sizes, 100_000, max_sample_size=50_000, shuffle=False)
    for batch in s:
        assert len(batch) * np.minimum(sizes[batch], 50_000).max() <= 100_000


def test_sampler_raises_when_an_item_exceeds_max_tokens() -> None:
    with pytest.raises(ValueError, match="`max_tokens` must be >= the longest item"):
        BucketBatchSampler([100, 5000], 1000)


@pytest.mark.parametrize("num_buckets", [0, 4])
@pytest.mark.parametrize("n", [257, 3, 64])
def test_sampler_two_ranks_cover_every_item_exactly_once(n: int, num_buckets: int) -> None:
    sizes = _sizes(n)
    ranks = [
        BucketBatchSampler(sizes, 150_000, num_replicas=2, rank=r, seed=7, num_buckets=num_buckets)
        for r in (0, 1)
    ]
    for epoch in (0, 1):
        seen = []
        for s in ranks:
            s.set_epoch(epoch)
            seen.extend(i for b in s for i in b)
        assert len(ranks[0]) == len(ranks[1])
        assert sorted(seen) == list(range(n))  # nothing lost, nothing duplicated


def test_sampler_pads_by_repeating_only_when_too_few_items_to_split() -> None:
    ranks = [BucketBatchSampler([100], 1000, num_replicas=2, rank=r) for r in (0, 1)]
    assert [list(s) for s in ranks] == [[[0]], [[0]]]


def test_sampler_drop_last_drops_the_remainder_deterministically() -> None:
    sizes = np.full(9, 100)
    ranks = [BucketBatchSampler(sizes, 100, num_replicas=2, rank=r, drop_last=True, seed=1) for r in (0, 1)]
    got = [i for s in ranks for b in s for i in b]
    assert len(got) == 8 and len(set(got)) == 8
    again = [i for s in ranks for b in s for i in b]
    assert got == again


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    sizes = _sizes()
    a = list(BucketBatchSampler(sizes, 120_000, seed=5))
    b = list(BucketBatchSampler(sizes, 120_000, seed=5))
    c = list(BucketBatchSampler(sizes, 120_000, seed=6))
    s = BucketBatchSampler(sizes, 120_000, seed=5)
    s.set_epoch(1)
    d = list(s)
    assert a == b
    assert a != c
    assert a != d


def test_sampler_without_shuffle_is_sorted_by_length() -> None:
    sizes = _sizes(50)
    flat = [i for b in BucketBatchSampler(sizes, 120_000, shuffle=False) for i in b]
    assert list(sizes[flat]) == sorted(sizes)


@pytest.mark.parametrize("consumed", [0, 1, 5])
def test_sampler_resume_mid_epoch_yields_exactly_the_remaining_batches(consumed: int) -> None:
    sizes = _sizes()
    s = BucketBatchSampler(sizes, 120_000, num_replicas=2, rank=1, seed=11)
    s.set_epoch(3)
    it = iter(s)
    first = [next(it) for _ in range(consumed)]
    state = s.state_dict()
    rest = list(it)

    fresh = BucketBatchSampler(sizes, 120_000, num_replicas=2, rank=1, seed=11)
    fresh.load_state_dict(state)
    assert len(fresh) == len(rest)
    assert list(fresh) == rest
    assert first + rest == list(fresh)  # the next epoch iteration starts from the beginning again


def test_sampler_state_dict_accepts_the_consumed_count_from_the_caller() -> None:
    sizes = _sizes()
    s = BucketBatchSampler(sizes, 120_000, seed=2)
    full = list(s)
    s2 = BucketBatchSampler(sizes, 120_000, seed=2)
    s2.load_state_dict(s.state_dict(num_consumed=4))
    assert list(s2) == full[4:]


def test_sampler_load_state_dict_raises_when_the_data_changed() -> None:
    s = BucketBatchSampler(_sizes(10), 120_000)
    state = s.state_dict()
    with pytest.raises(ValueError, match="`num_items`"):
        BucketBatchSampler(_sizes(11), 120_000).load_state_dict(state)


def test_two_ranks_with_budget_b_deal_out_what_one_rank_with_budget_2b_does() -> None:
    # equal lengths: a per-rank batch of 2 items, a single-process batch of 4
    sizes = [16000] * 24
    one = BucketBatchSampler(sizes, 64000, seed=3)
    ranks = [BucketBatchSampler(sizes, 32000, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        updates = [sorted(a + b) for a, b in zip(*per_rank, strict=True)]
        assert updates == [sorted(b) for b in one]


def test_ranks_of_one_update_get_neighbouring_lengths() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(16000, 160000, size=400)
    ranks = [BucketBatchSampler(sizes, 400000, num_replicas=4, rank=r, seed=1) for r in range(4)]
    spreads = []
    for update in zip(*(list(s) for s in ranks), strict=True):
        longest = [max(sizes[i] for i in batch) for batch in update]
        spreads.append(max(longest) - min(longest))
    # neighbours in the length order: the longest items of the 4 batches differ by little
    assert np.median(spreads) < 0.05 * (sizes.max() - sizes.min())


def _updates(world: int, accum: int, sizes: np.ndarray, epoch: int) -> list[list[int]]:
    """The items of each update (sorted) when ``world`` ranks accumulate ``accum`` batches."""
    ranks = [BucketBatchSampler(sizes, 120_000, num_replicas=world, rank=r, seed=5, grad_accum=accum)
             for r in range(world)]  # fmt: skip
    for s in ranks:
        s.set_epoch(epoch)
    per_rank = [list(s) for s in ranks]
    steps = len(per_rank[0]) // accum
    return [sorted(i for batches in per_rank for b in batches[u * accum : (u + 1) * accum] for i in b)
            for u in range(steps)]  # fmt: skip


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_ranks_times_accumulation_decides_the_updates_not_how_it_is_split(epoch: int) -> None:
    """2 ranks x 1 batch, 1 rank x 2 accumulated batches: the same items in every update, in every
    epoch (the CTC two-process test depends on it after the first epoch); likewise for 4."""
    # a corpus whose single-process cut is a multiple of 4 batches: no rank count needs balancing
    sizes = next(
        s for s in (_sizes(96, seed=k) for k in range(100)) if len(BucketBatchSampler(s, 120_000)) % 4 == 0
    )
    assert _updates(2, 1, sizes, epoch) == _updates(1, 2, sizes, epoch)
    assert _updates(4, 1, sizes, epoch) == _updates(2, 2, sizes, epoch) == _updates(1, 4, sizes, epoch)
    assert _updates(1, 2, sizes, epoch) != _updates(1, 1, sizes, epoch)[: len(_updates(1, 2, sizes, epoch))]


def test_grad_accum_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="`grad_accum` must be >= 1"):
        BucketBatchSampler([10], 100, grad_accum=0)
