"""Endless batches over the epochs of a data split, passing over items that cannot be used."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from speechvq import signals
from speechvq.data import BucketBatchSampler
from speechvq.errors import UserInputError

logger = logging.getLogger("speechvq.train.loop")  # the loop's log lines, as they always were


class NoUsableDataError(UserInputError):
    """A whole pass over a data split found no item that could be used."""


def skip_counts(dataset: Any) -> dict[str, int]:
    counts = getattr(dataset, "bad_items", None)
    return dict(counts()) if callable(counts) else {}


def describe_skips(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none recorded"


class Batches:
    """Endless batches over epochs; counts the batches consumed in the current epoch.

    Batches whose every item failed to load (the dataset logs and counts each) are passed over. At
    the end of every epoch the dataset's skipped-item counts are logged; a whole epoch without one
    usable item raises :class:`NoUsableDataError` instead of looping forever.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: BucketBatchSampler,
        collate: Callable[[list[Any]], Any],
        num_workers: int,
        name: str = "data",
        main: bool = True,
    ) -> None:
        self.dataset, self.sampler, self.name, self.main = dataset, sampler, name, main
        self.loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            worker_init_fn=signals.ignore_in_worker if num_workers > 0 else None,
        )  # fmt: skip
        self.epoch, self.consumed, self._it = sampler.epoch, 0, None
        self._usable = 0  # usable batches in the current epoch
        self._whole_epoch = True  # the current epoch started at its first batch (not a resume)

    def resume_(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self.epoch, self.consumed = int(state["epoch"]), int(state["num_consumed"])
        self._whole_epoch = self.consumed == 0

    def next(self) -> Any:
        """The next batch with at least one item."""
        while True:
            if self._it is None:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                self._it = iter(self.loader)
            batch = next(self._it, None)
            if batch is not None:
                self.consumed += 1
                if len(batch) == 0:  # every item of the batch failed to load (logged by the dataset)
                    continue
                self._usable += 1
                return batch
            self._end_epoch()

    def _end_epoch(self) -> None:
        counts = skip_counts(self.dataset)
        if self.main and counts:
            logger.warning(
                "%s: epoch %d done: %d of %d items skipped so far (%s)",
                self.name, self.epoch, sum(counts.values()), len(self.dataset), describe_skips(counts),
            )  # fmt: skip
        if self._usable == 0 and self._whole_epoch:
            raise NoUsableDataError(
                f"{self.name}: no item could be used in a whole pass over the data "
                f"({len(self.dataset)} items; skipped: {describe_skips(counts)}); see the warnings above"
            )
        self._it, self.epoch, self.consumed = None, self.epoch + 1, 0
        self._usable, self._whole_epoch = 0, True

    def state_dict(self) -> dict[str, Any]:
        state = self.sampler.state_dict(num_consumed=self.consumed)
        state["epoch"] = self.epoch
        return state
