"""Frame-level units and features of any speechvq model, streamed over a manifest in order.

Models are read through :class:`~speechvq.models.protocol.AudioModel` only. Layers are numbered
alike for every model: 0 is the convolutional feature encoder's output, ``l`` (1-based) the output
of Transformer block ``l`` (wav2vec 2.0, CTC models), or, for vq-wav2vec, 1 the aggregator's
output. ``"transformer_input"`` (wav2vec 2.0, CTC models) is the input of block 1: the projected
features after the positional convolution and its LayerNorm, transformers' ``hidden_states[0]``.
With the log-mel front end, whose layer 0 has no weights, it is the first learned layer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechvq import progress
from speechvq.data import AudioDataset
from speechvq.data.checks import SkipCounts, categorize
from speechvq.errors import UserInputError
from speechvq.models.protocol import TRANSFORMER_INPUT, AudioModel, Layer, QuantizingModel, check_layer
from speechvq.units.io import Token, UnitWriter
from speechvq.units.kmeans import FeatureShardWriter, KMeansModel
from speechvq.units.longform import DEFAULT_CHUNK, ChunkConfig, windowed_features

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000


def parse_layer(text: str) -> Layer:
    """A ``--layer`` value: a layer number or ``transformer_input``."""
    if text == TRANSFORMER_INPUT:
        return text
    try:
        return int(text)
    except ValueError:
        raise UserInputError(
            f"--layer must be a layer number or {TRANSFORMER_INPUT!r}, but is {text!r}"
        ) from None


def audio_model(model: nn.Module) -> AudioModel:
    """``model`` as an :class:`AudioModel`; :class:`UserInputError` for one that is not."""
    if not isinstance(model, AudioModel):
        raise UserInputError(f"features of a {type(model).__name__} cannot be exported")
    return model


def quantizing_model(model: nn.Module) -> QuantizingModel:
    """``model`` as a :class:`QuantizingModel`; :class:`UserInputError` for one without a quantizer."""
    if not isinstance(model, QuantizingModel):
        raise UserInputError(f"a {type(model).__name__} has no quantizer (use --kind kmeans)")
    return model


def frame_centre_s(model: AudioModel) -> float:
    """Seconds from the start of the input to the centre of frame 0's receptive field (frame ``i``'s
    is ``i`` strides later): where a frame's label is read (:func:`~speechvq.units.quality.frame_labels`)."""
    return model.receptive_field / 2 / SAMPLE_RATE


@torch.no_grad()
def layer_features(
    model: nn.Module, waveforms: Tensor, lengths: Tensor, layer: Layer
) -> tuple[Tensor, Tensor]:
    """Unmasked features of one layer (:meth:`AudioModel.layer_features`, with a usage error for
    a layer the model lacks).

    Args:
        model: an :class:`AudioModel` (wav2vec 2.0, CTC or vq-wav2vec model), in eval mode.
        waveforms: ``[B, S]`` samples.
        lengths: ``[B]`` valid samples.
        layer: see the module docstring.

    Returns:
        Features ``[B, T, D]`` and frame lengths ``[B]``.
    """
    audio = audio_model(model)
    try:
        check_layer(audio, layer)
    except ValueError:
        kind = type(model).__name__
        if layer == TRANSFORMER_INPUT:
            raise UserInputError(
                f"a {kind} has no Transformer: --layer {TRANSFORMER_INPUT} does not apply"
            ) from None
        raise UserInputError(
            f"--layer must be in [0, {audio.num_layers}] or {TRANSFORMER_INPUT!r} for this {kind}, but is {layer!r}"
        ) from None
    return audio.layer_features(waveforms, lengths, layer)


@torch.no_grad()
def quantizer_codes(model: nn.Module, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """The quantizer's argmax codes ``[B, T, G]`` and frame lengths ``[B]``."""
    q, frame_lengths = quantizing_model(model).quantize(waveforms, lengths)
    return q.codes, frame_lengths


def codes_to_tokens(codes: Tensor, codebook_size: int, joint: bool) -> list[Token]:
    """``[T, G]`` codes -> vq-wav2vec tokens ``"g0-g1"`` per frame, or joint ids ``sum_g c_g V^(G-1-g)``."""
    if joint:
        g = codes.size(-1)
        weights = codebook_size ** torch.arange(g - 1, -1, -1, device=codes.device)
        return [int(v) for v in (codes * weights).sum(-1).tolist()]
    return ["-".join(str(c) for c in row) for row in codes.tolist()]


@dataclass
class ExportBatch:
    """Consecutive manifest items: those with audio long enough for a frame, and the rest."""

    relpaths: list[str]
    """Manifest-relative paths of all the batch's items, in manifest order."""
    waveforms: Tensor
    """``[B', S]`` the usable items' audio."""
    lengths: Tensor
    """``[B']`` samples."""
    usable: list[int]
    """Positions (into ``relpaths``) of the usable items, in order."""


def consecutive_batches(sizes: np.ndarray, max_tokens: int, max_items: int) -> list[list[int]]:
    """Split ``range(len(sizes))`` into consecutive runs of at most ``max_items`` items and at most
    ``max_tokens`` padded samples (an item longer than ``max_tokens`` is a batch alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(sizes.tolist()):
        if current and (len(current) >= max_items or (len(current) + 1) * max(longest, n) > max_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def iter_manifest(
    manifest: str | os.PathLike[str] | Any,
    model: nn.Module,
    *,
    max_tokens: int = 1_600_000,
    max_items: int = 64,
    skipped: SkipCounts | None = None,
    desc: str = "features",
) -> Iterator[ExportBatch]:
    """Stream a manifest (or a local dataset) through in order, a batch of consecutive items at a
    time.

    Only one batch of audio is held at once. Items that fail to load, or hold fewer samples than
    one frame needs, are reported (logged), counted by reason in ``skipped`` and left out of
    ``usable``; their units are empty. ``desc`` names the progress bar (:mod:`speechvq.progress`).
    ``relpaths`` are a manifest's relative paths, or a dataset's audio ``path`` fields (else row
    numbers).

    Raises:
        UserInputError: the manifest lists no item, or an argument is out of range.
    """
    if max_items < 1:
        raise UserInputError(f"--shard-size must be >= 1, but is {max_items}")
    if max_tokens < 1:
        raise UserInputError(f"--max-tokens must be >= 1, but is {max_tokens}")
    norm = audio_model(model).waveform_norm  # a model that normalises in its forward gets raw audio
    dataset = AudioDataset(
        manifest, sample_rate=SAMPLE_RATE, normalize=norm.by_caller, normalize_eps=norm.eps, random_crop=False
    )
    if dataset.num_filtered:
        raise UserInputError(f"{manifest}: {dataset.num_filtered} items could not be listed")
    relpaths = list(dataset.source.ids)
    if not relpaths:
        raise UserInputError(f"{manifest}: lists no audio")
    skipped = SkipCounts() if skipped is None else skipped
    assert len(relpaths) == len(dataset)
    min_samples = audio_model(model).receptive_field
    plan = consecutive_batches(np.asarray(dataset.sizes), max_tokens, max_items)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=plan, collate_fn=dataset.collate, num_workers=0
    )
    with progress.bar(total=len(dataset), desc=desc) as shown:
        yield from _batches(plan, loader, relpaths, min_samples, skipped, shown)


def _batches(
    plan: list[list[int]], loader: Any, relpaths: list[str], min_samples: int, skipped: SkipCounts, shown: Any
) -> Iterator[ExportBatch]:
    """:func:`iter_manifest`'s batches, advancing the progress bar ``shown``."""
    audio_s = 0.0
    for indices, batch in zip(plan, loader):
        loaded = {int(i): row for row, i in enumerate(batch.indices.tolist())}
        usable, rows = [], []
        for pos, index in enumerate(indices):
            row = loaded.get(index)
            if row is None:
                reason = batch.skipped.get(index, f"{relpaths[index]}: could not be loaded")
                skipped.add(categorize(reason), reason)
                logger.warning("%s; writing no units for it", reason)
            elif int(batch.lengths[row]) < min_samples:
                skipped.add("too_short", f"{relpaths[index]}: fewer samples than one frame needs")
                logger.warning(
                    "%s: %d samples are fewer than one frame needs (%d); writing no units for it",
                    relpaths[index],
                    int(batch.lengths[row]),
                    min_samples,
                )
            else:
                usable.append(pos)
                rows.append(row)
        take = torch.tensor(rows, dtype=torch.long)
        lengths = batch.lengths[take]
        width = int(lengths.max()) if len(rows) else 0
        audio_s += float(lengths.sum()) / SAMPLE_RATE
        shown.update(len(indices))
        progress.set_audio_rate(shown, audio_s)
        yield ExportBatch(
            relpaths=[relpaths[i] for i in indices],
            waveforms=batch.waveforms[take, :width],
            lengths=lengths,
            usable=usable,
        )


def item_features(
    model: nn.Module, batch: ExportBatch, layers: list[Layer], chunk: ChunkConfig | None
) -> Iterator[tuple[int, dict[Layer, Tensor]]]:
    """(position in ``batch.relpaths``, layer -> ``[T, D]`` features) of every usable item.

    Items up to ``chunk.window_s`` long run together through :func:`layer_features`; a longer one
    runs alone in overlapping windows (:func:`~speechvq.units.longform.windowed_features`), so
    memory stays bounded by the window whatever the recording's length. ``chunk`` None: every
    item runs whole.
    """
    limit = None if chunk is None else round(chunk.window_s * SAMPLE_RATE)
    long_rows = [] if limit is None else [r for r, n in enumerate(batch.lengths.tolist()) if n > limit]
    short_rows = [r for r in range(len(batch.usable)) if r not in long_rows]
    results: dict[int, dict[Layer, Tensor]] = {}
    if short_rows:
        take = torch.tensor(short_rows, dtype=torch.long)
        lengths = batch.lengths[take]
        waves = batch.waveforms[take, : int(lengths.max())]
        per_layer = {layer: layer_features(model, waves, lengths, layer) for layer in layers}
        for i, row in enumerate(short_rows):
            results[row] = {layer: f[i, : int(n[i])] for layer, (f, n) in per_layer.items()}
    for row in long_rows:
        assert chunk is not None
        n = int(batch.lengths[row])
        parts: dict[Layer, list[Tensor]] = {layer: [] for layer in layers}
        for window in windowed_features(model, batch.waveforms[row, :n], layers, chunk):
            for layer, f in window.layers.items():
                parts[layer].append(f)
        results[row] = {layer: torch.cat(p) for layer, p in parts.items()}
    for row in range(len(batch.usable)):
        yield batch.usable[row], results[row]


def export_units(
    model: nn.Module,
    manifest: str | os.PathLike[str] | Any,
    out_dir: str | os.PathLike[str],
    *,
    kind: str,
    layer: Layer | None = None,
    kmeans: KMeansModel | None = None,
    joint: bool = False,
    dedup: bool = False,
    max_tokens: int = 1_600_000,
    max_items: int = 64,
    meta: dict[str, Any] | None = None,
    desc: str = "export-units",
    chunk: ChunkConfig | None = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """Write the units of every manifest item to ``out_dir`` (format: :mod:`speechvq.units.io`).

    Args:
        model: the model, in eval mode.
        manifest: the manifest ``.tsv``.
        out_dir: the units directory.
        kind: ``"codes"`` (quantizer indices) or ``"kmeans"`` (``layer`` features -> ``kmeans``).
        layer: the layer for ``kmeans`` (see the module docstring).
        kmeans: the fitted k-means model for ``kmeans``.
        joint: ``codes``: one joint id per frame instead of ``g0-g1`` tokens.
        dedup: collapse runs of equal units (durations are written alongside).
        max_tokens: padded samples per batch.
        max_items: items per batch.
        meta: extra ``meta.json`` entries.
        desc: the progress bar's name.
        chunk: recordings longer than its window run in overlapping windows (see
            :func:`item_features`); None runs every item whole.

    Returns:
        The written ``meta.json`` contents.
    """
    audio = audio_model(model)
    info = _units_info(audio, kind, layer, kmeans, joint, {"manifest": str(manifest), **(meta or {})})
    units = _UnitMaker(audio, kind, layer, kmeans, joint, chunk if audio.has_transformer else None, info)
    stride_s, centre_s = audio.frame_stride / SAMPLE_RATE, frame_centre_s(audio)
    skipped = SkipCounts()
    with UnitWriter(
        out_dir, frame_stride_s=stride_s, frame_centre_s=centre_s, dedup=dedup, meta=info
    ) as writer:
        batches = iter_manifest(
            manifest, model, max_tokens=max_tokens, max_items=max_items, skipped=skipped, desc=desc
        )
        for batch in batches:
            for relpath, tokens in zip(batch.relpaths, units.of_batch(batch)):
                writer.write(relpath, tokens)
        if skipped.total == writer.num_utterances:  # raised inside: no meta.json, incomplete
            raise UserInputError(
                f"{manifest}: none of its {writer.num_utterances} items could be used ({skipped.describe()}); "
                f"no units written; first: {skipped.first}"
            )
        writer.meta["skipped"] = dict(skipped.counts)
    return dict(
        info,
        num_utterances=writer.num_utterances,
        frame_stride_s=stride_s,
        frame_centre_s=centre_s,
        skipped=dict(skipped.counts),
    )


def _units_info(
    model: AudioModel,
    kind: str,
    layer: Layer | None,
    kmeans: KMeansModel | None,
    joint: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The ``meta.json`` entries that describe the units; usage errors for a bad combination."""
    info: dict[str, Any] = {"kind": kind, **extra}
    if kind == "codes":
        quantizer = quantizing_model(model).quantizer  # type: ignore[arg-type]
        groups, v = int(quantizer.num_codebooks), int(quantizer.codebook_size)
        info.update({"joint": joint, "num_codebooks": groups, "codebook_size": v})
        info["vocab_size"] = v**groups if joint else None
    elif kind == "kmeans":
        if kmeans is None or layer is None:
            raise UserInputError("--kind kmeans needs --km and --layer")
        info.update({"layer": layer, "vocab_size": kmeans.k})
    else:
        raise UserInputError(f"--kind must be 'codes' or 'kmeans', but is {kind!r}")
    return info


class _UnitMaker:
    """The units of every item of an :class:`ExportBatch` (:func:`export_units`'s settings);
    ``chunk``: long recordings in windows (None: every item whole)."""

    def __init__(
        self,
        model: AudioModel,
        kind: str,
        layer: Layer | None,
        kmeans: KMeansModel | None,
        joint: bool,
        chunk: ChunkConfig | None,
        info: dict[str, Any],
    ) -> None:
        self.model, self.kind, self.layer, self.kmeans, self.joint = model, kind, layer, kmeans, joint
        self.chunk, self.info = chunk, info

    def of_batch(self, batch: ExportBatch) -> list[list[Token]]:
        """Per item of ``batch`` (in ``relpaths`` order) its units; empty for an unusable one."""
        per_item: list[list[Token]] = [[] for _ in batch.relpaths]
        if batch.usable:
            make = self._codes if self.kind == "codes" else self._kmeans_units
            for pos, tokens in make(batch):
                per_item[pos] = tokens
        return per_item

    def _codes(self, batch: ExportBatch) -> Iterator[tuple[int, list[Token]]]:
        v = int(self.info["codebook_size"])
        if self.chunk is not None:
            # the quantizer reads each frame's encoder output alone: windows of layer 0
            model = quantizing_model(self.model)  # type: ignore[arg-type]
            for pos, feats in item_features(model, batch, [0], self.chunk):
                codes = model.quantize_features(feats[0][None]).codes[0]
                yield pos, codes_to_tokens(codes, v, self.joint)
            return
        codes, frames = quantizer_codes(self.model, batch.waveforms, batch.lengths)  # type: ignore[arg-type]
        for pos, c, n in zip(batch.usable, codes, frames.tolist()):
            yield pos, codes_to_tokens(c[:n], v, self.joint)

    def _kmeans_units(self, batch: ExportBatch) -> Iterator[tuple[int, list[Token]]]:
        assert self.kmeans is not None and self.layer is not None
        layer, centroids = self.layer, self.kmeans.centroids
        items = (
            item_features(self.model, batch, [layer], self.chunk)
            if self.chunk is not None
            else _batch_items(self.model, batch, layer)
        )
        for pos, by_layer in items:
            feats = by_layer[layer]
            if feats.size(-1) != centroids.shape[1]:
                raise UserInputError(
                    f"{self.info.get('km') or 'the k-means model'}: centroids have dim "
                    f"{centroids.shape[1]}, but layer {layer} of the model gives "
                    f"{feats.size(-1)}-dim features (fitted on another model or layer?)"
                )
            yield pos, [int(x) for x in self.kmeans.predict(feats[None])[0].tolist()]


def _batch_items(
    model: AudioModel, batch: ExportBatch, layer: Layer
) -> Iterator[tuple[int, dict[Layer, Tensor]]]:
    """:func:`item_features` without windows (models without a Transformer)."""
    feats, frames = layer_features(model, batch.waveforms, batch.lengths, layer)  # type: ignore[arg-type]
    for pos, f, n in zip(batch.usable, feats, frames.tolist()):
        yield pos, {layer: f[:n]}


def dump_features(
    model: nn.Module,
    manifest: str | os.PathLike[str],
    layer: Layer,
    directory: str | os.PathLike[str],
    *,
    shard_size: int,
    max_tokens: int = 1_600_000,
    max_items: int = 64,
    desc: str = "features",
) -> FeatureShardWriter:
    """Dump ``layer`` features of every usable manifest item into shards (see :mod:`.kmeans`)."""
    writer = FeatureShardWriter(Path(directory), shard_size)
    windowed = audio_model(model).has_transformer
    for batch in iter_manifest(
        manifest, model, max_tokens=max_tokens, max_items=max_items, skipped=writer.skipped, desc=desc
    ):
        if not batch.usable:
            continue
        # long recordings in windows, as export-units reads them
        items = (
            item_features(model, batch, [layer], DEFAULT_CHUNK)
            if windowed
            else _batch_items(audio_model(model), batch, layer)
        )
        for _, by_layer in items:
            writer.add(by_layer[layer])
    writer.close()
    return writer
