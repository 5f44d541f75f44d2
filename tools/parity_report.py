#!/usr/bin/env python3
"""Print the largest absolute differences between speechvq and transformers' Wav2Vec2ForPreTraining.

Usage:
    python tools/parity_report.py [--presets tiny small base large]

Same weights (speechvq -> transformers through the key map), fp32, eval mode, same mask and
distractors; for layer_norm models one of the two utterances is padded.
"""

from __future__ import annotations

import argparse
import logging

import torch

from speechvq import build_wav2vec2, preset
from speechvq.interop.hf import to_hf
from speechvq.losses import contrastive_loss
from speechvq.models.masking import compute_span_mask, sample_distractors


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base", "large"])
    return parser.parse_args()


@torch.no_grad()
def report(name: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_wav2vec2(preset(name)).eval()
    hf = to_hf(model)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16000, generator=g)
    lengths = torch.tensor([16000, 11000 if model.cfg.encoder.norm_mode == "layer_norm" else 16000])
    x[1, int(lengths[1]) :] = 0.0
    attention = (torch.arange(16000)[None, :] < lengths[:, None]).long()
    frames = int(model.feature_encoder.output_lengths(torch.tensor([16000]))[0])
    frame_lengths = model.feature_encoder.output_lengths(lengths)
    mask = compute_span_mask(
        frame_lengths,
        frames,
        mask_prob=0.65,
        mask_length=model.cfg.mask.mask_length,
        min_masks=2,
        generator=g,
    )
    target, distractors = sample_distractors(mask, model.cfg.loss.num_negatives, g)
    neg = torch.zeros(2 * frames, distractors.size(1), dtype=torch.long)
    neg[target] = distractors
    out = model(x, lengths, mask=mask, distractor_index=distractors)
    ref = hf(
        x,
        attention_mask=attention,
        mask_time_indices=mask,
        sampled_negative_indices=neg.view(2, frames, -1),
        output_hidden_states=True,
    )
    valid = torch.arange(frames)[None, :] < frame_lengths[:, None]
    feats = hf.wav2vec2.feature_extractor(x).transpose(1, 2)
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "encoder": float((out.features - feats)[valid].abs().max()),
        "layers": max(
            float((a - b)[valid].abs().max()) for a, b in zip(out.hidden_states, ref.hidden_states)
        ),
        "projected": float((out.predictions - ref.projected_states[mask]).abs().max()),
        "quantized_targets": float((out.targets - ref.projected_quantized_states[mask]).abs().max()),
        "contrastive_loss": float((contrastive_loss(out.logits) - ref.contrastive_loss).abs()),
        "contrastive_loss_value": float(ref.contrastive_loss),
    }


def main() -> None:
    args = get_args()
    for name in args.presets:
        r = report(name)
        print(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['encoder']:.1e} | {r['layers']:.1e} | {r['projected']:.1e} | "
            f"{r['quantized_targets']:.1e} | {r['contrastive_loss']:.1e} (of {r['contrastive_loss_value']:.1f}) |"
        )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    main()
