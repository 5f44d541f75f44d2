"""Helpers of the CTC tests: a synthetic "tone speech" corpus and a tiny-model overfit loop."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from speechvq.config import MaskConfig, wav2vec2_tiny
from speechvq.decoding import greedy_decode
from speechvq.metrics_asr import cer
from speechvq.models.ctc import CtcConfig, CtcModel
from speechvq.text import Vocabulary

SAMPLE_RATE = 16000
TONES = {"A": 300.0, "B": 700.0, "C": 1300.0, "D": 2100.0}
TRANSCRIPTS = ["AB", "CAD", "BD CA", "DAB"]


def synthesize(text: str, segment_s: float = 0.12) -> torch.Tensor:
    """One tone per letter (a fixed frequency each), silence for a space, a short silent tail."""
    t = torch.arange(int(segment_s * SAMPLE_RATE)) / SAMPLE_RATE
    parts = [
        torch.zeros_like(t) if ch == " " else 0.5 * torch.sin(2 * math.pi * TONES[ch] * t) for ch in text
    ]
    parts.append(torch.zeros(int(0.05 * SAMPLE_RATE)))
    return torch.cat(parts)


@dataclass
class ToyCorpus:
    transcripts: list[str]
    vocab: Vocabulary
    waveforms: torch.Tensor  # [B, S]
    lengths: torch.Tensor  # [B]
    targets: torch.Tensor  # [B, L]
    target_lengths: torch.Tensor  # [B]


def make_corpus(transcripts: list[str] = TRANSCRIPTS) -> ToyCorpus:
    vocab = Vocabulary.letters(transcripts)
    waves = [synthesize(t) for t in transcripts]
    lengths = torch.tensor([len(w) for w in waves])
    x = torch.zeros(len(waves), int(lengths.max()))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    ids = [torch.tensor(vocab.encode(t)) for t in transcripts]
    targets = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
    return ToyCorpus(transcripts, vocab, x, lengths, targets, torch.tensor([len(i) for i in ids]))


def tiny_ctc_config(vocab_size: int, **overrides: object) -> CtcConfig:
    """The tiny architecture, regularisation off, encoder trainable, no freezing."""
    tiny = wav2vec2_tiny()
    context = dataclasses.replace(
        tiny.context, dropout_p=0.0, attention_dropout_p=0.0, activation_dropout_p=0.0, layer_drop_p=0.0
    )
    settings: dict = {
        "encoder": dataclasses.replace(tiny.encoder, grad_mult=1.0),
        "context": context,
        "mask": MaskConfig(mask_prob=0.0, channel_prob=0.0),
        "vocab_size": vocab_size,
        "freeze_updates": 0,
    }
    settings.update(overrides)
    return CtcConfig(**settings)


def overfit(model: CtcModel, corpus: ToyCorpus, max_steps: int = 300, lr: float = 3e-3) -> tuple[int, float]:
    """Plain Adam on the whole corpus until greedy CER is 0: (steps taken, final CER)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    error = 1.0
    for step in range(1, max_steps + 1):
        model.train()
        out = model(corpus.waveforms, corpus.lengths)
        loss = model.compute_loss(out, corpus.targets, corpus.target_lengths) / len(corpus.transcripts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            model.eval()
            with torch.no_grad():
                out = model(corpus.waveforms, corpus.lengths)
            error = cer(corpus.transcripts, greedy_decode(out.logits, out.lengths, corpus.vocab))
            if error == 0.0:
                return step, error
    return max_steps, error
