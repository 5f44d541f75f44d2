"""Fixtures for the CTC tests: a synthetic "tone speech" corpus and a tiny model overfit on it."""

from __future__ import annotations

import time

import pytest
import torch
from ctc_toy import ToyCorpus, make_corpus, overfit, tiny_ctc_config

from speechvq.models.ctc import CtcModel, build_ctc_model


@pytest.fixture(autouse=True)
def _one_thread():
    """The CTC tests run tiny models, for which one thread is faster than several (and immune to
    oversubscription on a shared CI machine); the previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus() -> ToyCorpus:
    return make_corpus()


@pytest.fixture(scope="session")
def trained(corpus: ToyCorpus) -> tuple[CtcModel, int, float, float]:
    """(a tiny CTC model overfit on the corpus, steps it took, its final CER, seconds it took)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # session scope: set here too, before the autouse fixture runs
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_ctc_model(tiny_ctc_config(len(corpus.vocab)))
    steps, error = overfit(model, corpus)
    torch.set_num_threads(previous)
    return model.eval(), steps, error, time.perf_counter() - start
