#!/usr/bin/env python3
"""Linear phone probe: how much phone identity each layer of a model makes linearly readable.

Usage:
    python bench/phone_probe.py MODEL [MODEL ...] --train data/train_10min.tsv --test data/test.tsv
    python bench/phone_probe.py random exp/pretrain_small --train ... --test ... --layers 0 1 2 3 4

MODEL is anything ``speechvq finetune-ctc --init`` takes (a model, experiment or checkpoint
directory), or ``random``: the ``--preset`` architecture with a log-mel front end and random weights,
the from-scratch starting point. For each model and layer (0 = the feature encoder's output,
``transformer_input`` = the input of block 1, L = Transformer block L), the unmasked features of
every frame of the ``--train`` manifest are labelled with the phone under the frame's centre (the
middle of its receptive field; the synthetic corpus's ``.phones`` alignments beside the audio), a softmax regression is fitted on them (features standardised with the training mean and
deviation, full-batch Adam), and its frame accuracy is measured on ``--test``. With the corpus's
speaker-disjoint splits the test frames are voices the probe never saw.

This is the question CTC fine-tuning on a few minutes of labels asks of a pretrained model: are the
phones already there, in a form that little labelled data can read? A layer that probes below the
log-mel input (layer 0 of ``random``) has lost phone information in pretraining.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from speechvq.config import preset
from speechvq.data.manifest import read_manifest
from speechvq.models.protocol import AudioModel
from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.train.init_model import load_init_model
from speechvq.units.export import (
    SAMPLE_RATE,
    TRANSFORMER_INPUT,
    Layer,
    frame_centre_s,
    iter_manifest,
    layer_features,
    parse_layer,
)
from speechvq.units.quality import find_alignment, frame_labels, read_alignment


def labelled_frames(
    model: AudioModel, manifest: str, layers: list[Layer]
) -> dict[Layer, tuple[Tensor, list[str]]]:
    """Per layer: features ``[N, D]`` of every frame a phone covers, and those phones.

    The audio comes through :func:`iter_manifest` (the export's loader: resampling, the model's
    waveform normalisation, one utterance at a time) and each alignment is the ``.phones`` file
    beside the audio (:func:`find_alignment`).
    """
    root = read_manifest(manifest).root
    feats: dict[Layer, list[Tensor]] = {layer: [] for layer in layers}
    stride = model.frame_stride / SAMPLE_RATE
    centre = frame_centre_s(model)  # each frame's phone at its receptive field's centre
    phones: list[str] = []
    for batch in iter_manifest(manifest, model, max_items=1):
        if not batch.usable:
            continue
        relpath = batch.relpaths[batch.usable[0]]
        path = find_alignment(root, relpath, ".phones", None)
        if path is None:
            raise SystemExit(f"{root / relpath}: no .phones alignment beside it")
        labels = None
        for layer in layers:
            f, n = layer_features(model, batch.waveforms, batch.lengths, layer)
            f = f[0, : int(n[0])].float()
            if labels is None:
                labels = frame_labels(read_alignment(path), f.size(0), stride, centre)
                phones.extend(p for p in labels if p is not None)
            feats[layer].extend(f[t] for t, p in enumerate(labels) if p is not None)
    return {layer: (torch.stack(feats[layer]), phones) for layer in layers}


def probe(train: tuple[Tensor, list[str]], test: tuple[Tensor, list[str]], steps: int) -> tuple[float, float]:
    """(train accuracy, test accuracy) of a softmax regression; test phones unseen in train count as errors."""
    x_tr, y_tr = train
    x_te, y_te = test
    classes = {p: i for i, p in enumerate(sorted(set(y_tr)))}
    t_tr = torch.tensor([classes[p] for p in y_tr])
    t_te = torch.tensor([classes.get(p, -1) for p in y_te])
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-5
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_tr.size(1), len(classes))
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(linear(x_tr), t_tr).backward()
        opt.step()
    with torch.no_grad():
        acc_tr = (linear(x_tr).argmax(1) == t_tr).float().mean().item()
        acc_te = (linear(x_te).argmax(1) == t_te).float().mean().item()
    return acc_tr, acc_te


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="model specs (see above), or 'random'")
    parser.add_argument("--train", required=True, help="manifest the probe is fitted on")
    parser.add_argument("--test", required=True, help="manifest the probe is scored on")
    parser.add_argument("--layers", type=parse_layer, nargs="+", help="layers to probe (default: all)")
    parser.add_argument("--preset", default="small", help="architecture of 'random' (default small)")
    parser.add_argument("--steps", type=int, default=400, help="full-batch Adam steps (default 400)")
    args = parser.parse_args()

    print(f"probe: {args.train} -> {args.test}")
    print("| model | layer | dim | train acc | test acc |")
    print("|---|---|---|---|---|")
    for spec in args.models:
        if spec == "random":
            cfg = preset(args.preset)
            cfg.encoder.kind = "fbank"
            torch.manual_seed(0)
            model = build_wav2vec2(cfg)
        else:
            model = load_init_model(spec)
        model.eval()
        layers = args.layers or [0, TRANSFORMER_INPUT, *range(1, model.num_layers + 1)]
        trains = labelled_frames(model, args.train, layers)
        tests = labelled_frames(model, args.test, layers)
        for layer in layers:
            start = time.time()
            acc_tr, acc_te = probe(trains[layer], tests[layer], args.steps)
            print(
                f"| {spec} | {layer} | {trains[layer][0].size(1)} | {acc_tr:.3f} | {acc_te:.3f} |"
                f"  <!-- {len(trains[layer][1])} train frames, fit {time.time() - start:.0f} s -->",
                flush=True,
            )


if __name__ == "__main__":
    main()
