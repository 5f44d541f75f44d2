"""Log-mel filterbank front end: a parameter-free alternative to the raw-waveform CNN encoder.

fairseq2's wav2vec 2.0 family has the same option (``Wav2Vec2FbankFeatureExtractor``, used by
w2v-BERT): 80 log-mel channels at a 10 ms hop, normalised per utterance and stacked two frames at a
time, giving 20 ms frames like the CNN's. It exists here for small budgets. A randomly initialised
CNN encodes the waveform's phase: at initialisation consecutive frames of ``small`` share their
codes 0.6% of the time on speech, so no context can predict the targets and the contrastive loss
stays at chance for thousands of updates (docs/training.md). Log-mel frames are smooth in time from
the first update (15% shared codes), so the context network has something to learn at once.

The spectrogram is the one of ``transformers.audio_utils.spectrogram`` with a periodic Hann window,
``center=False``, power 2, HTK mel filters and natural log with a floor (tested equal); the
normalisation is per utterance over its valid frames only, so padding changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from speechvq.models.encoder import check_waveforms


def mel_filters(num_fft_bins: int, num_mels: int, sample_rate: int, min_hz: float, max_hz: float) -> Tensor:
    """``[num_fft_bins, num_mels]`` triangular HTK-mel filters without area normalisation."""

    def hz_to_mel(hz: Tensor) -> Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: Tensor) -> Tensor:
        return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)

    lo, hi = (
        hz_to_mel(torch.tensor(min_hz, dtype=torch.float64)),
        hz_to_mel(torch.tensor(max_hz, dtype=torch.float64)),
    )
    edges = mel_to_hz(torch.linspace(float(lo), float(hi), num_mels + 2, dtype=torch.float64))
    bins = torch.linspace(0.0, sample_rate / 2.0, num_fft_bins, dtype=torch.float64)
    left, centre, right = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - left[None, :]) / (centre - left)[None, :]
    falling = (right[None, :] - bins[:, None]) / (right - centre)[None, :]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class FbankFeatureEncoder(nn.Module):
    """Waveform -> per-utterance normalised log-mel frames, stacked ``stack`` at a time.

    Args:
        num_mels: mel channels per 10 ms frame.
        stack: consecutive frames concatenated into one output frame (2: 20 ms frames).
        sample_rate: input rate; the window is 25 ms and the hop 10 ms at that rate.
        min_hz: lowest mel filter edge.
        max_hz: highest mel filter edge (None: Nyquist).
        floor: added floor of the mel energies before the log.
    """

    def __init__(
        self,
        num_mels: int = 80,
        stack: int = 2,
        sample_rate: int = 16000,
        min_hz: float = 20.0,
        max_hz: float | None = None,
        floor: float = 1e-10,
    ) -> None:
        super().__init__()
        self.num_mels, self.stack, self.floor = num_mels, stack, floor
        self.window_length = round(0.025 * sample_rate)
        self.hop = round(0.010 * sample_rate)
        self.fft_length = 2 ** math.ceil(math.log2(self.window_length))
        window = torch.hann_window(self.window_length, periodic=True)
        filters = mel_filters(
            self.fft_length // 2 + 1, num_mels, sample_rate, min_hz, max_hz or sample_rate / 2
        )
        self.register_buffer("window", window, persistent=False)
        self.register_buffer("filters", filters, persistent=False)

    @property
    def out_channels(self) -> int:
        return self.num_mels * self.stack

    @property
    def frame_stride(self) -> int:
        """Samples between consecutive output frames."""
        return self.hop * self.stack

    @property
    def receptive_field(self) -> int:
        """Samples that the first output frame depends on (the minimum input length)."""
        return self.window_length + (self.stack - 1) * self.hop

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """``[B]`` samples -> ``[B]`` output frames."""
        frames = (
            torch.div(lengths.to(torch.long) - self.window_length, self.hop, rounding_mode="floor") + 1
        ).clamp(min=0)
        return torch.div(frames, self.stack, rounding_mode="floor")

    def log_mel(self, waveforms: Tensor) -> Tensor:
        """``[B, S]`` -> ``[B, N, num_mels]`` log-mel energies of every full 25 ms window (fp32)."""
        frames = waveforms.float().unfold(1, self.window_length, self.hop)  # (B, S) -> (B, N, W)
        spectrum = torch.fft.rfft(frames * self.window, n=self.fft_length).abs().pow(2)  # (B, N, F)
        return torch.log(torch.clamp(spectrum @ self.filters, min=self.floor))

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode waveforms.

        Args:
            waveforms: ``[B, S]`` float samples.
            lengths: ``[B]`` valid samples per utterance; None means all are S long.

        Returns:
            features ``[B, T, num_mels * stack]`` (zero after each length) and ``[B]`` frame lengths.
        """
        lengths = check_waveforms(waveforms, lengths, self.receptive_field)
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            mel = self.log_mel(waveforms)  # (B, N, M)
            n = (torch.div(lengths - self.window_length, self.hop, rounding_mode="floor") + 1).clamp(min=0)
            valid = (torch.arange(mel.size(1), device=mel.device)[None, :] < n[:, None]).to(mel.dtype)[
                ..., None
            ]
            count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
            mean = (mel * valid).sum(dim=1, keepdim=True) / count
            var = (((mel - mean) * valid) ** 2).sum(dim=1, keepdim=True) / count
            normed = (mel - mean) * torch.rsqrt(var + 1e-5) * valid
            out_frames = mel.size(1) // self.stack
            stacked = normed[:, : out_frames * self.stack].reshape(mel.size(0), out_frames, -1)  # (B, T, M*k)
            out_lengths = self.output_lengths(lengths)
            keep = torch.arange(out_frames, device=mel.device)[None, :] < out_lengths[:, None]
            stacked = stacked * keep[..., None].to(stacked.dtype)  # a half-valid last pair is padding
        return stacked, out_lengths
