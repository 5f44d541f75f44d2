"""Where a forward pass's random numbers come from: one generator, or one per utterance."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Draws:
    """The source of a batch's random draws (masks, distractors, Gumbel noise).

    Either one ``torch.Generator`` for the whole batch (None: torch's global RNG), or one generator
    per utterance: utterance ``b`` then draws only from ``generators[b]`` and only for its own
    valid frames, so its draws do not depend on the rest of the batch (training is then invariant
    to how utterances are split over processes and batches). Every function that draws takes a
    :class:`Draws` (or anything :meth:`of` accepts) and draws the same numbers in the same order
    as the plain-generator code it replaced.

    Args:
        generator: the batch's generator, or None for the global RNG.
        per_utterance: one generator per utterance instead.
    """

    def __init__(
        self,
        generator: torch.Generator | None = None,
        *,
        per_utterance: Sequence[torch.Generator] | None = None,
    ) -> None:
        if generator is not None and per_utterance is not None:
            raise ValueError("`generator` and `per_utterance` must not both be given, but both are.")
        self.generator = generator
        self.generators = list(per_utterance) if per_utterance is not None else None

    @classmethod
    def of(cls, source: RandomSource) -> Draws:
        """``source`` as a :class:`Draws`: a Draws as is, a generator or None as the batch's
        source, a sequence of generators as one per utterance."""
        if isinstance(source, Draws):
            return source
        if source is None or isinstance(source, torch.Generator):
            return cls(source)
        return cls(per_utterance=source)

    @property
    def per_utterance(self) -> bool:
        """Whether each utterance has its own generator."""
        return self.generators is not None

    def utterance(self, index: int) -> torch.Generator:
        """Utterance ``index``'s generator (per-utterance draws only)."""
        if self.generators is None:
            raise ValueError(
                "`utterance` needs per-utterance generators, but this Draws has one for the batch."
            )
        return self.generators[index]

    def check_batch(self, batch: int) -> None:
        """Raise ``ValueError`` unless per-utterance draws hold one generator per utterance."""
        if self.generators is not None and len(self.generators) != batch:
            raise ValueError(
                f"`generators` must hold one generator per utterance ({batch}), "
                f"but holds {len(self.generators)} instead."
            )


RandomSource = Draws | torch.Generator | Sequence[torch.Generator] | None
"""What a drawing function accepts: see :meth:`Draws.of`."""
