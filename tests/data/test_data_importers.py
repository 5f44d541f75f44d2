"""``speechvq import`` for every corpus format, on small fixtures in each format's real layout
(tests/fixtures/corpora, audio from tests/fixtures/real_speech), and ``manifest`` over mixed formats."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from speechvq.cli import main
from speechvq.data import AudioDataset, read_manifest
from speechvq.data.corpora import read_commonvoice, read_lhotse
from speechvq.text.normalize import TextNormalizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CORPORA = FIXTURES / "corpora"
REAL = FIXTURES / "real_speech"
STUFF = REAL / "LibriSpeech/test-clean/1089/134686/1089-134686-0001.flac"
WAIT = REAL / "LibriSpeech/test-clean/1089/134691/1089-134691-0000.flac"
LJ = REAL / "misc/LJ002-0020_22k.wav"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _audio(out: Path, split: str = "train") -> dict[str, np.ndarray]:
    """id -> samples of every item of ``out/<split>.tsv``, checking the listed lengths."""
    manifest = read_manifest(out / f"{split}.tsv")
    ids = _lines(out / f"{split}.ids")
    audio = {}
    for utt_id, item in zip(ids, manifest.items, strict=True):
        data, _ = sf.read(str(manifest.audio_path(item)), dtype="float32")
        assert len(data) == item.num_samples
        audio[utt_id] = data
    return audio


def test_text_normalizer_makes_librispeech_style_words_and_every_step_can_be_turned_off() -> None:
    text = "\u201cStuff it into you,\u201d his belly\u2014counselled him. Don\u2019t\tstop! \uff21"
    assert TextNormalizer()(text) == "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM DON'T STOP A"
    assert TextNormalizer(case="lower")("'Tis  well-known") == "tis well known"
    kept = TextNormalizer(case="keep", punctuation="keep", unicode_form="none")(" a,  B \n")
    assert kept == "a, B"


def test_import_kaldi_cuts_segments_keeps_speakers_and_splits_them_apart(tmp_path: Path) -> None:
    out = tmp_path / "sv"
    argv = ["import", "kaldi", str(CORPORA / "kaldi/train"), "--audio-root", str(FIXTURES), "--out", str(out),
            "--valid-percent", "30"]  # fmt: skip
    assert main(argv) == 0
    train_ids, valid_ids = _lines(out / "train.ids"), _lines(out / "valid.ids")
    assert sorted(train_ids + valid_ids) == ["1089-134686-0001-seg", "1089-134691-0000-seg", "LJ002-0020-seg"]
    speakers = {"train": set(_lines(out / "train.spk")), "valid": set(_lines(out / "valid.spk"))}
    assert speakers["train"] and speakers["valid"] and not speakers["train"] & speakers["valid"]
    # each segment holds exactly the recording's samples from start to end (segments: 0.25-3.10,
    # 0.10-end, 0.00-1.50 s), at the recording's own rate
    audio = {**_audio(out, "train"), **_audio(out, "valid")}
    for utt, path, start_s, end_s in (
        ("1089-134686-0001-seg", STUFF, 0.25, 3.10),
        ("1089-134691-0000-seg", WAIT, 0.10, None),
        ("LJ002-0020-seg", LJ, 0.0, 1.50),
    ):
        source, rate = sf.read(str(path), dtype="float32")
        stop = len(source) if end_s is None else round(end_s * rate)
        np.testing.assert_array_equal(audio[utt], source[round(start_s * rate) : stop])
    words = dict(zip(train_ids + valid_ids, _lines(out / "train.wrd") + _lines(out / "valid.wrd")))
    assert words["LJ002-0020-seg"] == "IN EIGHTEEN THIRTEEN"
    letters = _lines(out / "train.ltr") + _lines(out / "valid.ltr")
    assert "I N | E I G H T E E N | T H I R T E E N |" in letters
    assert (out / "dict.ltr.txt").read_text().split("\n")[0].split()[0] == "|"


def test_import_kaldi_refuses_piped_commands_and_archives_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "wav.scp").write_text(f"a {STUFF}\nb sox {WAIT} -t wav - |\n")
    assert main(["import", "kaldi", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'wav.scp'}:2: the recording is a piped command" in err and "runs no command" in err
    assert len(err.strip().splitlines()) == 1
    (data / "wav.scp").write_text("a feats/raw.ark:1234\n")
    assert main(["import", "kaldi", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "wav.scp:1: the recording is in a Kaldi archive" in capsys.readouterr().err
    (data / "wav.scp").write_text(f"a {STUFF}\n")
    (data / "text").write_text("a HELLO\nzz NOT LISTED\n")
    assert main(["import", "kaldi", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "text:2: utterance 'zz' of text is not a listed utterance" in capsys.readouterr().err


def test_import_lhotse_recordings_and_supervisions_and_cuts(tmp_path: Path) -> None:
    lhotse = CORPORA / "lhotse"
    utts = read_lhotse(
        lhotse / "libri_recordings.jsonl.gz", lhotse / "libri_supervisions.jsonl.gz", audio_root=FIXTURES
    )
    by_id = {u.id: u for u in utts}
    assert sorted(by_id) == ["1089-134686-0001", "1089-134691-0000-0", "LJ002-0020"]
    assert not by_id["1089-134686-0001"].is_segment  # spans its whole recording: not cut
    assert (by_id["1089-134691-0000-0"].start_s, by_id["1089-134691-0000-0"].end_s) == (0.1, 2.0)
    assert by_id["LJ002-0020"].speaker == "LJ"
    out = tmp_path / "sv"
    argv = ["import", "lhotse", str(lhotse / "libri_recordings.jsonl.gz"), str(lhotse / "libri_supervisions.jsonl.gz"),
            "--audio-root", str(FIXTURES), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    audio = _audio(out)
    source, _ = sf.read(str(WAIT), dtype="float32")
    np.testing.assert_array_equal(audio["1089-134691-0000-0"], source[1600:32000])
    assert _lines(out / "train.spk") == ["1089", "1089", "LJ"]
    # cuts: one cut per utterance, text from its supervisions, cut at the cut's own start/duration
    cuts = read_lhotse(lhotse / "cuts.jsonl", audio_root=FIXTURES)
    assert [(c.id, c.text, c.speaker, c.start_s, c.end_s) for c in cuts] == [
        ("LJ002-0020-cut", "IN EIGHTEEN THIRTEEN", "LJ", None, None),
        ("1089-134691-0000-cut", "HE COULD WAIT NO LONGER", "1089", 0.5, 2.0),
    ]


def test_import_ljspeech_takes_the_normalised_transcript_where_given(tmp_path: Path) -> None:
    corpus = tmp_path / "LJSpeech"
    (corpus / "wavs").mkdir(parents=True)
    shutil.copy(CORPORA / "ljspeech/metadata.csv", corpus / "metadata.csv")
    shutil.copy(LJ, corpus / "wavs/LJ002-0020.wav")
    for src in (WAIT, STUFF):  # the layout has wavs: write the flacs as wav
        data, rate = sf.read(str(src), dtype="int16")
        sf.write(str(corpus / "wavs" / (src.stem + ".wav")), data, rate, subtype="PCM_16")
    out = tmp_path / "sv"
    assert main(["import", "ljspeech", str(corpus), "--out", str(out), "--valid-percent", "40",
                 "--split-by", "utterance", "--seed", "3"]) == 0  # fmt: skip
    ids = _lines(out / "train.ids") + _lines(out / "valid.ids")
    words = dict(zip(ids, _lines(out / "train.wrd") + _lines(out / "valid.wrd")))
    assert words == {
        "LJ002-0020": "IN EIGHTEEN THIRTEEN",
        "1089-134691-0000": "HE COULD WAIT NO LONGER",
        "1089-134686-0001": "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM",  # no 3rd column: the 2nd
    }
    assert _lines(out / "valid.ids") and not (out / "train.spk").exists()  # one speaker: no ids


def test_import_speechbrain_csv_and_json_with_data_root(tmp_path: Path) -> None:
    out = tmp_path / "csv"
    assert main(["import", "speechbrain", str(CORPORA / "speechbrain/train.csv"), "--data-root", str(REAL),
                 "--out", str(out)]) == 0  # fmt: skip
    assert _lines(out / "train.ids") == ["1089-134686-0001", "1089-134691-0000", "LJ002-0020"]
    assert _lines(out / "train.wrd")[1] == "HE COULD WAIT NO LONGER"
    assert _lines(out / "train.spk") == ["1089", "1089", "LJ"]
    out = tmp_path / "json"
    assert main(["import", "speechbrain", str(CORPORA / "speechbrain/train.json"), "--data-root", str(REAL),
                 "--out", str(out), "--case", "keep"]) == 0  # fmt: skip
    audio = _audio(out)
    source, _ = sf.read(str(LJ), dtype="float32")
    np.testing.assert_array_equal(audio["LJ002-0020"], source[:33075])  # wav {file, start 0, stop 33075}
    assert _lines(out / "train.wrd") == ["he could wait no longer", "in eighteen thirteen"]


def test_import_speechbrain_without_data_root_names_the_placeholder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["import", "speechbrain", str(CORPORA / "speechbrain/train.csv"), "--out", str(tmp_path)]) == 2
    )
    assert "train.csv:2: the path '$data_root/" in capsys.readouterr().err


def test_import_commonvoice_reads_quotes_literally_and_client_ids_as_speakers(tmp_path: Path) -> None:
    release = tmp_path / "cv-corpus/en"
    (release / "clips").mkdir(parents=True)
    shutil.copy(CORPORA / "commonvoice/validated.tsv", release / "validated.tsv")
    for src in (WAIT, STUFF, LJ):  # Common Voice clips are mp3: encode the fixtures' audio
        data, rate = sf.read(str(src), dtype="float32")
        sf.write(str(release / "clips" / (src.stem.removesuffix("_22k") + ".mp3")), data, rate, format="MP3")
    out = tmp_path / "sv"
    assert main(["import", "commonvoice", str(release / "validated.tsv"), "--out", str(out),
                 "--valid-percent", "20"]) == 0  # fmt: skip
    assert _lines(out / "valid.ids") == ["LJ002-0020"] or _lines(out / "valid.ids") == [
        "1089-134691-0000",
        "1089-134686-0001",
    ]
    words = _lines(out / "train.wrd") + _lines(out / "valid.wrd")
    assert "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM" in words
    raw = TextNormalizer(case="keep", punctuation="keep")
    sentences = [raw(u.text or "") for u in read_commonvoice(release / "validated.tsv")]
    assert sentences[1] == '"Stuff it into you," his belly counselled him.'
    assert AudioDataset(out / "train.tsv", labels="wrd")[0] is not None  # mp3 lengths agree on reading


def _pretrain_yaml(path: Path, manifest: Path, **data: object) -> Path:
    cfg = {
        "model": {"preset": "tiny", "overrides": {"context.dropout_p": 0.0}},
        "data": {"train": str(manifest), "max_sample_size": 16000, "min_sample_size": 4000,
                 "max_tokens": 48000, **data},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 2, "log_interval": 1, "save_interval": 100, "progress_bar": False,
                  "tensorboard": False, "cpu": True},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_kaldi_dir_round_trips_into_pretraining(tmp_path: Path) -> None:
    out = tmp_path / "sv"
    assert main(["import", "kaldi", str(CORPORA / "kaldi/train"), "--audio-root", str(FIXTURES),
                 "--out", str(out)]) == 0  # fmt: skip
    config = _pretrain_yaml(tmp_path / "pt.yaml", out / "train.tsv")
    assert main(["pretrain", "--config", str(config), "--exp-dir", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp/checkpoints/step_00000002").is_dir()


def test_a_lhotse_manifest_round_trips_into_ctc_finetuning(tmp_path: Path) -> None:
    lhotse = CORPORA / "lhotse"
    out = tmp_path / "sv"
    assert main(["import", "lhotse", str(lhotse / "libri_recordings.jsonl.gz"),
                 str(lhotse / "libri_supervisions.jsonl.gz"), "--audio-root", str(FIXTURES), "--out", str(out)]) == 0  # fmt: skip
    cfg = {
        "model": {"preset": "tiny", "freeze_updates": 0, "layer_drop_p": 0.0},
        "mask": {"mask_prob": 0.0, "channel_prob": 0.0},
        "data": {"labels": "ltr", "max_tokens": 120000},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 2, "log_interval": 1, "valid_interval": 2, "save_interval": 100,
                  "progress_bar": False, "tensorboard": False, "cpu": True},
    }  # fmt: skip
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["finetune-ctc", "--config", str(tmp_path / "ft.yaml"), "--init", "none", "--train",
            str(out / "train.tsv"), "--valid", str(out / "train.tsv"), "--exp-dir", str(tmp_path / "exp")]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "exp/best_model").is_dir()


def test_one_manifest_call_indexes_every_format_of_the_mixed_real_speech_folder(tmp_path: Path) -> None:
    assert main(["manifest", str(REAL), "--out", str(tmp_path), "--valid-percent", "0"]) == 0
    listed = {Path(item.relpath).suffix for item in read_manifest(tmp_path / "train.tsv").items}
    assert listed == {".flac", ".wav", ".mp3", ".aiff"}  # the .raw file needs a format
    assert main(["manifest", str(REAL), "--out", str(tmp_path / "raw"), "--valid-percent", "0",
                 "--raw-format", "16000:1:PCM_16"]) == 0  # fmt: skip
    items = read_manifest(tmp_path / "raw/train.tsv").items
    raw = [it for it in items if it.relpath.endswith(".raw")]
    size = (REAL / "misc/goforward_16k_s16le.raw").stat().st_size
    assert len(raw) == 1 and raw[0].num_samples == size // 2
    assert len(items) == len(listed_items := read_manifest(tmp_path / "train.tsv").items) + 1, listed_items
    assert main(["manifest", str(REAL), "--out", str(tmp_path / "x"), "--ext", "mp3,aiff", "--ext", "flac",
                 "--valid-percent", "0"]) == 0  # fmt: skip
    assert {Path(i.relpath).suffix for i in read_manifest(tmp_path / "x/train.tsv").items} == {
        ".mp3", ".aiff", ".flac"
    }  # fmt: skip


def test_training_reads_headerless_pcm_with_data_raw_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "pcm"
    corpus.mkdir()
    shutil.copy(REAL / "misc/goforward_16k_s16le.raw", corpus / "a.raw")
    shutil.copy(STUFF, corpus / "b.flac")
    assert main(["manifest", str(corpus), "--out", str(tmp_path), "--valid-percent", "0",
                 "--raw-format", "16000:1:PCM_16"]) == 0  # fmt: skip
    manifest = tmp_path / "train.tsv"
    ds = AudioDataset(manifest, raw_format=None)
    assert [ds[i] is None for i in range(len(ds))] == [True, False]  # the .raw is skipped without a format
    config = _pretrain_yaml(tmp_path / "b.yaml", manifest, raw_format="16000:1:PCM_16")
    assert main(["pretrain", "--config", str(config), "--exp-dir", str(tmp_path / "exp")]) == 0
    bad = _pretrain_yaml(tmp_path / "c.yaml", manifest, raw_format="16000:1:PCM_17")
    capsys.readouterr()
    assert main(["pretrain", "--config", str(bad), "--exp-dir", str(tmp_path / "bad")]) == 2
    assert "PCM_17" in capsys.readouterr().err
