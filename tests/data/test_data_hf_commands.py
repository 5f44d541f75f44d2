"""Every command that reads data runs on a local Hugging Face dataset with a ``text`` column:
finetune-ctc, transcribe, export-units, extract-features (and the dataset needs no torchcodec)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from speechvq import build_wav2vec2, preset
from speechvq.cli import main
from speechvq.data import AudioDataset
from speechvq.io import save_pretrained
from speechvq.units.extract import read_features

TEXTS = ["a cab", "bad", "a bead", "dab a cad"]
LETTER_HZ = {"a": 220.0, "b": 330.0, "c": 440.0, "d": 550.0, "e": 660.0}


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tones(text: str) -> np.ndarray:
    """One 120 ms tone per letter, 60 ms of silence per space."""
    parts = []
    for ch in text:
        n = 960 if ch == " " else 1920
        t = np.arange(n) / 16000
        parts.append(np.zeros(n) if ch == " " else 0.4 * np.sin(2 * np.pi * LETTER_HZ[ch] * t))
    return np.concatenate([np.zeros(800), *parts, np.zeros(800)]).astype(np.float32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``save_to_disk`` dataset: an ``audio`` column (datasets' Audio feature) and ``text``."""
    import datasets

    root = tmp_path_factory.mktemp("hf")
    paths = []
    for i, text in enumerate(TEXTS):
        sf.write(root / f"utt{i}.wav", _tones(text), 16000, subtype="PCM_16")
        paths.append(str(root / f"utt{i}.wav"))
    ds = datasets.Dataset.from_dict({"audio": paths, "text": TEXTS, "speaker": ["s1", "s1", "s2", "s2"]})
    ds = ds.cast_column("audio", datasets.Audio(sampling_rate=16000))
    ds.save_to_disk(str(root / "dataset"))
    return root / "dataset"


def test_speechvq_reads_a_dataset_without_torchcodec(hf_dir: Path) -> None:
    """datasets' own Audio decoding needs torchcodec (and FFmpeg); speechvq decodes with soundfile."""
    import datasets

    loaded = datasets.load_from_disk(str(hf_dir))
    for source in (hf_dir, loaded):  # the directory, and the in-memory Dataset object
        ds = AudioDataset(source, labels="text")
        item = ds[3]
        assert item is not None and item["text"] == "dab a cad"
        np.testing.assert_allclose(item["waveform"].numpy(), _tones("dab a cad"), atol=1 / 32768)
    with pytest.raises(Exception, match=r"text column 'ltr' not found.*data\.labels=text"):
        AudioDataset(hf_dir, labels="ltr")


def test_finetune_ctc_and_transcribe_on_a_dataset_text_column(
    hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = {
        "model": {"preset": "tiny", "freeze_updates": 0, "layer_drop_p": 0.0, "dropout_p": 0.0},
        "mask": {"mask_prob": 0.0, "channel_prob": 0.0},
        "data": {"labels": "ltr", "max_tokens": 100000},
        "optim": {"lr": 3.0e-3, "weight_decay": 0.0, "clip_grad_norm": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 3, "log_interval": 1, "valid_interval": 3, "save_interval": 100,
                  "progress_bar": False, "tensorboard": False, "cpu": True},
    }  # fmt: skip
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    exp = tmp_path / "exp"
    argv = ["finetune-ctc", "--config", str(tmp_path / "ft.yaml"), "--init", "none", "--train", str(hf_dir),
            "--valid", str(hf_dir), "--exp-dir", str(exp), "--set", "data.labels=text"]  # fmt: skip
    assert main(argv) == 0
    vocab = (exp / "vocab.json").read_text()
    assert all(f'"{ch}"' in vocab for ch in "abcde")  # letters of the text column
    capsys.readouterr()
    assert main(["transcribe", str(exp / "best_model"), str(hf_dir), "--labels", "text"]) == 0
    out = capsys.readouterr()
    # ids: the audio path fields (save_to_disk embedded the bytes and kept the file names)
    assert [line.split("\t")[0] for line in out.out.splitlines()] == [f"utt{i}.wav" for i in range(4)]
    assert "WER" in out.err and "/8:" in out.err  # 8 reference words


def test_export_units_and_extract_features_on_a_dataset(hf_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_wav2vec2(preset("tiny")).eval()
    save_pretrained(model, tmp_path / "model")
    assert main(["export-units", str(tmp_path / "model"), str(hf_dir), "--out", str(tmp_path / "units"),
                 "--kind", "codes"]) == 0  # fmt: skip
    utts = (tmp_path / "units/utts.txt").read_text().splitlines()
    assert [Path(u).name for u in utts] == [f"utt{i}.wav" for i in range(4)]
    assert len((tmp_path / "units/units.txt").read_text().splitlines()) == 4
    assert main(["extract-features", str(tmp_path / "model"), str(hf_dir), "--layers", "1",
                 "--out", str(tmp_path / "feats")]) == 0  # fmt: skip
    feats = read_features(tmp_path / "feats", 1)
    assert [Path(k).name for k in feats] == [f"utt{i}.wav" for i in range(4)]
    assert all(f.shape[1] == 32 and f.shape[0] > 10 for f in feats.values())
