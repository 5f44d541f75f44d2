"""Manifests, label files, AudioDataset (crops, filters, labels) and Hugging Face dataset sources."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.data import AudioDataset, ManifestItem, read_labels, read_manifest, write_manifest
from speechvq.errors import UserInputError

SR = 16000


def _write_corpus(root: Path, lengths: list[int], rate: int = SR) -> Path:
    items = []
    for k, n in enumerate(lengths):
        wav = np.random.default_rng(k).uniform(-0.5, 0.5, n).astype(np.float32)
        sf.write(root / f"u{k}.flac", wav, rate)
        items.append(ManifestItem(f"u{k}.flac", n, 0))
    write_manifest(root / "m.tsv", root, items)
    (root / "m.wrd").write_text("".join(f"WORD {k}\n" for k in range(len(lengths))))
    return root / "m.tsv"


def test_read_manifest_round_trips_write_manifest(tmp_path: Path) -> None:
    items = [ManifestItem("a/b.flac", 123, 0), ManifestItem("c d.wav", 0, 0)]
    write_manifest(tmp_path / "x.tsv", tmp_path, items)
    m = read_manifest(tmp_path / "x.tsv")
    assert m.root == tmp_path.resolve()
    assert [(i.relpath, i.num_samples, i.line) for i in m.items] == [("a/b.flac", 123, 2), ("c d.wav", 0, 3)]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("", r"x\.tsv:1: the first line must be the audio root"),
        ("/r\na.wav\t12\nb.wav 13\n", r"x\.tsv:3: expected 'relpath<TAB>num_samples'"),
        ("/r\na.wav\tlots\n", r"x\.tsv:2: num_samples must be an integer, but is 'lots' instead"),
        ("/r\na.wav\t-1\n", r"x\.tsv:2: num_samples must be >= 0"),
    ],
)
def test_read_manifest_raises_naming_file_and_line(tmp_path: Path, body: str, match: str) -> None:
    (tmp_path / "x.tsv").write_text(body)
    with pytest.raises(UserInputError, match=match):
        read_manifest(tmp_path / "x.tsv")


def test_read_labels_raises_on_undecodable_line(tmp_path: Path) -> None:
    (tmp_path / "x.wrd").write_bytes(b"OK\nBAD \xff\n")
    with pytest.raises(UserInputError, match=r"x\.wrd:2: transcript is not valid UTF-8"):
        read_labels(tmp_path / "x.wrd")
    (tmp_path / "y.wrd").write_text("A B\n\nC\n")
    assert read_labels(tmp_path / "y.wrd") == ["A B", "", "C"]


def test_dataset_filters_short_items_and_logs_the_dropped_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = _write_corpus(tmp_path, [300, 5000, 9000, 200])
    with caplog.at_level(logging.INFO):
        ds = AudioDataset(m, min_sample_size=400)
    assert len(ds) == 2 and ds.num_filtered == 2
    assert ds.sizes.tolist() == [5000, 9000]
    assert "dropped 2 of 4 items shorter than 400 samples" in caplog.text


def test_dataset_random_crop_is_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    m = _write_corpus(tmp_path, [20000, 30000])
    full = AudioDataset(m)[1]["waveform"]
    ds = AudioDataset(m, max_sample_size=4000, seed=1)
    assert ds.sizes.tolist() == [4000, 4000]
    a = ds[1]["waveform"]
    assert a.numel() == 4000
    assert torch.equal(a, AudioDataset(m, max_sample_size=4000, seed=1)[1]["waveform"])
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        w = ds[1]["waveform"]
        found = [s for s in np.flatnonzero(full.numpy() == w[0].item()) if torch.equal(full[s : s + 4000], w)]
        assert found  # a contiguous window of the full utterance
        starts.add(int(found[0]))
    assert len(starts) > 1
    assert not torch.equal(a, AudioDataset(m, max_sample_size=4000, seed=2)[1]["waveform"])


def test_dataset_eval_crop_is_deterministic_from_the_start(tmp_path: Path) -> None:
    m = _write_corpus(tmp_path, [20000])
    full = AudioDataset(m)[0]["waveform"]
    ds = AudioDataset(m, max_sample_size=4000, random_crop=False)
    ds.set_epoch(5)
    assert torch.equal(ds[0]["waveform"], full[:4000])


def test_dataset_resamples_to_the_target_rate_and_carries_text(tmp_path: Path) -> None:
    m = _write_corpus(tmp_path, [8000, 4000], rate=SR)
    ds = AudioDataset(m, sample_rate=8000, labels="wrd")
    item = ds[0]
    assert item["index"] == 0 and item["text"] == "WORD 0"
    assert abs(item["waveform"].numel() - 4000) <= 1


def test_dataset_normalize_standardises_each_item(tmp_path: Path) -> None:
    m = _write_corpus(tmp_path, [8000])
    w = AudioDataset(m, normalize=True)[0]["waveform"]
    assert abs(float(w.mean())) < 1e-4 and abs(float(w.std(unbiased=False)) - 1) < 1e-3


def _wav_bytes(n: int, rate: int, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def test_dataset_reads_a_parquet_dataset_with_audio_bytes_and_text(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    audio = [
        {"bytes": _wav_bytes(8000, SR, 0), "path": "a.wav"},
        {"bytes": _wav_bytes(11025, 22050, 1), "path": "b.wav"},
    ]
    table = pa.table({"audio": audio, "text": ["HELLO", "WORLD"]})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "train-00000-of-00001.parquet")
    ds = AudioDataset(tmp_path, labels="text")
    assert ds.sizes.tolist() == [8000, 8000]
    assert ds[1]["text"] == "WORLD" and ds[1]["waveform"].numel() == 8000


def test_dataset_reads_a_save_to_disk_directory(tmp_path: Path) -> None:
    import pyarrow as pa

    # the layout datasets' save_to_disk writes: arrow stream files listed in state.json
    table = pa.table({"audio": [{"bytes": _wav_bytes(4000, SR, 2), "path": None}], "sentence": ["HI"]})
    with (
        pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (tmp_path / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    ds = AudioDataset(tmp_path, labels="sentence")
    assert ds[0]["text"] == "HI" and ds[0]["waveform"].numel() == 4000


def test_dataset_reads_an_audiofolder_with_metadata(tmp_path: Path) -> None:
    for k in range(2):
        (tmp_path / f"x{k}.wav").write_bytes(_wav_bytes(3000 + k, SR, k))
    (tmp_path / "metadata.csv").write_text("file_name,transcription\nx0.wav,ZERO\nx1.wav,ONE\n")
    ds = AudioDataset(tmp_path, labels="transcription")
    assert [ds[k]["text"] for k in range(2)] == ["ZERO", "ONE"]
    assert ds.sizes.tolist() == [3000, 3001]


def test_dataset_raises_for_a_datasetdict_root_naming_the_splits(tmp_path: Path) -> None:
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(
        UserInputError, match=r"DatasetDict; give one split's directory, one of \['train', 'test'\]"
    ):
        AudioDataset(tmp_path)


def test_dataset_reads_what_datasets_save_to_disk_writes(tmp_path: Path) -> None:
    import datasets  # a hard dependency: failing to import it is a failure

    audio = [{"bytes": _wav_bytes(4000 + k, SR, k), "path": f"{k}.wav"} for k in range(3)]
    ds_hf = datasets.Dataset.from_dict({"audio": audio, "text": ["A", "B", "C"]})
    ds_hf = ds_hf.cast_column("audio", datasets.Audio(decode=False))
    ds_hf.save_to_disk(str(tmp_path / "hf"))
    ds = AudioDataset(tmp_path / "hf", labels="text")
    assert ds.sizes.tolist() == [4000, 4001, 4002]
    assert [ds[k]["text"] for k in range(3)] == ["A", "B", "C"]


def test_validate_accepts_a_local_dataset_and_reports_its_bad_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speechvq.cli import main

    audio = [{"bytes": _wav_bytes(8000, SR, 0), "path": "a.wav"}, {"bytes": b"not audio", "path": "b.wav"}]
    pq.write_table(pa.table({"audio": audio, "text": ["HELLO", ""]}), tmp_path / "d.parquet")
    assert main(["validate", str(tmp_path / "d.parquet"), "--labels", "text"]) == 1
    out = capsys.readouterr().out
    assert "d.parquet[1] (b.wav): cannot decode audio" in out
    assert "d.parquet[1] column 'text': transcript is empty" in out
    assert "2 problem(s) in 2 items" in out
