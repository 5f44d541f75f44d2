"""Real recordings of every format, rate and channel count load to mono 16 kHz float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from speechvq.cli import main
from speechvq.data import RawFormat, load_audio, read_labels, read_manifest
from speechvq.errors import UserInputError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "real_speech"
MISC = sorted(p for p in (FIXTURES / "misc").iterdir() if p.suffix != ".raw")
LIBRI = sorted((FIXTURES / "LibriSpeech").rglob("*.flac"))
MP3_SUPPORTED = "MP3" in sf.available_formats()


@pytest.mark.parametrize("path", MISC + LIBRI, ids=lambda p: p.name)
def test_load_audio_reads_every_real_file_as_mono_16k_float(path: Path) -> None:
    if path.suffix == ".mp3" and not MP3_SUPPORTED:
        with pytest.raises(UserInputError, match="MP3"):
            load_audio(path)
        return
    info = sf.info(str(path))
    wav = load_audio(path)
    assert wav.dtype == torch.float32 and wav.ndim == 1
    expected = info.frames * 16000 / info.samplerate
    tolerance = 0.01 * expected if info.format == "MP3" else 2  # mp3 headers estimate the length
    assert abs(wav.numel() - expected) <= tolerance
    assert torch.isfinite(wav).all() and 0.01 < wav.abs().max() <= 1.0


def test_real_fixtures_cover_the_rates_formats_and_channels_in_shared_data() -> None:
    infos = [sf.info(str(p)) for p in MISC + LIBRI if p.suffix != ".mp3" or MP3_SUPPORTED]
    assert {i.samplerate for i in infos} >= {8000, 11025, 16000, 22050, 44100, 48000}
    assert {i.format for i in infos} >= {"WAV", "FLAC", "AIFF"} | ({"MP3"} if MP3_SUPPORTED else set())
    assert {i.channels for i in infos} == {1, 2}


def test_load_audio_mixes_stereo_down_to_the_channel_mean() -> None:
    path = FIXTURES / "misc" / "jfk_excerpt_44k_stereo.flac"
    data, sr = sf.read(str(path), dtype="float32")
    wav = load_audio(path, sample_rate=sr)
    torch.testing.assert_close(wav, torch.from_numpy(data.mean(axis=1)))


def test_load_audio_reads_headerless_pcm_with_an_explicit_format() -> None:
    path = FIXTURES / "misc" / "goforward_16k_s16le.raw"
    wav = load_audio(path, raw_format=RawFormat(sample_rate=16000, channels=1, subtype="PCM_16"))
    assert wav.numel() == path.stat().st_size // 2
    assert 0.01 < wav.abs().max() <= 1.0
    resampled = load_audio(path, sample_rate=8000, raw_format=RawFormat.parse("16000:1:PCM_16:LITTLE"))
    assert abs(resampled.numel() - wav.numel() / 2) <= 1


def test_load_audio_raises_when_raw_pcm_has_no_format() -> None:
    with pytest.raises(
        UserInputError, match=r"goforward_16k_s16le\.raw: headerless PCM needs an explicit raw format"
    ):
        load_audio(FIXTURES / "misc" / "goforward_16k_s16le.raw")


def test_load_audio_normalize_gives_zero_mean_unit_variance() -> None:
    wav = load_audio(LIBRI[0], normalize=True)
    assert abs(float(wav.mean())) < 1e-4
    assert abs(float(wav.std(unbiased=False)) - 1.0) < 0.01  # eps 1e-5 in the variance, as fairseq


def test_prepare_librispeech_manifest_matches_the_excerpt_layout(tmp_path: Path) -> None:
    root = FIXTURES / "LibriSpeech"
    assert main(["prepare-librispeech", str(root), "--out", str(tmp_path)]) == 0
    manifest = read_manifest(tmp_path / "test-clean.tsv")
    assert manifest.root.resolve() == (root / "test-clean").resolve()
    expected = sorted(p.relative_to(root / "test-clean").as_posix() for p in LIBRI)
    assert [it.relpath for it in manifest.items] == expected
    for it in manifest.items:
        assert it.num_samples == sf.info(str(manifest.audio_path(it))).frames
    words = read_labels(tmp_path / "test-clean.wrd")
    trans = {}
    for t in root.rglob("*.trans.txt"):
        for line in t.read_text().splitlines():
            utt, _, text = line.partition(" ")
            trans[utt] = text
    assert words == [trans[Path(r).stem] for r in expected]
    letters = read_labels(tmp_path / "test-clean.ltr")
    assert letters[2] == "H E | C O U L D | W A I T | N O | L O N G E R |"
    assert (tmp_path / "dict.ltr.txt").read_text().startswith("| ")


def test_manifest_command_scans_a_tree_and_splits_off_valid(tmp_path: Path) -> None:
    assert (
        main(["manifest", str(FIXTURES), "--ext", "flac", "--valid-percent", "50", "--out", str(tmp_path)])
        == 0
    )
    train = read_manifest(tmp_path / "train.tsv")
    valid = read_manifest(tmp_path / "valid.tsv")
    all_flac = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*.flac"))
    assert sorted(it.relpath for it in train.items + valid.items) == all_flac
    assert train.items and valid.items


def test_load_audio_explains_missing_mp3_support_of_an_old_libsndfile(tmp_path: Path, monkeypatch) -> None:
    import speechvq.data.audio as audio

    bad = tmp_path / "clip.mp3"
    bad.write_bytes(b"\x00" * 64)  # undecodable under any libsndfile
    monkeypatch.setattr(audio.sf, "available_formats", lambda: {"WAV": "WAV"})
    with pytest.raises(
        UserInputError, match=r"clip\.mp3: cannot decode audio: .*has no MP3 support; it needs >= 1\.1\.0"
    ):
        load_audio(bad)
