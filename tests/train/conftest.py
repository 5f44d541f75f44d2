"""Fixtures for the training tests: a small generated corpus and a tiny run config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.data import ManifestItem, write_manifest
from speechvq.train.config import PretrainConfig, config_from_dict

CONF = Path(__file__).resolve().parents[2] / "conf"


def make_corpus(
    root: Path, num_files: int = 16, seconds: tuple[float, float] = (1.0, 1.5), seed: int = 0
) -> Path:
    """Write ``num_files`` 16 kHz wavs (two tones with vibrato, plus noise) and a manifest."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_files):
        n = int(16000 * rng.uniform(*seconds))
        t = np.arange(n) / 16000
        f0 = rng.uniform(100, 300)
        wav = 0.3 * np.sin(2 * np.pi * f0 * t + 3 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
        wav += 0.2 * np.sin(2 * np.pi * rng.uniform(500, 2000) * t) * (np.sin(2 * np.pi * 3 * t) > 0)
        wav += 0.05 * rng.standard_normal(n)
        name = f"utt{i:03d}.wav"
        sf.write(root / name, wav.astype(np.float32), 16000)
        items.append(ManifestItem(relpath=name, num_samples=n, line=0))
    manifest = root / "train.tsv"
    write_manifest(manifest, root, items)
    return manifest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest of 16 utterances of 1 to 1.5 s."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_config(manifest: Path, **sections: dict) -> PretrainConfig:
    """The tiny config, no dropout, small batches, per-step logging; ``sections`` override fields."""
    data = {
        "model": {"preset": "tiny", "overrides": {"context.dropout_p": 0.0, "feature_dropout_p": 0.0}},
        "data": {
            "train": str(manifest),
            "max_sample_size": 24000,
            "min_sample_size": 4000,
            "max_tokens": 96000,
        },
        "optim": {"lr": 2e-3},
        "schedule": {"name": "polynomial", "warmup_steps": 3},
        "train": {
            "max_steps": 6,
            "log_interval": 1,
            "save_interval": 1000,
            "progress_bar": False,
            "tensorboard": False,
        },
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    cfg = config_from_dict(data)
    cfg.validate()
    return cfg


@pytest.fixture
def tiny_cfg() -> Callable[..., PretrainConfig]:
    """:func:`tiny_config` as a fixture."""
    return tiny_config


@pytest.fixture
def corpus_factory() -> Callable[..., Path]:
    """:func:`make_corpus` as a fixture."""
    return make_corpus


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and they thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
