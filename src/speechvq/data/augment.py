"""On-the-fly waveform augmentation: speed perturbation, reverberation, additive noise, gain.

:func:`augment` is a pure function of the waveform, a numpy generator, the config and the noise
recordings; :class:`WaveAugmenter` binds the config, the sample rate and the lazily read noise
folder, and is what :class:`~speechvq.data.AudioDataset` calls. The steps run in a fixed order,
each with its own probability:

1. speed perturbation (resampling, so pitch and tempo change together, as Kaldi's
   ``perturb_data_dir_speed.sh``): factor ``f`` makes the utterance ``1/f`` times as long;
2. reverberation with a synthetic room impulse response (exponentially decaying noise);
3. additive noise at a signal-to-noise ratio drawn from a range;
4. gain.

Noise is added after reverberation because background noise in a room is not reverberated by the
speaker's impulse response (it is recorded as it is), and gain comes last so it scales speech and
noise together, as a recording level does.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from speechvq.data.audio import decode_audio, readable_suffixes
from speechvq.errors import UserInputError
from speechvq.ranges import check_range

logger = logging.getLogger(__name__)

MAX_SPEED_FACTOR = 2.0
"""Largest speed factor accepted (and 1 / it the smallest): beyond that speech is not speech."""


@dataclass(kw_only=True)
class AugmentConfig:
    """On-the-fly augmentation of training waveforms; every step is off by default (probability 0)."""

    speed_factors: tuple[float, ...] = (0.9, 1.0, 1.1)
    """Speed factors, one drawn uniformly per perturbed utterance; factor ``f`` resamples the
    waveform to ``1/f`` of its length, so pitch and tempo change together (Kaldi's speed
    perturbation)."""

    speed_prob: float = 0.0
    """Probability that an utterance is speed-perturbed."""

    noise_dir: str | None = None
    """Folder of noise recordings (searched recursively; any format soundfile reads), listed when
    the dataset is built, read once per process on the first augmented utterance, and resampled to
    the data sample rate."""

    noise_prob: float = 0.0
    """Probability that noise is added to an utterance (needs ``noise_dir``)."""

    noise_snr_db: tuple[float, float] = (5.0, 20.0)
    """Signal-to-noise ratio range in dB, drawn uniformly per noised utterance."""

    gain_db: tuple[float, float] = (-6.0, 6.0)
    """Gain range in dB, drawn uniformly per utterance. A no-op with ``data.normalize``, which
    rescales every utterance to unit variance."""

    gain_prob: float = 0.0
    """Probability that an utterance's gain is changed."""

    reverb_prob: float = 0.0
    """Probability that an utterance is convolved with a synthetic room impulse response."""

    reverb_rt60_s: tuple[float, float] = (0.2, 0.8)
    """Reverberation time (60 dB decay) range in seconds, drawn uniformly per reverberated utterance."""

    def validate(self, prefix: str = "data.augment") -> None:
        """Every value in its range; raises :class:`UserInputError` naming the first that is not."""
        if not self.speed_factors:
            raise UserInputError(
                f"`{prefix}.speed_factors` must list at least one factor, but is empty instead."
            )
        for i, factor in enumerate(self.speed_factors):
            check_range(f"{prefix}.speed_factors[{i}]", factor, 1 / MAX_SPEED_FACTOR, MAX_SPEED_FACTOR)
        for name in ("speed_prob", "noise_prob", "gain_prob", "reverb_prob"):
            check_range(f"{prefix}.{name}", getattr(self, name), 0, 1)
        _check_interval(f"{prefix}.noise_snr_db", self.noise_snr_db, -30.0, 100.0)
        _check_interval(f"{prefix}.gain_db", self.gain_db, -60.0, 60.0)
        _check_interval(f"{prefix}.reverb_rt60_s", self.reverb_rt60_s, 0.01, 10.0)
        if self.noise_prob > 0 and not self.noise_dir:
            raise UserInputError(
                f"`{prefix}.noise_dir` must name a folder of noise recordings when {prefix}.noise_prob > 0, "
                "but is empty instead."
            )

    @property
    def enabled(self) -> bool:
        """Whether any step can apply."""
        return max(self.speed_prob, self.noise_prob, self.gain_prob, self.reverb_prob) > 0

    def max_speed(self) -> float:
        """The largest factor speed perturbation can apply (1.0 when it is off): an utterance of
        ``n`` samples comes out with at least ``n / max_speed()``."""
        return max(1.0, *self.speed_factors) if self.speed_prob > 0 else 1.0


def _check_interval(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise UserInputError(f"`{name}` must be a list of 2 values (low, high), but is {value!r} instead.")
    check_range(f"{name}[0]", value[0], low, high)
    check_range(f"{name}[1]", value[1], low, high)
    if value[0] > value[1]:
        raise UserInputError(f"`{name}` must be (low, high) with low <= high, but is {list(value)} instead.")


def noise_files(noise_dir: str | os.PathLike) -> list[Path]:
    """The audio files under ``noise_dir`` (recursively, sorted); raises :class:`UserInputError`
    naming the folder when it is missing or holds none."""
    root = Path(noise_dir)
    if not root.is_dir():
        raise UserInputError(f"{root}: noise folder does not exist (data.augment.noise_dir)")
    suffixes = set(readable_suffixes())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise UserInputError(
            f"{root}: noise folder holds no audio files ({', '.join(sorted(suffixes))}; data.augment.noise_dir)"
        )
    return files


def load_noises(files: list[Path], sample_rate: int) -> list[np.ndarray]:
    """Decode noise recordings to mono float32 at ``sample_rate``; silent or empty ones are left
    out (they cannot be scaled to an SNR), and an error names the folder if none is left."""
    noises = []
    for path in files:
        wav, _ = decode_audio(path, sample_rate=sample_rate)
        if wav.size and float(np.mean(np.square(wav, dtype=np.float64))) > 0:
            noises.append(wav)
        else:
            logger.warning("%s: silent or empty noise recording, not used", path)
    if not noises:
        raise UserInputError(
            f"{files[0].parent}: every noise recording is silent or empty (data.augment.noise_dir)"
        )
    logger.info("read %d noise recordings (%.1f s)", len(noises), sum(n.size for n in noises) / sample_rate)
    return noises


def speed_perturb(wave: np.ndarray, factor: float) -> np.ndarray:
    """``[S] -> [~S / factor]``: play ``factor`` times as fast by resampling (pitch changes too)."""
    if factor == 1.0 or wave.size == 0:
        return wave
    # read as if recorded at rate `factor`, resample to rate 1: frequencies scale by `factor`
    return soxr.resample(wave, factor, 1.0, quality="HQ").astype(np.float32, copy=False)


def synthetic_rir(rng: np.random.Generator, rt60_s: float, sample_rate: int) -> np.ndarray:
    """A room impulse response: a direct path, then Gaussian noise whose amplitude falls 60 dB in
    ``rt60_s`` seconds; ``[ceil(rt60_s * sample_rate)]`` float64, unit energy."""
    n = max(1, math.ceil(rt60_s * sample_rate))
    t = np.arange(n) / sample_rate
    rir = rng.standard_normal(n) * np.exp(-3 * math.log(10) * t / rt60_s)  # 10**(-3 t / rt60)
    rir[0] = 1.0
    return rir / np.sqrt(np.sum(rir**2))


def reverberate(wave: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with ``rir`` (by FFT), keep the input's length and RMS level."""
    if wave.size == 0:
        return wave
    size = wave.size + rir.size - 1
    nfft = 1 << (size - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(wave, nfft) * np.fft.rfft(rir, nfft), nfft)[: wave.size]
    before, after = _power(wave), _power(out)
    if after > 0:
        out *= math.sqrt(before / after)
    return out.astype(np.float32)


def add_noise(wave: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add a random stretch of ``noise`` (looped when shorter than ``wave``) scaled to ``snr_db``.

    A silent ``wave`` gets no noise: no level makes a finite SNR.
    """
    signal = _power(wave)
    if wave.size == 0 or signal == 0:
        return wave
    start = int(rng.integers(0, noise.size))
    reps = math.ceil((start + wave.size) / noise.size)
    piece = np.tile(noise, reps)[start : start + wave.size]
    scale = math.sqrt(signal / (_power(piece) * 10 ** (snr_db / 10))) if _power(piece) > 0 else 0.0
    return (wave + scale * piece).astype(np.float32)


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0


def augment(
    wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, noises: list[np.ndarray], sample_rate: int
) -> np.ndarray:
    """Apply the steps of ``cfg`` (speed, reverb, noise, gain, in that order) to one waveform.

    Each step draws its coin from ``rng`` whether or not its probability is 0, so turning one step
    on or off changes neither the coins nor, for utterances where it does not apply, the
    parameters of the others.

    Args:
        wave: ``[S]`` float32 mono waveform (not modified).
        rng: the utterance's generator; the output is a function of it and the other arguments.
        cfg: which steps, how likely, how strong.
        noises: mono float32 noise recordings at ``sample_rate`` (may be empty when
            ``cfg.noise_prob`` is 0).
        sample_rate: of ``wave`` and ``noises``, in Hz (for the reverberation time).

    Returns:
        ``[S']`` float32; ``S' = S`` unless speed-perturbed (then about ``S / factor``).
    """
    coins = rng.random(4)
    out = wave
    if coins[0] < cfg.speed_prob:
        out = speed_perturb(out, float(cfg.speed_factors[rng.integers(len(cfg.speed_factors))]))
    if coins[1] < cfg.reverb_prob:
        out = reverberate(out, synthetic_rir(rng, float(rng.uniform(*cfg.reverb_rt60_s)), sample_rate))
    if coins[2] < cfg.noise_prob:
        if not noises:
            raise ValueError(
                "`noises` must hold at least one recording when noise_prob > 0, but is empty instead."
            )
        noise = noises[int(rng.integers(len(noises)))]
        out = add_noise(out, noise, float(rng.uniform(*cfg.noise_snr_db)), rng)
    if coins[3] < cfg.gain_prob:
        out = (out * np.float32(10 ** (rng.uniform(*cfg.gain_db) / 20))).astype(np.float32)
    return out


class WaveAugmenter:
    """:func:`augment` bound to a config and a sample rate, with the noise folder read on first use.

    The folder is listed (and checked) at construction, so a missing or empty one fails before
    training starts; the recordings are decoded once per process (each DataLoader worker holds
    its own copy), when the first utterance is augmented.

    Args:
        cfg: the augmentation config (validated here).
        sample_rate: of the waveforms it will get, in Hz.
    """

    def __init__(self, cfg: AugmentConfig, sample_rate: int) -> None:
        cfg.validate()
        self.cfg = cfg
        self.sample_rate = sample_rate
        self._files = noise_files(cfg.noise_dir) if cfg.noise_prob > 0 and cfg.noise_dir else []
        self._noises: list[np.ndarray] | None = None

    def __call__(self, wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``[S] -> [S']`` float32: :func:`augment` with this config."""
        if self._noises is None:
            self._noises = load_noises(self._files, self.sample_rate) if self._files else []
        return augment(wave, rng, self.cfg, self._noises, self.sample_rate)


def build_augmenter(cfg: AugmentConfig, sample_rate: int) -> WaveAugmenter | None:
    """A :class:`WaveAugmenter` for ``cfg``, or None when every step is off (so the dataset is
    exactly the unaugmented one, and no noise folder is looked at)."""
    return WaveAugmenter(cfg, sample_rate) if cfg.enabled else None
