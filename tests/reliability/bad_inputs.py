"""Builders of bad user files for the bad-input matrix (``test_reliability_bad_input.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from speechvq.config import preset
from speechvq.io import save_pretrained
from speechvq.models.ctc import build_ctc_model, ctc_config_from_wav2vec2, save_ctc_pretrained
from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.text.vocab import Vocabulary

SR = 16000


def make_workspace(root: Path) -> Path:
    """Good inputs every case starts from: two wavs and their manifest, labels, a tiny model, units,
    alignments, a k-means model and a pretrain config."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        sf.write(root / f"a{i}.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), SR)
    (root / "good.tsv").write_text(f"{root}\na0.wav\t8000\na1.wav\t8000\n")
    (root / "good.wrd").write_text("HELLO\nWORLD\n")
    torch.manual_seed(0)
    save_pretrained(build_wav2vec2(preset("tiny")), root / "model")
    vocab = Vocabulary.letters(["HELLO WORLD"])
    save_ctc_pretrained(
        build_ctc_model(ctc_config_from_wav2vec2(preset("tiny"), len(vocab))), vocab, root / "ctc"
    )
    units = root / "units"
    units.mkdir()
    (units / "units.txt").write_text("1 1 2\n3 0\n")
    (units / "utts.txt").write_text("a0.wav\na1.wav\n")
    (units / "meta.json").write_text(json.dumps({"frame_stride_s": 0.02, "kind": "kmeans", "vocab_size": 4}))
    ali = root / "ali"
    ali.mkdir()
    for i in range(2):
        (ali / f"a{i}.phones").write_text("0.0 0.03 A\n0.03 0.06 B\n")
    km = root / "km"
    km.mkdir()
    (km / "kmeans.json").write_text(json.dumps({"format": "speechvq-kmeans", "k": 4, "dim": 8, "layer": 1}))
    np.save(km / "centroids.npy", np.zeros((4, 8), np.float32))
    (root / "config.yaml").write_text(
        f"model: {{preset: tiny}}\ndata: {{train: {root / 'good.tsv'}}}\ntrain: {{max_steps: 1}}\n"
    )
    return root
