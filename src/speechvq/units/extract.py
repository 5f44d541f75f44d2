"""Continuous features (embeddings) of chosen layers for downstream use: ``speechvq extract-features``.

Output directory, for N utterances in source order:

* ``index.tsv``: a header, then ``id<TAB>num_frames<TAB>shard<TAB>offset`` per utterance: its rows
  ``offset : offset + num_frames`` of shard ``shard`` (``-`` for an utterance without frames);
* ``npy`` storage: ``layer_<L>/<shard>.npy``, one ``[frames, D]`` float32 array per layer and shard;
* ``safetensors`` storage: ``<shard>.safetensors`` holding one ``[frames, D]`` tensor per layer,
  named ``layer_<L>``;
* ``meta.json``: ``{"format": "speechvq-features", "layers", "dims", "storage",
  "num_utterances", "frame_stride_s", "frame_centre_s", "chunk_s", "context_s", ...}``.

Utterances are packed into shards of at most ``shard_frames`` frames. With ``npy`` storage an
utterance longer than that gets a shard of its own, written window by window into a memory-mapped
``.npy``, so that neither the recording's activations nor its features are held in memory; with
``safetensors`` (which writes a file at once) its features are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechvq.errors import UserInputError
from speechvq.units.export import (
    SAMPLE_RATE,
    Layer,
    audio_model,
    frame_centre_s,
    iter_manifest,
    layer_features,
    parse_layer,
)
from speechvq.units.longform import ChunkConfig, num_frames, windowed_features

FORMAT = "speechvq-features"


def parse_layers(text: str) -> list[Layer]:
    """``--layers``: comma-separated layer numbers and/or ``transformer_input``."""
    layers = [parse_layer(part.strip()) for part in text.split(",") if part.strip()]
    if not layers:
        raise UserInputError("--layers names no layer")
    return list(dict.fromkeys(layers))


class FeatureWriter:
    """Writes the directory described in the module docstring.

    Args:
        out_dir: the output directory (created).
        layers: the layers, in output order.
        storage: ``npy`` or ``safetensors``.
        shard_frames: frames per shard (an utterance is never split across shards).
    """

    def __init__(self, out_dir: Path, layers: list[Layer], storage: str, shard_frames: int) -> None:
        if storage not in ("npy", "safetensors"):
            raise UserInputError(f"--format must be npy or safetensors, but is {storage!r}")
        if shard_frames < 1:
            raise UserInputError(f"--shard-frames must be >= 1, but is {shard_frames}")
        self.out, self.layers, self.storage, self.shard_frames = out_dir, layers, storage, shard_frames
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple[str, int, str, int]] = []
        self.dims: dict[str, int] = {}
        self._buffer: dict[Layer, list[Tensor]] = {layer: [] for layer in layers}
        self._buffered = 0
        self._shards = 0

    def _name(self) -> str:
        name = f"shard_{self._shards:05d}"
        self._shards += 1
        return name

    def _note_dims(self, feats: dict[Layer, Tensor]) -> None:
        for layer, f in feats.items():
            self.dims.setdefault(str(layer), int(f.size(-1)))

    def add(self, utt_id: str, feats: dict[Layer, Tensor] | None) -> None:
        """Queue one utterance's ``[T, D]`` features per layer (None: it has no frames)."""
        if feats is None:
            self.rows.append((utt_id, 0, "-", 0))
            return
        frames = int(next(iter(feats.values())).size(0))
        self._note_dims(feats)
        if self._buffered and self._buffered + frames > self.shard_frames:
            self.flush()
        self.rows.append((utt_id, frames, f"shard_{self._shards:05d}", self._buffered))
        for layer in self.layers:
            self._buffer[layer].append(feats[layer].detach().float().cpu())
        self._buffered += frames

    def add_streamed(self, utt_id: str, total: int, windows: Any) -> None:
        """Write one long utterance window by window (``npy``; ``safetensors`` collects them)."""
        if self.storage != "npy":
            parts: dict[Layer, list[Tensor]] = {layer: [] for layer in self.layers}
            for window in windows:
                for layer, f in window.layers.items():
                    parts[layer].append(f)
            self.add(utt_id, {layer: torch.cat(p) for layer, p in parts.items()})
            return
        self.flush()
        name = self._name()
        arrays: dict[Layer, np.ndarray] = {}
        written = 0
        for window in windows:
            self._note_dims(window.layers)
            for layer, f in window.layers.items():
                if layer not in arrays:
                    (self.out / _layer_dir(layer)).mkdir(exist_ok=True)
                    path = self.out / _layer_dir(layer) / f"{name}.npy"
                    arrays[layer] = np.lib.format.open_memmap(
                        path, mode="w+", dtype=np.float32, shape=(total, f.size(-1))
                    )
                arrays[layer][window.first_frame : window.first_frame + f.size(0)] = f.float().cpu().numpy()
            written = window.first_frame + next(iter(window.layers.values())).size(0)
        for array in arrays.values():
            array.flush()
        del arrays
        if written != total:
            raise RuntimeError(f"{utt_id}: wrote {written} of {total} frames")
        self.rows.append((utt_id, total, name, 0))

    def flush(self) -> None:
        """Write the buffered utterances as one shard."""
        if not self._buffered:
            return
        name = self._name()
        tensors = {layer: torch.cat(parts) for layer, parts in self._buffer.items()}
        if self.storage == "npy":
            for layer, t in tensors.items():
                (self.out / _layer_dir(layer)).mkdir(exist_ok=True)
                np.save(self.out / _layer_dir(layer) / f"{name}.npy", t.numpy())
        else:
            from safetensors.torch import save_file

            save_file(
                {_layer_dir(k): v.contiguous() for k, v in tensors.items()},
                str(self.out / f"{name}.safetensors"),
            )
        self._buffer = {layer: [] for layer in self.layers}
        self._buffered = 0

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Flush, write ``index.tsv`` and ``meta.json``; returns the meta."""
        self.flush()
        lines = ["id\tnum_frames\tshard\toffset"] + [f"{u}\t{n}\t{s}\t{o}" for u, n, s, o in self.rows]
        (self.out / "index.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        full = {
            "format": FORMAT, "layers": [str(x) for x in self.layers], "dims": self.dims, "storage": self.storage,
            "num_utterances": len(self.rows), **meta,
        }  # fmt: skip
        (self.out / "meta.json").write_text(json.dumps(full, indent=1) + "\n")
        return full


def _layer_dir(layer: Layer) -> str:
    return f"layer_{layer}"


def extract_features(
    model: nn.Module,
    source: str | os.PathLike[str] | Any,
    out_dir: str | os.PathLike[str],
    layers: list[Layer],
    *,
    storage: str = "npy",
    chunk: ChunkConfig | None = None,
    shard_frames: int = 50_000,
    max_tokens: int = 1_600_000,
    max_items: int = 16,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the features of ``layers`` for every utterance of ``source`` (see the module docstring).

    Args:
        model: a wav2vec 2.0, CTC or vq-wav2vec model in eval mode.
        source: a manifest, a local dataset directory, or a ``datasets.Dataset``.
        out_dir: the output directory.
        layers: see :func:`speechvq.units.export.layer_features`.
        storage: ``npy`` or ``safetensors``.
        chunk: recordings longer than its window run in overlapping windows
            (:mod:`speechvq.units.longform`; wav2vec 2.0 and CTC models); None: all whole.
        shard_frames: frames per shard.
        max_tokens: padded samples per batch of short utterances.
        max_items: utterances per batch.
        meta: extra ``meta.json`` entries.

    Returns:
        The written ``meta.json`` contents.
    """
    writer = FeatureWriter(Path(out_dir), layers, storage, shard_frames)
    audio = audio_model(model)
    windowed = chunk is not None and audio.has_transformer
    limit = round(chunk.window_s * SAMPLE_RATE) if windowed and chunk is not None else None
    for batch in iter_manifest(
        source, model, max_tokens=max_tokens, max_items=max_items, desc="extract-features"
    ):
        lengths = batch.lengths.tolist()
        short = [r for r, n in enumerate(lengths) if limit is None or n <= limit]
        results: dict[int, dict[Layer, Tensor]] = {}
        if short:
            take = torch.tensor(short, dtype=torch.long)
            waves, lens = batch.waveforms[take, : max(lengths[r] for r in short)], batch.lengths[take]
            per_layer = {layer: layer_features(model, waves, lens, layer) for layer in layers}
            for i, row in enumerate(short):
                results[batch.usable[row]] = {layer: f[i, : int(n[i])] for layer, (f, n) in per_layer.items()}
        long_rows = {batch.usable[r]: r for r in range(len(lengths)) if r not in short}
        for pos, utt_id in enumerate(batch.relpaths):
            if pos in results:
                writer.add(utt_id, results.pop(pos))
            elif pos in long_rows:
                assert chunk is not None
                row = long_rows[pos]
                wave = batch.waveforms[row, : lengths[row]]
                windows = windowed_features(model, wave, layers, chunk)
                writer.add_streamed(utt_id, num_frames(audio, lengths[row]), windows)
            else:
                writer.add(utt_id, None)
    info = {
        "frame_stride_s": audio.frame_stride / SAMPLE_RATE, "frame_centre_s": frame_centre_s(audio),
        "chunk_s": chunk.chunk_s if windowed and chunk else None,
        "context_s": chunk.context_s if windowed and chunk else None, "source": str(source), **(meta or {}),
    }  # fmt: skip
    return writer.close(info)


def read_features(directory: str | os.PathLike[str], layer: Layer) -> dict[str, np.ndarray]:
    """id -> ``[T, D]`` features of ``layer`` from a directory written by :func:`extract_features`."""
    root = Path(directory)
    meta = json.loads((root / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise UserInputError(f"{root}: not an extract-features directory")
    out: dict[str, np.ndarray] = {}
    shards: dict[str, np.ndarray] = {}
    for line in (root / "index.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        utt, frames, shard, offset = line.split("\t")
        if shard == "-":
            out[utt] = np.zeros((0, meta["dims"][str(layer)]), dtype=np.float32)
            continue
        if shard not in shards:
            if meta["storage"] == "npy":
                shards[shard] = np.load(root / _layer_dir(layer) / f"{shard}.npy", mmap_mode="r")
            else:
                from safetensors.numpy import load_file

                shards[shard] = load_file(str(root / f"{shard}.safetensors"))[_layer_dir(layer)]
        out[utt] = np.array(shards[shard][int(offset) : int(offset) + int(frames)])
    return out
