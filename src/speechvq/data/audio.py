"""Audio decoding: soundfile for every container libsndfile reads, soxr for resampling.

Every loader returns mono float32 at the requested rate. Multi-channel audio is mixed down
(averaged), integer formats are scaled to [-1, 1] by soundfile, other rates are resampled with
soxr's high-quality filter. Headerless PCM needs an explicit :class:`RawFormat`.
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from speechvq.errors import UserInputError
from speechvq.files import path_problem

logger = logging.getLogger(__name__)

_RAW_SUFFIXES = {".raw", ".pcm", ".s16", ".f32"}
RAW_SUFFIXES = tuple(sorted(_RAW_SUFFIXES))
"""Suffixes of headerless PCM files, which need a :class:`RawFormat`."""
CONTAINER_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".snd",
                      ".w64", ".caf", ".sph", ".nist", ".rf64", ".wavex")  # fmt: skip
"""Suffixes of the containers libsndfile reads from their headers (whether this build reads mp3 and
opus: :func:`readable_suffixes`)."""
_ESTIMATED_LENGTH = {"MP3", "OGG"}
_warned_mixdown: set[int] = set()
_DECLARED_DATA = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_UNKNOWN_LENGTH = 0x7FFFFFFF  # streaming writers declare 0x7fffffff / 0xffffffff: "length unknown"

MAX_ABS_SAMPLE = 1e6
"""Largest sample magnitude accepted. Decoded integer PCM lies in [-1, 1] and float audio should
too; a file with larger values is not audio as the models expect it, and values beyond ~1e19
overflow float32 arithmetic (squares, sums) downstream into inf and NaN."""


@dataclass(frozen=True)
class RawFormat:
    """How to read headerless PCM (``.raw`` / ``.pcm``)."""

    sample_rate: int = 16000
    """Sample rate of the raw data in Hz."""
    channels: int = 1
    """Interleaved channels."""
    subtype: str = "PCM_16"
    """soundfile subtype: ``PCM_16``, ``PCM_24``, ``PCM_32``, ``PCM_U8``, ``FLOAT``, ``DOUBLE``."""
    endian: str = "LITTLE"
    """``LITTLE`` or ``BIG``."""

    def __post_init__(self) -> None:
        if self.sample_rate <= 0:
            raise ValueError(f"`sample_rate` must be positive, but is {self.sample_rate} instead.")
        if self.channels <= 0:
            raise ValueError(f"`channels` must be positive, but is {self.channels} instead.")
        if self.subtype not in sf.available_subtypes("RAW"):
            raise ValueError(
                f"`subtype` must be one of {sorted(sf.available_subtypes('RAW'))}, but is {self.subtype!r} instead."
            )
        if self.endian not in ("LITTLE", "BIG"):
            raise ValueError(f"`endian` must be 'LITTLE' or 'BIG', but is {self.endian!r} instead.")

    @classmethod
    def parse(cls, spec: str) -> RawFormat:
        """Parse ``RATE[:CHANNELS[:SUBTYPE[:ENDIAN]]]``, e.g. ``16000:1:PCM_16:LITTLE``."""
        parts = spec.split(":")
        try:
            kwargs: dict = {"sample_rate": int(parts[0])}
            if len(parts) > 1:
                kwargs["channels"] = int(parts[1])
        except ValueError:
            raise UserInputError(
                f"raw format {spec!r} must be RATE[:CHANNELS[:SUBTYPE[:ENDIAN]]] with integer rate and channels"
            ) from None
        if len(parts) > 2:
            kwargs["subtype"] = parts[2].upper()
        if len(parts) > 3:
            kwargs["endian"] = parts[3].upper()
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise UserInputError(f"raw format {spec!r}: {err}") from None


def headerless(path: str | os.PathLike | bytes) -> bool:
    """Whether a raw format applies to ``path``: any file whose suffix is not a container's
    (:data:`CONTAINER_SUFFIXES`). Encoded bytes always carry their header."""
    return not isinstance(path, bytes) and Path(path).suffix.lower() not in CONTAINER_SUFFIXES


def readable_suffixes() -> tuple[str, ...]:
    """The container suffixes this libsndfile build decodes (mp3 needs >= 1.1.0, opus >= 1.0.29)."""
    formats = sf.available_formats()
    subtypes = sf.available_subtypes("OGG")
    skip = set()
    if "MP3" not in formats:
        skip.add(".mp3")
    if "OPUS" not in subtypes:
        skip.add(".opus")
    return tuple(s for s in CONTAINER_SUFFIXES if s not in skip)


@dataclass(frozen=True)
class AudioInfo:
    """Header information of an audio file."""

    sample_rate: int
    """Native rate in Hz."""
    num_frames: int
    """Samples per channel at the native rate."""
    channels: int
    """Channel count."""
    format: str
    """soundfile container name (``WAV``, ``FLAC``, ``MP3``, ``RAW``...)."""


def _open(source: str | os.PathLike | bytes, raw_format: RawFormat | None, name: str) -> sf.SoundFile:
    """Open a SoundFile, translating every failure into a UserInputError naming the file."""
    file: str | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    is_raw = raw_format is not None or (
        not isinstance(source, bytes) and Path(source).suffix.lower() in _RAW_SUFFIXES
    )
    if is_raw and raw_format is None:
        raise UserInputError(
            f"{name}: headerless PCM needs an explicit raw format (rate, channels, subtype), e.g. 16000:1:PCM_16"
        )
    if not isinstance(source, bytes):
        # stat only: opening a FIFO named *.wav for reading would wait for a writer forever
        problem = path_problem(source)
        if problem == "does not exist" or (problem or "").startswith("does not exist"):
            raise UserInputError(f"{name}: file does not exist")
        if problem == "is a directory, not a file":
            raise UserInputError(f"{name}: is not a readable file (it is a directory)")
        if problem is not None and "permission" in problem:
            raise UserInputError(f"{name}: file is not readable (permission denied)")
        if problem is not None:
            raise UserInputError(f"{name}: {problem}")
    try:
        if is_raw:
            assert raw_format is not None
            return sf.SoundFile(
                file,
                samplerate=raw_format.sample_rate,
                channels=raw_format.channels,
                subtype=raw_format.subtype,
                endian=raw_format.endian,
                format="RAW",
            )
        return sf.SoundFile(file)
    except FileNotFoundError:
        raise UserInputError(f"{name}: file does not exist") from None
    except PermissionError:
        raise UserInputError(f"{name}: file is not readable (permission denied)") from None
    except sf.LibsndfileError as err:
        if not isinstance(source, bytes) and not Path(source).exists():
            raise UserInputError(f"{name}: file does not exist") from None
        hint = ""
        if name.lower().endswith(".mp3") and "MP3" not in sf.available_formats():
            hint = f" (this libsndfile {sf.__libsndfile_version__} has no MP3 support; it needs >= 1.1.0)"
        raise UserInputError(f"{name}: cannot decode audio: {err.error_string}{hint}") from None
    except (RuntimeError, TypeError, OSError) as err:
        raise UserInputError(f"{name}: cannot decode audio: {err}") from None


def _check_complete(f: sf.SoundFile, name: str) -> None:
    """Refuse a WAV/AIFF file shorter than its header says (libsndfile reads what is there silently).

    libsndfile reports such a file's frames from the bytes present and notes the header's claim in
    its log as ``data : <declared> (should be <present>)``.
    """
    found = _DECLARED_DATA.search(f.extra_info or "")
    if found is None:
        return
    declared, present = int(found.group(2)), int(found.group(3))
    if present < declared < _UNKNOWN_LENGTH:
        raise UserInputError(
            f"{name}: truncated or corrupt: the header declares {declared} bytes of audio data, "
            f"but the file holds {present}"
        )


def audio_info(
    path: str | os.PathLike | bytes, *, raw_format: RawFormat | None = None, name: str | None = None
) -> AudioInfo:
    """Read an audio header (native rate, frames, channels) without decoding the samples.

    Raises:
        UserInputError: naming the file and the problem.
    """
    name = name or (str(path) if not isinstance(path, bytes) else "<bytes>")
    with _open(path, raw_format, name) as f:
        _check_complete(f, name)
        return AudioInfo(sample_rate=f.samplerate, num_frames=f.frames, channels=f.channels, format=f.format)


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono ``[S]`` float32 array with soxr (high quality); a no-op for equal rates."""
    if orig_rate == new_rate or wav.size == 0:
        return wav
    return soxr.resample(wav, orig_rate, new_rate, quality="HQ").astype(np.float32, copy=False)


def decode_audio(
    source: str | os.PathLike | bytes,
    *,
    sample_rate: int = 16000,
    raw_format: RawFormat | None = None,
    name: str | None = None,
    expected_frames: int | None = None,
) -> tuple[np.ndarray, AudioInfo]:
    """Decode to mono float32 at ``sample_rate``; the numpy core of :func:`load_audio`.

    Args:
        source: a path, or the encoded bytes of a file.
        sample_rate: output rate in Hz.
        raw_format: parameters for headerless PCM.
        name: the name used in error messages (default: the path).
        expected_frames: if given, the native frame count the caller expects (a manifest's
            ``num_samples``); a different count raises.

    Returns:
        (``[S]`` float32 array, the file's :class:`AudioInfo`).

    Raises:
        UserInputError: the file is missing, unreadable, undecodable, has a different length than
            expected, or holds NaN/inf samples.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    with _open(source, raw_format, name) as f:
        _check_complete(f, name)
        info = AudioInfo(sample_rate=f.samplerate, num_frames=f.frames, channels=f.channels, format=f.format)
        if expected_frames is not None and info.num_frames != expected_frames:
            raise UserInputError(f"{name}: {length_mismatch_reason(expected_frames, info, sample_rate)}")
        try:
            data = f.read(dtype="float32", always_2d=True)  # (S, C)
        except (sf.LibsndfileError, RuntimeError) as err:
            raise UserInputError(f"{name}: corrupt audio data: {err}") from None
    # MP3/OGG headers only estimate the length; the decoded count is the truth there.
    if (
        expected_frames is not None
        and data.shape[0] != expected_frames
        and info.format not in _ESTIMATED_LENGTH
    ):
        raise UserInputError(
            f"{name}: truncated or corrupt: header says {info.num_frames} frames, decoded {data.shape[0]}"
        )
    if data.shape[1] > 1:
        if info.channels not in _warned_mixdown:
            _warned_mixdown.add(info.channels)
            logger.info("mixing %d channels down to mono (first seen in %s)", info.channels, name)
        wav = data.mean(axis=1, dtype=np.float32)  # (S, C) -> (S,)
    else:
        wav = data[:, 0]  # (S, 1) -> (S,)
    if not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).sum())
        raise UserInputError(f"{name}: {bad} sample(s) are NaN or inf")
    peak = float(np.abs(wav).max()) if wav.size else 0.0
    if peak > MAX_ABS_SAMPLE:
        raise UserInputError(
            f"{name}: samples out of range: the largest magnitude is {peak:.3g}, more than "
            f"{MAX_ABS_SAMPLE:g} (audio lies in [-1, 1])"
        )
    wav = resample(np.ascontiguousarray(wav), info.sample_rate, sample_rate)
    return wav, info


def length_mismatch_reason(expected_frames: int, info: AudioInfo, sample_rate: int) -> str:
    """Explain a manifest/file length disagreement, diagnosing a rate mismatch where it fits."""
    reason = f"the manifest lists {expected_frames} samples, but the file has {info.num_frames}"
    at_target = round(info.num_frames * sample_rate / info.sample_rate)
    if info.sample_rate != sample_rate and abs(at_target - expected_frames) <= 1:
        reason += (
            f" (sample rate mismatch: the file is {info.sample_rate} Hz and the manifest counts "
            f"samples at {sample_rate} Hz)"
        )
    elif abs(at_target - expected_frames) > 1 and expected_frames > 0:
        ratio = info.num_frames / expected_frames
        for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000):
            if rate != info.sample_rate and abs(ratio - info.sample_rate / rate) < 1e-3:
                reason += (
                    f" (sample rate mismatch: the file is {info.sample_rate} Hz, the manifest "
                    f"looks written for {rate} Hz)"
                )
                break
    return reason


def normalize_waveform(wav: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-utterance zero mean, unit variance (fairseq's ``normalize=True``, for layer_norm models)."""
    if wav.numel() == 0:
        return wav
    return (wav - wav.mean()) / torch.sqrt(wav.var(unbiased=False) + eps)


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = 16000,
    normalize: bool = False,
    raw_format: RawFormat | None = None,
) -> torch.Tensor:
    """Load any audio file libsndfile reads as mono float32 at ``sample_rate``.

    Args:
        path: wav/flac/ogg/mp3/aiff/... file, or headerless PCM (``.raw``/``.pcm``, with ``raw_format``).
        sample_rate: output rate in Hz; other rates are resampled with soxr.
        normalize: zero mean, unit variance per utterance.
        raw_format: parameters of headerless PCM; also forces raw reading for any suffix.

    Returns:
        ``[S]`` float32 tensor.

    Raises:
        UserInputError: naming the file and the problem (missing, unreadable, undecodable,
            NaN/inf samples, raw PCM without a format).
    """
    wav, _ = decode_audio(path, sample_rate=sample_rate, raw_format=raw_format)
    out = torch.from_numpy(wav)
    return normalize_waveform(out) if normalize else out
