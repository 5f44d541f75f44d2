from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.data import AudioDataset, ManifestItem, write_manifest
from speechvq.data.augment import (
    AugmentConfig,
    WaveAugmenter,
    add_noise,
    augment,
    build_augmenter,
    noise_files,
)
from speechvq.errors import UserInputError
from speechvq.train.config import config_from_dict

SR = 16000


def _sine(freq: float, seconds: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_noises(folder: Path, count: int = 2) -> Path:
    """White and pink-ish noise at 8 kHz (resampled when read), one in a subfolder."""
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    white = rng.standard_normal(8000).astype(np.float32) * 0.1
    pink = np.cumsum(rng.standard_normal(12000)).astype(np.float32)
    pink = 0.1 * (pink - pink.mean()) / pink.std()
    sf.write(folder / "white.wav", white, 8000)
    sf.write(folder / "sub" / "pink.flac", pink, 8000)
    return folder


def _corpus(root: Path, num: int = 4) -> Path:
    rng = np.random.default_rng(1)
    items = []
    for i in range(num):
        n = int(SR * rng.uniform(0.8, 1.2))
        wav = (0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * np.arange(n) / SR)).astype(np.float32)
        sf.write(root / f"u{i}.wav", wav + 0.01 * rng.standard_normal(n).astype(np.float32), SR)
        items.append(ManifestItem(relpath=f"u{i}.wav", num_samples=n, line=0))
    write_manifest(root / "train.tsv", root, items)
    return root / "train.tsv"


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    noise = noisy.astype(np.float64) - clean
    return float(10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2)))


ALL_ON = dict(speed_prob=0.5, noise_prob=0.7, gain_prob=0.7, reverb_prob=0.5)


def test_augment_is_a_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path)
    cfg = AugmentConfig(noise_dir=str(_write_noises(tmp_path / "noise")), **ALL_ON)

    def epoch_items(epoch: int) -> list[torch.Tensor]:
        ds = AudioDataset(manifest, max_sample_size=12000, seed=3, augment=WaveAugmenter(cfg, SR))
        ds.set_epoch(epoch)
        return [ds[i]["waveform"] for i in reversed(range(len(ds)))]  # order must not matter

    first, again, other = epoch_items(1), epoch_items(1), epoch_items(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))


def test_dataset_without_augmentation_is_unchanged(tmp_path: Path) -> None:
    manifest = _corpus(tmp_path)
    plain = AudioDataset(manifest, max_sample_size=12000, seed=5, normalize=True)
    off = AudioDataset(
        manifest, max_sample_size=12000, seed=5, normalize=True, augment=build_augmenter(AugmentConfig(), SR)
    )
    assert off.augment is None  # every step off: no augmenter at all
    # an augmenter whose steps never fire leaves waveforms (and so the crops) bit-identical
    never = AudioDataset(
        manifest, max_sample_size=12000, seed=5, normalize=True, augment=WaveAugmenter(AugmentConfig(), SR)
    )
    for ds in (off, never):
        for epoch in (0, 1):
            plain.set_epoch(epoch)
            ds.set_epoch(epoch)
            for i in range(len(plain)):
                assert torch.equal(plain[i]["waveform"], ds[i]["waveform"])


def test_noise_is_added_at_an_snr_within_the_range(tmp_path: Path) -> None:
    cfg = AugmentConfig(
        noise_dir=str(_write_noises(tmp_path / "noise")), noise_prob=1.0, noise_snr_db=(5.0, 10.0)
    )
    aug = WaveAugmenter(cfg, SR)
    clean = _sine(300)
    snrs = [_snr_db(clean, aug(clean, np.random.default_rng(i))) for i in range(20)]
    assert all(5.0 - 1e-3 <= s <= 10.0 + 1e-3 for s in snrs), snrs
    assert max(snrs) - min(snrs) > 1.0  # drawn, not fixed


def test_add_noise_loops_a_short_recording_and_leaves_silence_alone() -> None:
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(100).astype(np.float32)
    out = add_noise(_sine(200), noise, 0.0, rng)
    assert out.shape == (SR,) and abs(_snr_db(_sine(200), out)) < 1e-3
    silent = np.zeros(500, np.float32)
    assert np.array_equal(add_noise(silent, noise, 0.0, rng), silent)


def test_gain_lies_in_the_db_range() -> None:
    cfg = AugmentConfig(gain_prob=1.0, gain_db=(-6.0, 3.0))
    wave = _sine(200)
    gains = [
        20 * np.log10(np.max(np.abs(augment(wave, np.random.default_rng(i), cfg, [], SR))) / 0.5)
        for i in range(30)
    ]
    assert all(-6.0 - 1e-3 <= g <= 3.0 + 1e-3 for g in gains), gains
    assert min(gains) < -3 and max(gains) > 0


def test_speed_perturbation_shortens_and_raises_the_pitch() -> None:
    cfg = AugmentConfig(speed_prob=1.0, speed_factors=(1.1,))
    wave = _sine(1000, seconds=2.0)
    out = augment(wave, np.random.default_rng(0), cfg, [], SR)
    assert abs(out.size - wave.size / 1.1) <= 2
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak_hz = np.argmax(spectrum) * SR / out.size
    assert abs(peak_hz - 1100) < 2


def test_reverberation_keeps_length_and_level_and_smears() -> None:
    cfg = AugmentConfig(reverb_prob=1.0, reverb_rt60_s=(0.5, 0.5))
    click = np.zeros(SR, np.float32)
    click[100] = 1.0
    out = augment(click, np.random.default_rng(0), cfg, [], SR)
    assert out.shape == click.shape and out.dtype == np.float32
    assert np.isclose(np.sum(out.astype(np.float64) ** 2), 1.0, rtol=1e-4)  # same energy
    assert np.abs(out[2000:]).max() > 1e-4  # a tail well after the click


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"noise_snr_db": [20.0, 5.0]}, "data.augment.noise_snr_db"),
        ({"gain_prob": 1.5}, "data.augment.gain_prob"),
        ({"speed_factors": [0.9, 3.0]}, "data.augment.speed_factors[1]"),
        ({"speed_factors": []}, "data.augment.speed_factors"),
        ({"reverb_rt60_s": [0.0, 0.5]}, "data.augment.reverb_rt60_s[0]"),
        ({"noise_prob": 0.5}, "data.augment.noise_dir"),
        ({"gain_db": [-6.0]}, "data.augment.gain_db"),
    ],
)
def test_bad_augment_values_raise_naming_the_field(tmp_path: Path, fields: dict, name: str) -> None:
    with pytest.raises(UserInputError, match="`" + re.escape(name) + "`"):
        config_from_dict({"data": {"train": "x.tsv", "augment": fields}}).data.validate()


@pytest.mark.parametrize("make", ["missing", "empty", "no_audio"])
def test_a_missing_or_empty_noise_folder_is_an_error_naming_it(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "noises"
    if make != "missing":
        folder.mkdir()
    if make == "no_audio":
        (folder / "readme.txt").write_text("not audio")
    cfg = AugmentConfig(noise_dir=str(folder), noise_prob=1.0)
    with pytest.raises(UserInputError, match=str(folder)):
        WaveAugmenter(cfg, SR)


def test_noise_files_are_found_recursively(tmp_path: Path) -> None:
    folder = _write_noises(tmp_path / "n")
    files = noise_files(folder)
    assert [p.relative_to(folder).as_posix() for p in files] == ["sub/pink.flac", "white.wav"]


def test_old_configs_without_augment_load_with_it_off() -> None:
    cfg = config_from_dict({"data": {"train": "x.tsv"}})
    assert cfg.data.augment == AugmentConfig() and not cfg.data.augment.enabled
