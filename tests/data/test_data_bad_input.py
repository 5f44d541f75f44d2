"""Bad-input matrix: one generated file per problem; validate names each, training skips them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import speechvq
from speechvq.cli import main
from speechvq.data import AudioDataset, BucketBatchSampler, ManifestItem, collate_audio, write_manifest
from speechvq.data.checks import DEFAULT_LETTERS

SR = 16000

# name -> (expected category, substring of the reason validate prints)
PROBLEMS = {
    "missing": ("missing", "does not exist"),
    "unreadable": ("unreadable", "readable"),
    "corrupt": ("corrupt", "cannot decode audio"),
    "zero": ("empty", "has no samples"),
    "short": ("too_short", "too few samples"),
    "nan": ("non_finite", "NaN or inf"),
    "rate": ("length_mismatch", "sample rate mismatch"),
    "badutf8": ("bad_transcript", "not valid UTF-8"),
    "emptytext": ("bad_transcript", "transcript is empty"),
    "oov": ("out_of_vocabulary", "outside the vocabulary"),
}


def _tone(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * np.sin(np.arange(n) * rng.uniform(0.01, 0.2)) + 0.01 * rng.standard_normal(n)).astype(
        np.float32
    )


def make_bad_corpus(root: Path) -> Path:
    """Write 6 good and 10 bad utterances with a manifest and .wrd labels; return the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, int, bytes]] = []
    for k in range(6):
        n = SR // 2 + 1000 * k
        sf.write(root / f"good{k}.wav", _tone(n, k), SR)
        rows.append((f"good{k}.wav", n, b"HELLO WORLD"))
    rows.append(("missing.wav", 8000, b"GONE"))
    unreadable = root / "unreadable.wav"
    if os.geteuid() == 0:  # root reads anything: a directory stands in for an unreadable file
        unreadable.mkdir()
    else:
        sf.write(unreadable, _tone(8000, 1), SR)
        unreadable.chmod(0)
    rows.append(("unreadable.wav", 8000, b"LOCKED"))
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)) * 8)
    rows.append(("corrupt.wav", 8000, b"BROKEN"))
    sf.write(root / "zero.wav", np.zeros(0, np.float32), SR)
    rows.append(("zero.wav", 0, b"NOTHING"))
    sf.write(root / "short.wav", _tone(100, 2), SR)
    rows.append(("short.wav", 100, b"SHORT"))
    nan = _tone(8000, 3)
    nan[100] = np.nan
    nan[200] = np.inf
    sf.write(root / "nan.wav", nan, SR, subtype="FLOAT")
    rows.append(("nan.wav", 8000, b"NOT A NUMBER"))
    sf.write(root / "rate.wav", _tone(4000, 4), 8000)  # 8 kHz file, manifest counts 16 kHz samples
    rows.append(("rate.wav", 8000, b"RATE"))
    for name, text in (
        ("badutf8", b"CAF\xc3\x28 NOIR"),
        ("emptytext", b"   "),
        ("oov", b"HELLO W\xe2\x98\x83RLD 42"),
    ):
        sf.write(root / f"{name}.wav", _tone(8000, 5), SR)
        rows.append((f"{name}.wav", 8000, text))
    manifest = root / "train.tsv"
    write_manifest(manifest, root, [ManifestItem(relpath=r, num_samples=n, line=0) for r, n, _ in rows])
    (root / "train.wrd").write_bytes(b"".join(t + b"\n" for _, _, t in rows))
    return manifest


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bad_corpus(tmp_path_factory.mktemp("bad"))


def test_validate_names_every_bad_file_with_its_reason(
    bad_manifest: Path, capsys: pytest.CaptureFixture
) -> None:
    rc = main(["validate", str(bad_manifest), "--min-samples", "400"])
    out = capsys.readouterr().out
    assert rc == 1
    lines = out.strip().splitlines()
    for name, (_, reason) in PROBLEMS.items():
        hits = [ln for ln in lines if f"{name}.wav" in ln and reason in ln]
        assert hits, f"validate did not report {name} ({reason!r}):\n{out}"
    assert not any("good" in ln for ln in lines)
    assert f"{len(PROBLEMS)} problem(s) in 16 items" in lines[-1]


def test_validate_exits_zero_on_a_clean_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sf.write(tmp_path / "a.wav", _tone(8000, 0), SR)
    write_manifest(tmp_path / "m.tsv", tmp_path, [ManifestItem("a.wav", 8000, 0)])
    assert main(["validate", str(tmp_path / "m.tsv")]) == 0
    assert "no problems" in capsys.readouterr().out


def test_validate_lists_every_bad_manifest_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m.tsv").write_text(f"{tmp_path}\na.wav\tmany\nb.wav\nc.wav\t-3\n")
    assert main(["validate", str(tmp_path / "m.tsv")]) == 1
    out = capsys.readouterr().out
    for lineno in (2, 3, 4):
        assert f"m.tsv:{lineno}:" in out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_epoch_over_bad_manifest_completes_and_reports_skipped(
    bad_manifest: Path, num_workers: int
) -> None:
    ds = AudioDataset(bad_manifest, min_sample_size=400, labels="wrd", vocab=DEFAULT_LETTERS - {"|"})
    assert ds.num_filtered == 2  # zero.wav and short.wav, dropped from their listed lengths
    sampler = BucketBatchSampler(ds.sizes, 32_000, seed=0)
    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=sampler, collate_fn=ds.collate, num_workers=num_workers
    )
    model = speechvq.build_wav2vec2(speechvq.preset("tiny")).eval()
    seen, dropped, reasons = 0, 0, {}
    with torch.no_grad():
        for batch in loader:
            dropped += batch.num_dropped
            reasons.update(batch.skipped)
            if len(batch) == 0:
                continue
            out = model(batch.waveforms, batch.lengths)
            assert torch.isfinite(model.compute_loss(out).total)
            seen += len(batch)
    assert seen == 6
    assert dropped == len(reasons) == 8
    counts = ds.bad_items()  # shared across DataLoader workers
    assert sum(counts.values()) == 8
    assert counts == {
        "missing": 1,
        "unreadable": 1,
        "corrupt": 1,
        "non_finite": 1,
        "length_mismatch": 1,
        "bad_transcript": 2,
        "out_of_vocabulary": 1,
    }
    assert ds.log_epoch_report(0) == counts


def test_collate_audio_drops_none_pads_with_zeros_and_never_crops() -> None:
    items = [
        {"index": 3, "waveform": torch.ones(5), "text": "A"},
        None,
        {"index": 7, "waveform": torch.full((2,), 2.0), "text": "B"},
    ]
    batch = collate_audio(items)
    assert batch.num_dropped == 1
    assert batch.waveforms.tolist() == [[1, 1, 1, 1, 1], [2, 2, 0, 0, 0]]
    assert batch.lengths.tolist() == [5, 2]
    assert batch.indices.tolist() == [3, 7]
    assert batch.texts == ["A", "B"]
    empty = collate_audio([None])
    assert len(empty) == 0 and empty.num_dropped == 1
