"""Pretraining configuration: YAML -> typed dataclasses, plus typed ``--set a.b=v`` overrides.

The YAML file has one mapping per section of :class:`PretrainConfig`::

    model: {preset: tiny, overrides: {context.dropout_p: 0.0}}   # or a full Wav2Vec2Config dict
    data: {train: data/train.tsv, max_tokens: 250000}
    optim: {lr: 5.0e-4}
    schedule: {name: polynomial, warmup_steps: 32000}
    train: {max_steps: 400000, precision: bf16}

Every field is documented once, by the attribute docstring under it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from speechvq.config import PRESETS, VQ_WAV2VEC_PRESETS, VqWav2VecConfig, Wav2Vec2Config, to_plain
from speechvq.configio import from_dict, parse_override, parse_yaml
from speechvq.configs import resolve_config
from speechvq.data.audio import RawFormat
from speechvq.data.augment import AugmentConfig
from speechvq.errors import UserInputError
from speechvq.files import read_text
from speechvq.ranges import check_range
from speechvq.train.sections import (
    OptimSection,
    RunConfig,
    ScheduleSection,
    TrainSection,
    check_sampling,
)


@dataclass(kw_only=True)
class ModelSection:
    """Which model to pretrain: a preset plus dotted overrides, or a full config dict."""

    type: Literal["wav2vec2", "vq_wav2vec"] = "wav2vec2"
    """``wav2vec2`` (masked Transformer, contrastive loss; :class:`~speechvq.config.Wav2Vec2Config`)
    or ``vq_wav2vec`` (conv aggregator predicting future quantized frames with binary
    cross-entropy; :class:`~speechvq.config.VqWav2VecConfig`)."""

    preset: str | None = "base"
    """Preset name: for ``wav2vec2`` ``tiny``, ``small``, ``base``, ``large``; for ``vq_wav2vec``
    ``gumbel``, ``kmeans`` (the paper's). None when ``config`` is given."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted paths into the model config and values, e.g. ``{context.layer_drop_p: 0.1}``."""

    config: dict[str, Any] | None = None
    """A full model config mapping (``to_dict()``); used instead of ``preset`` when given."""


@dataclass(kw_only=True)
class DataSection:
    """Training data and batching (see :mod:`speechvq.data`)."""

    train: str = ""
    """Training manifest (TSV) or Hugging Face dataset directory."""

    valid: str | None = None
    """Validation manifest or dataset directory; None disables validation and best checkpoints."""

    sample_rate: int = 16000
    """Sample rate the audio is resampled to."""

    normalize: bool = False
    """Zero-mean unit-variance normalisation of each waveform (fairseq ``normalize``)."""

    max_sample_size: int | None = 250000
    """Crop longer utterances to this many samples (fairseq ``max_sample_size``)."""

    min_sample_size: int | None = 32000
    """Drop utterances shorter than this (fairseq ``min_sample_size``)."""

    max_tokens: int = 1400000
    """Samples per batch *per process*, padding included (fairseq ``max_tokens``)."""

    num_workers: int = 0
    """DataLoader worker processes."""

    raw_format: str | None = None
    """How headerless files (``.raw``, ``.pcm``: any suffix that is not an audio container) are
    read: ``RATE[:CHANNELS[:SUBTYPE[:ENDIAN]]]``, e.g. ``16000:1:PCM_16``, as ``speechvq manifest
    --raw-format``; None: such files are an error."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """On-the-fly augmentation of the training split (never validation); all off by default. See
    :class:`speechvq.data.augment.AugmentConfig` and *Augmentation* in ``docs/training.md``."""

    def raw(self) -> RawFormat | None:
        """:attr:`raw_format` parsed (raises :class:`UserInputError` naming the problem)."""
        return None if self.raw_format is None else RawFormat.parse(str(self.raw_format))

    def validate(self, prefix: str = "data") -> None:
        """Every value in its range; raises :class:`UserInputError` naming the first that is not."""
        check_sampling(self, prefix)
        self.augment.validate(f"{prefix}.augment")
        check_range(f"{prefix}.max_sample_size", self.max_sample_size, 1, integer=True, optional=True)
        check_range(f"{prefix}.min_sample_size", self.min_sample_size, 0, integer=True, optional=True)
        self.raw()
        if self.max_sample_size is not None and (self.min_sample_size or 0) > self.max_sample_size:
            raise UserInputError(
                f"`{prefix}.min_sample_size` must be <= {prefix}.max_sample_size ({self.max_sample_size}), "
                f"but is {self.min_sample_size} instead."
            )


@dataclass(kw_only=True)
class DiagnosticsSection:
    """Thresholds of the collapse warnings (:func:`speechvq.train.diagnostics.collapse_warnings`)."""

    window: int = 3
    """Consecutive log records a condition must hold for before it is reported."""

    chance_after_steps: int | None = None
    """Only report a loss stuck at chance after this many updates; None: twice the warmup, at
    least 500 (a healthy run can sit at chance through its warmup)."""

    chance_rel_tol: float = 0.02
    """"Stuck at chance": contrastive loss per target within this fraction of log(K + 1)."""

    min_code_perplexity_per_group: float = 2.0
    """Warn when the code perplexity falls below this many codes per codebook group."""

    trivial_accuracy: float = 0.99
    """Accuracy at or above this, together with a loss below ``trivial_loss``, is a trivial task."""

    trivial_loss: float = 0.05
    """Contrastive loss per target (nats) below which the task looks trivial."""

    min_grad_norm: float = 1e-6
    """Warn when the gradient norm stays below this."""

    hard_soft_ratio: float = 0.25
    """Warn when the code (argmax) perplexity stays below this fraction of the prob (softmax)
    perplexity: the codes concentrate on a few entries while the diversity loss is met by flat
    soft distributions, so the targets are losing information."""

    falling_fraction: float = 0.25
    """Warn when the code perplexity stays below this fraction of its peak earlier in the run."""

    def validate(self) -> None:
        """Window and step counts >= 1 (or null), thresholds finite and >= 0, fractions in [0, 1]."""
        check_range("diagnostics.window", self.window, 1, integer=True)
        check_range("diagnostics.chance_after_steps", self.chance_after_steps, 0, integer=True, optional=True)
        for name in ("chance_rel_tol", "min_code_perplexity_per_group", "trivial_loss", "min_grad_norm"):
            check_range(f"diagnostics.{name}", getattr(self, name), 0)
        for name in ("trivial_accuracy", "hard_soft_ratio", "falling_fraction"):
            check_range(f"diagnostics.{name}", getattr(self, name), 0, 1)


@dataclass(kw_only=True)
class PretrainConfig(RunConfig):
    """Everything a pretraining run reads; written resolved to ``exp_dir/config.yaml``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    diagnostics: DiagnosticsSection = field(default_factory=DiagnosticsSection)

    def model_config(self) -> Any:
        """The model config this run trains: a :class:`Wav2Vec2Config`, or a
        :class:`VqWav2VecConfig` for ``model.type: vq_wav2vec``."""
        m = self.model
        cls = VqWav2VecConfig if m.type == "vq_wav2vec" else Wav2Vec2Config
        if m.config is not None:
            cfg = cls.from_dict(m.config, "model.config")
        elif m.preset is not None:
            presets = VQ_WAV2VEC_PRESETS if m.type == "vq_wav2vec" else PRESETS
            if m.preset not in presets:
                raise UserInputError(
                    f"`model.preset` must be one of {sorted(presets)} for a {m.type} model, but is "
                    f"{m.preset!r} instead."
                )
            cfg = presets[m.preset]()
        else:
            raise UserInputError("`model` must give a `preset` or a `config`, but gives neither instead.")
        data = cfg.to_dict()
        for path, value in m.overrides.items():
            _set_dotted(data, path, value, where="model.overrides")
        return cls.from_dict(data, "model")

    def validate(self) -> None:
        """Cross-field checks; raises :class:`UserInputError`."""
        self.train.validate()
        self.data.validate()
        self.optim.validate()
        self.schedule.validate()
        self.diagnostics.validate()
        if not self.data.train:
            raise UserInputError("`data.train` must name a manifest, but is empty instead.")
        self.data.raw()  # a bad data.raw_format fails here, before any work
        try:
            model = self.model_config()
        except (TypeError, ValueError, KeyError) as err:
            if isinstance(err, UserInputError):
                raise
            raise UserInputError(f"`model` is not a valid model config: {err}") from err
        if isinstance(model, VqWav2VecConfig):
            from speechvq.models.vq_wav2vec import vq_min_input_samples

            shortest = vq_min_input_samples(model)
        else:
            from speechvq.models.encoder import min_input_samples

            shortest = min_input_samples(model.encoder)
        if self.data.max_sample_size is not None and self.data.max_sample_size < shortest:
            raise UserInputError(
                f"`data.max_sample_size` must be >= {shortest} (the samples one frame of this model needs), "
                f"but is {self.data.max_sample_size} instead."
            )


def _set_dotted(data: dict[str, Any], path: str, value: Any, *, where: str) -> None:
    """Set ``data[a][b] = value`` for ``path = "a.b"`` on a plain dict; the key must exist."""
    keys = path.split(".")
    node = data
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            known = sorted(node) if isinstance(node, dict) else []
            raise UserInputError(
                f"{where}: `{'.'.join(keys[: i + 1])}` is not a config field; known here: {known}"
            )
        if i == len(keys) - 1:
            node[key] = value
        else:
            node = node[key]


def config_from_dict(data: dict[str, Any], cls: type = PretrainConfig) -> Any:
    """Build a ``cls`` (default :class:`PretrainConfig`) from a plain mapping of sections,
    type-checking every value (:func:`speechvq.configio.from_dict`)."""
    if not isinstance(data, dict):
        raise UserInputError(
            f"the config must be a mapping of sections, but is {type(data).__name__} instead."
        )
    sections = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise UserInputError(f"unknown section(s) {unknown}; known: {sorted(sections)}")
    return from_dict(cls, data)


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = PretrainConfig) -> dict[str, Any]:
    """Apply ``--set`` overrides to a plain config dict (in place; returns it).

    ``model.<path>`` keys below ``model.preset/overrides/config`` go into ``model.overrides``, so
    ``--set model.context.dropout_p=0.0`` works whichever way the model is given.
    """
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        sections = {f.name for f in dataclasses.fields(cls)}
        nested_model = cls is PretrainConfig  # only pretraining nests model fields under `overrides`
        if (
            nested_model
            and parts[0] == "model"
            and len(parts) > 1
            and parts[1] not in ("preset", "overrides", "config")
        ):
            model = data.setdefault("model", {}) or {}
            data["model"] = model
            model.setdefault("overrides", {})
            model["overrides"] = {**(model["overrides"] or {}), ".".join(parts[1:]): value}
            continue
        if len(parts) < 2 or parts[0] not in sections:
            raise UserInputError(
                f"--set {text}: `{key}` must be <section>.<field> with a section in {sorted(sections)}"
            )
        defaults = to_plain(dataclasses.asdict(cls()))
        _set_dotted(defaults, key, value, where=f"--set {text}")  # checks that the field exists
        section = data.setdefault(parts[0], {}) or {}
        data[parts[0]] = section
        section[parts[1]] = value if len(parts) == 2 else _nested(section.get(parts[1]), parts[2:], value)
    return data


def _nested(node: Any, keys: list[str], value: Any) -> Any:
    node = dict(node or {})
    if len(keys) == 1:
        node[keys[0]] = value
    else:
        node[keys[0]] = _nested(node.get(keys[0]), keys[1:], value)
    return node


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type = PretrainConfig) -> Any:
    """Read a YAML config into ``cls`` (default :class:`PretrainConfig`), apply ``--set`` overrides,
    type-check and validate it (``cls.validate()``)."""
    path = resolve_config(path)  # a path, or the name of a shipped config
    data = parse_yaml(read_text(path, "config file"), str(path)) or {}
    try:
        cfg = config_from_dict(apply_overrides(data, overrides or [], cls), cls)
        cfg.validate()
    except UserInputError as err:
        raise UserInputError(f"{path}: {err}") from err
    return cfg


def dump_config(cfg: PretrainConfig) -> str:
    """The resolved config as YAML, with the model config written out in full."""
    data = cfg.to_dict()
    data["model"] = {
        "type": cfg.model.type,
        "preset": None,
        "overrides": {},
        "config": cfg.model_config().to_dict(),
    }
    return yaml.safe_dump(data, sort_keys=False)
