"""Fixtures for the discrete-unit tests: a tiny wav2vec 2.0 model and a small manifest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.config import wav2vec2_tiny
from speechvq.data import ManifestItem, write_manifest
from speechvq.models.wav2vec2 import Wav2Vec2Model, build_wav2vec2


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one intra-op thread (and do not fight over a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_manifest(root: Path, lengths: list[int], seed: int = 0) -> Path:
    """Write noise utterances of the given sample counts and their manifest ``root/m.tsv``."""
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate(lengths):
        rel = f"spk/utt{i:03d}.wav"
        (root / "spk").mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000, subtype="FLOAT")
        items.append(ManifestItem(relpath=rel, num_samples=n, line=0))
    write_manifest(root / "m.tsv", root, items)
    return root / "m.tsv"


@pytest.fixture
def tiny_model() -> Wav2Vec2Model:
    return build_wav2vec2(wav2vec2_tiny()).eval()


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Seven utterances, one shorter than a frame (200 samples)."""
    return make_manifest(tmp_path / "audio", [4000, 2400, 200, 6400, 3200, 4800, 1600])
