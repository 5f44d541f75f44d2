"""``extract-features`` and long recordings in windows: the front end equal to the whole-utterance
pass at every frame, the Transformer within a stated tolerance, memory that does not grow with the
recording, and ``export-units`` on the same windows."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq import build_wav2vec2, preset
from speechvq.cli import main
from speechvq.data import ManifestItem, write_manifest
from speechvq.io import save_pretrained
from speechvq.units.export import export_units, layer_features
from speechvq.units.extract import read_features
from speechvq.units.kmeans import KMeansModel
from speechvq.units.longform import ChunkConfig, windowed_features

LAYERS = [0, "transformer_input", 1, 2]
FRONT_END_TOL = 5e-5
"""Front end and Transformer input: max |windowed - whole| / max |whole| (float rounding only;
measured at most 9.2e-6, the CNN with GroupNorm, whose statistics are summed in another order)."""
BLOCK_TOL = 5e-3
"""Transformer blocks: per-frame ||windowed - whole|| / ||whole||. Measured on these random tiny
models with 10 s + 2 x 2.5 s windows: at most 3.2e-3 (median 1.4e-3) for the log-mel front end,
8e-4 for the CNN, on 2 and 10 minutes of speech-like audio."""


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced harmonic segments, noise bursts and pauses of 50-300 ms, float32 at 16 kHz."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    out = np.zeros(n, dtype=np.float32)
    pos = 0
    while pos < n:
        d = min(int(rng.uniform(0.05, 0.3) * 16000), n - pos)
        t = np.arange(d, dtype=np.float32) / 16000
        u = rng.random()
        if u < 0.7:
            f0 = rng.uniform(90, 250)
            out[pos : pos + d] = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t) for k in range(1, 6))
        elif u < 0.85:
            out[pos : pos + d] = 0.1 * rng.standard_normal(d)
        pos += d
    return out + 0.003 * rng.standard_normal(n).astype(np.float32)


def _model(kind: str) -> torch.nn.Module:
    cfg = preset("tiny")
    if kind == "fbank":
        cfg.encoder = dataclasses.replace(cfg.encoder, kind="fbank")
    elif kind == "conv_layer_norm":  # normalises the waveform: a statistic of the whole recording
        cfg.encoder = dataclasses.replace(cfg.encoder, norm_mode="layer_norm")
    torch.manual_seed(0)
    return build_wav2vec2(cfg).eval()


def _windowed(model: torch.nn.Module, wave: torch.Tensor, chunk: ChunkConfig) -> dict:
    parts: dict = {layer: [] for layer in LAYERS}
    for window in windowed_features(model, wave, LAYERS, chunk):
        for layer, f in window.layers.items():
            parts[layer].append(f)
    return {layer: torch.cat(p) for layer, p in parts.items()}


def _whole(model: torch.nn.Module, wave: torch.Tensor, layer: object) -> torch.Tensor:
    if model.cfg.encoder.norm_mode == "layer_norm":
        from speechvq.data.audio import normalize_waveform

        wave = normalize_waveform(wave)
    features, _ = layer_features(model, wave[None], torch.tensor([wave.numel()]), layer)
    return features[0]


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |got - ref| / max |ref|, max per-frame ||got - ref|| / ||ref||)."""
    scaled = float((got - ref).abs().max() / ref.abs().max())
    return scaled, float(((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max())


@pytest.mark.parametrize("kind", ["fbank", "conv_group_norm", "conv_layer_norm"])
def test_windowed_features_equal_the_whole_utterance_pass(kind: str) -> None:
    model = _model(kind)
    wave = torch.from_numpy(speechlike(120))
    got = _windowed(model, wave, ChunkConfig(chunk_s=10, context_s=2.5))
    for layer in LAYERS:
        ref = _whole(model, wave, layer)
        assert got[layer].shape == ref.shape
        scaled, relative = _errors(got[layer], ref)
        if layer in (0, "transformer_input"):
            assert scaled < FRONT_END_TOL, (layer, scaled)
        else:
            assert relative < BLOCK_TOL, (layer, relative)


def test_without_context_the_frames_at_window_edges_differ() -> None:
    """The context is what makes the edges right: the positional conv (16 frames) reads across."""
    model = _model("fbank")
    wave = torch.from_numpy(speechlike(30))
    ref = _whole(model, wave, "transformer_input")
    got = _windowed(model, wave, ChunkConfig(chunk_s=5, context_s=0))["transformer_input"]
    edges = torch.zeros(ref.size(0), dtype=torch.bool)
    for k in range(250, ref.size(0), 250):  # 5 s = 250 frames of 20 ms
        edges[k - 2 : k + 2] = True
    assert _errors(got[edges], ref[edges])[0] > 100 * FRONT_END_TOL
    assert _errors(got[~edges][300:400], ref[~edges][300:400])[0] < FRONT_END_TOL  # far from edges


def _peak_rss_mb(cmd: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", SPEECHVQ_PROGRESS="never")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert os.waitstatus_to_exitcode(status) == 0, output
    return usage.ru_maxrss / 1024  # KiB on Linux


MEMORY_GROWTH_MB = 80
"""Peak RSS of extract-features on 10 minutes minus on 1 minute (tiny log-mel model, 15 s windows).
The decoded waveform alone is 34.6 MB more (float32 at 16 kHz). Measured 2026-12-03 on the 2-core
development machine: 423 -> 459 MB (+36 MB) in windows; with ``--no-chunking`` 423 -> 876 MB (+453 MB).
A BASE-sized CNN would need about 4 GB for its first layer alone on 10 minutes."""


def test_extract_features_on_a_ten_minute_recording_in_bounded_memory(tmp_path: Path) -> None:
    model = _model("fbank")
    save_pretrained(model, tmp_path / "model")
    wave = speechlike(600, seed=1)
    for name, seconds in (("long", 600), ("short", 60)):
        sf.write(tmp_path / f"{name}.wav", wave[: seconds * 16000], 16000, subtype="PCM_16")
        write_manifest(tmp_path / f"{name}.tsv", tmp_path, [ManifestItem(f"{name}.wav", seconds * 16000, 0)])
    peaks = {}
    for name in ("short", "long"):
        cmd = [sys.executable, "-m", "speechvq", "extract-features", str(tmp_path / "model"), str(tmp_path / f"{name}.tsv"),
               "--layers", "0,2", "--out", str(tmp_path / f"feats_{name}"), "--shard-frames", "5000"]  # fmt: skip
        peaks[name] = _peak_rss_mb(cmd)
    assert peaks["long"] - peaks["short"] < MEMORY_GROWTH_MB, peaks
    # the 10 minutes match the whole-utterance pass: the log-mel layer at every frame, block 2
    # within BLOCK_TOL (every kept frame is 2.5 s or more from its window's edges)
    decoded = torch.from_numpy(sf.read(tmp_path / "long.wav", dtype="float32")[0])
    for layer, tol in ((0, FRONT_END_TOL), (2, BLOCK_TOL)):
        got = torch.from_numpy(read_features(tmp_path / "feats_long", layer)["long.wav"])
        ref = _whole(model, decoded, layer)
        assert got.shape == ref.shape == (29999, 160 if layer == 0 else 32)
        scaled, relative = _errors(got, ref)
        assert (scaled if layer == 0 else relative) < tol, (layer, scaled, relative)


def test_export_units_runs_long_recordings_in_the_same_windows(tmp_path: Path) -> None:
    model = _model("conv_group_norm")
    wave = speechlike(40, seed=2)
    sf.write(tmp_path / "a.wav", wave, 16000, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", wave[:16000], 16000, subtype="FLOAT")
    write_manifest(
        tmp_path / "m.tsv", tmp_path, [ManifestItem("a.wav", len(wave), 0), ManifestItem("b.wav", 16000, 0)]
    )
    feats, _ = layer_features(model, torch.from_numpy(wave)[None], torch.tensor([len(wave)]), 0)
    km = KMeansModel(centroids=feats[0, ::97].numpy().copy(), meta={"layer": 0})
    chunk = ChunkConfig(chunk_s=4, context_s=1)
    out = {}
    for name, c in (("windows", chunk), ("whole", None)):
        for kind in ("codes", "kmeans"):
            export_units(model, tmp_path / "m.tsv", tmp_path / f"{name}_{kind}", kind=kind, layer=0 if kind == "kmeans" else None,
                         kmeans=km if kind == "kmeans" else None, chunk=c)  # fmt: skip
            out[name, kind] = (tmp_path / f"{name}_{kind}/units.txt").read_text()
    for kind in ("codes", "kmeans"):
        assert out["windows", kind] == out["whole", kind]
        assert len(out["windows", kind].split("\n")[0].split()) == 1999  # 40 s of 20 ms frames


def test_extract_features_formats_agree_and_index_every_utterance(tmp_path: Path) -> None:
    model = _model("conv_group_norm")
    save_pretrained(model, tmp_path / "model")
    items = []
    for i, seconds in enumerate((1.0, 2.5, 0.01, 30.0)):  # 0.01 s is shorter than one frame
        n = int(seconds * 16000)
        sf.write(tmp_path / f"u{i}.wav", speechlike(seconds, seed=i)[:n], 16000, subtype="FLOAT")
        items.append(ManifestItem(f"u{i}.wav", n, 0))
    write_manifest(tmp_path / "m.tsv", tmp_path, items)
    for fmt in ("npy", "safetensors"):
        argv = ["extract-features", str(tmp_path / "model"), str(tmp_path / "m.tsv"), "--layers", "transformer_input,1",
                "--out", str(tmp_path / fmt), "--format", fmt, "--chunk-s", "5", "--context-s", "1",
                "--shard-frames", "150"]  # fmt: skip
        assert main(argv) == 0
    for layer in ("transformer_input", 1):
        a, b = read_features(tmp_path / "npy", layer), read_features(tmp_path / "safetensors", layer)
        assert list(a) == [f"u{i}.wav" for i in range(4)]
        assert [len(a[k]) for k in a] == [49, 124, 0, 1499]
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        ref = _whole(model, torch.from_numpy(sf.read(tmp_path / "u1.wav", dtype="float32")[0]), layer)
        np.testing.assert_allclose(a["u1.wav"], ref.numpy(), rtol=0, atol=1e-5)  # short: one whole pass
    assert (tmp_path / "npy/layer_1/shard_00002.npy").is_file()  # u3 (1499 frames) has its own shard
