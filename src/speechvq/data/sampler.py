"""Length-bucketed, token-budgeted, rank-sharded and resumable batch sampling.

Per epoch the plan is a pure function of (sizes, max_tokens, seed, epoch, num_replicas):

1. order the items by length: either fully sorted (``num_buckets=0``, ties broken at random) or
   grouped into ``num_buckets`` length quantiles, in random order inside each bucket;
2. cut that order greedily into batches whose padded size ``len(batch) * max(size)`` stays within
   ``max_tokens``;
3. make the batch count a multiple of ``num_replicas``: by default by splitting the largest
   multi-item batches in two (nothing is lost or duplicated), falling back to repeating batches
   from the start of the shuffled order only when there are too few items to split; with
   ``drop_last=True`` by dropping the last ``count % num_replicas`` batches of the shuffled order;
4. group consecutive batches of that length order in ``num_replicas * grad_accum``s (one group per
   update: R ranks x A accumulated batches), shuffle the order of the groups (``shuffle=True``), and
   give rank ``r`` batches ``r, r + R, r + 2R, ...`` of the dealt-out plan.

Because the ranks of one update get neighbouring lengths, they wait less for each other; and
because the plan only groups what one process would cut, R processes with budget b deal out, update
for update, the same items as one process with budget R * b whenever the per-rank cuts tile the
single-process ones (e.g. equal lengths with ``max_tokens`` a multiple of the item size). The groups
depend on R * A only, so R processes accumulating A batches and one process accumulating R * A deal
out the same batches, update for update (the batch count is a multiple of R, and of R * A whenever
no balancing was needed). With one process and no accumulation the plan is the classic
shuffled-batches plan.

Every rank gets the same number of batches, and no item appears on two ranks in one epoch (except
for the documented repetition fallback of step 3).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices up to ``max_tokens`` padded samples.

    Args:
        sizes: ``[N]`` samples per item (as the dataset returns them, i.e. after cropping).
        max_tokens: budget of padded samples per batch: ``len(batch) * max(size) <= max_tokens``.
        num_replicas: data-parallel world size.
        rank: this process's rank in ``[0, num_replicas)``.
        seed: base seed; the order is a function of (seed, epoch).
        shuffle: shuffle ties/bucket contents and the batch order; False gives a fixed
            length-sorted order (evaluation).
        num_buckets: 0 sorts by length exactly; ``k > 0`` groups lengths into ``k`` quantile
            buckets and shuffles inside each (more randomness, a little more padding).
        drop_last: make the batch count divisible by ``num_replicas`` by dropping batches instead of
            splitting them.
        max_sample_size: if given, sizes above it are counted as ``max_sample_size`` (the dataset
            crops them).
        max_batch_size: optional cap on the number of items per batch.
        grad_accum: batches each rank accumulates per update; the shuffle keeps the
            ``num_replicas * grad_accum`` batches of one update together.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        num_buckets: int = 0,
        drop_last: bool = False,
        max_sample_size: int | None = None,
        max_batch_size: int | None = None,
        grad_accum: int = 1,
    ) -> None:
        arr = np.asarray(sizes, dtype=np.int64)
        if arr.ndim != 1:
            raise ValueError(f"`sizes` must be 1-D, but has shape {tuple(arr.shape)} instead.")
        if max_sample_size is not None:
            arr = np.minimum(arr, max_sample_size)
        if num_replicas < 1:
            raise ValueError(f"`num_replicas` must be >= 1, but is {num_replicas} instead.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, {num_replicas}), but is {rank} instead.")
        if num_buckets < 0:
            raise ValueError(f"`num_buckets` must be >= 0, but is {num_buckets} instead.")
        if grad_accum < 1:
            raise ValueError(f"`grad_accum` must be >= 1, but is {grad_accum} instead.")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be >= 1, but is {max_batch_size} instead.")
        longest = int(arr.max()) if arr.size else 0
        if max_tokens < max(longest, 1):
            raise ValueError(
                f"`max_tokens` must be >= the longest item ({longest} samples; crop with max_sample_size), "
                f"but is {max_tokens} instead."
            )
        self.sizes = np.maximum(arr, 1)  # an empty item still takes a batch slot
        self.max_tokens = int(max_tokens)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.num_buckets = num_buckets
        self.drop_last = drop_last
        self.max_batch_size = max_batch_size
        self.grad_accum = grad_accum
        self.epoch = 0
        self._start = 0  # batches of this epoch already consumed (set by load_state_dict)
        self._yielded = 0
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # ------------------------------------------------------------------ planning
    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _ordered(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.sizes)
        tiebreak = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.num_buckets == 0:
            return np.lexsort((tiebreak, self.sizes))  # by size, ties in random order
        # quantile buckets: bucket id by rank of size; random order inside a bucket
        by_size = np.lexsort((tiebreak, self.sizes))
        bucket = np.empty(n, dtype=np.int64)
        bucket[by_size] = np.arange(n) * self.num_buckets // max(n, 1)
        return np.lexsort((tiebreak, bucket))

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        batches: list[list[int]] = []
        cur: list[int] = []
        cur_max = 0
        for idx in order.tolist():
            size = int(self.sizes[idx])
            new_max = max(cur_max, size)
            full = self.max_batch_size is not None and len(cur) >= self.max_batch_size
            if cur and ((len(cur) + 1) * new_max > self.max_tokens or full):
                batches.append(cur)
                cur, new_max = [], size
            cur.append(idx)
            cur_max = new_max
        if cur:
            batches.append(cur)
        return batches

    def _balance(self, batches: list[list[int]]) -> list[list[int]]:
        """Make ``len(batches)`` a multiple of ``num_replicas`` (see the module docstring)."""
        r = self.num_replicas
        short = -len(batches) % r
        if short == 0:
            return batches
        if self.drop_last:
            return batches[: len(batches) - (len(batches) % r)]
        # split the largest multi-item batches in two: each half stays within the budget
        for _ in range(short):
            k = max(range(len(batches)), key=lambda i: len(batches[i]), default=-1)
            if k < 0 or len(batches[k]) < 2:
                break
            b = batches[k]
            batches[k : k + 1] = [b[: len(b) // 2], b[len(b) // 2 :]]
        short = -len(batches) % r
        return batches + [list(b) for b in batches[:short]]  # too few items: repeat (documented)

    def plan(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of an epoch (every rank's), in the order they are dealt out."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        if len(self.sizes) == 0:
            return []
        rng = self._rng(epoch)
        batches = self._balance(self._cut(self._ordered(rng)))
        if self.shuffle:
            # keep balance-splitting deterministic: shuffle after the count is fixed; shuffle whole
            # update groups of R * A neighbouring batches (R * A = 1: plain batch shuffling)
            g = self.num_replicas * self.grad_accum
            groups = [batches[i : i + g] for i in range(0, len(batches), g)]
            batches = [b for g in rng.permutation(len(groups)) for b in groups[g]]
        self._plan_cache = (epoch, batches)
        return batches

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches of an epoch."""
        return self.plan(epoch)[self.rank :: self.num_replicas]

    # ------------------------------------------------------------------ Sampler API
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; call before iterating (a resumed position is kept for its own epoch)."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (remaining ones after a resume)."""
        return len(self.rank_batches()) - self._start

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        start, self._start = self._start, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield list(batch)

    def state_dict(self, num_consumed: int | None = None) -> dict[str, Any]:
        """Position for resuming mid-epoch.

        Args:
            num_consumed: batches of the current epoch the caller has actually trained on. Give it
                when a DataLoader with workers prefetches batches ahead of training; by default the
                count of batches this sampler has yielded is used.
        """
        return {
            "epoch": self.epoch,
            "num_consumed": self._yielded if num_consumed is None else int(num_consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "num_items": len(self.sizes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: the next iteration yields exactly the remaining batches of that epoch."""
        for key in ("seed", "num_replicas", "num_items"):
            mine = (
                self.seed
                if key == "seed"
                else self.num_replicas
                if key == "num_replicas"
                else len(self.sizes)
            )
            if key in state and state[key] != mine:
                raise ValueError(
                    f"`{key}` of the saved sampler state must match this sampler ({mine}), "
                    f"but is {state[key]} instead."
                )
        self.epoch = int(state["epoch"])
        self._start = int(state["num_consumed"])
        self._yielded = self._start
        total = len(self.rank_batches())
        if not 0 <= self._start <= total:
            raise ValueError(f"`num_consumed` must be in [0, {total}], but is {self._start} instead.")

    def padded_tokens(self, epoch: int | None = None) -> tuple[int, int]:
        """(padded samples, real samples) over all batches of an epoch: the padding overhead."""
        padded = real = 0
        for b in self.plan(epoch):
            s = self.sizes[b]
            padded += len(b) * int(s.max())
            real += int(s.sum())
        return padded, real
