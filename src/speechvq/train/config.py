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

from speechvq.config import PRESETS, VQ_WAV2VEC_PRESETS, VqWav2VecConfig, Wav2Vec2Config
from speechvq.configio import from_dict, parse_override, parse_yaml
from speechvq.configs import resolve_config
from speechvq.data.audio import RawFormat
from speechvq.data.augment import AugmentConfig
from speechvq.errors import UserInputError
from speechvq.files import read_text
from speechvq.ranges import check_range


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


MAX_SAMPLE_RATE = 1_000_000
"""Largest ``data.sample_rate`` accepted (1 MHz; speech is 8-48 kHz)."""


def check_sampling(data: Any, prefix: str) -> None:
    """``sample_rate``, ``max_tokens`` and ``num_workers`` of a data section (those it has)."""
    if hasattr(data, "sample_rate"):
        check_range(f"{prefix}.sample_rate", data.sample_rate, 1, MAX_SAMPLE_RATE, integer=True)
    check_range(f"{prefix}.max_tokens", data.max_tokens, 1, integer=True)
    check_range(f"{prefix}.num_workers", data.num_workers, 0, integer=True)


@dataclass(kw_only=True)
class OptimSection:
    """Adam with decoupled weight decay (fairseq ``adam``, which decays weights as AdamW does)."""

    lr: float = 5e-4
    """Peak learning rate."""

    betas: tuple[float, float] = (0.9, 0.98)
    """Adam (beta1, beta2)."""

    eps: float = 1e-6
    """Adam epsilon."""

    weight_decay: float = 0.01
    """Decoupled weight decay."""

    clip_grad_norm: float = 10.0
    """Clip the total gradient norm to this value; 0 disables clipping (fairseq ``clip_norm``)."""

    def validate(self, prefix: str = "optim") -> None:
        """lr > 0, betas in [0, 1), eps, weight decay and clipping >= 0, all finite."""
        check_range(f"{prefix}.lr", self.lr, 0, low_open=True)
        for i, beta in enumerate(self.betas):
            check_range(f"{prefix}.betas[{i}]", beta, 0, 1, high_open=True)
        check_range(f"{prefix}.eps", self.eps, 0)
        check_range(f"{prefix}.weight_decay", self.weight_decay, 0)
        check_range(f"{prefix}.clip_grad_norm", self.clip_grad_norm, 0)


@dataclass(kw_only=True)
class ScheduleSection:
    """Learning-rate schedule; see :func:`speechvq.train.optim.lr_at`."""

    name: Literal["polynomial", "tri_stage", "cosine", "constant"] = "polynomial"
    """``polynomial``: linear warmup, then polynomial decay to ``end_lr_scale`` (fairseq
    ``polynomial_decay``). ``tri_stage``: warmup / hold / exponential decay by ``phase_ratio``.
    ``cosine``: linear warmup, then cosine decay to ``end_lr_scale``. ``constant``: warmup, then flat."""

    warmup_steps: int = 32000
    """Linear warmup updates (polynomial, cosine, constant)."""

    power: float = 1.0
    """Exponent of the polynomial decay (1 = linear)."""

    end_lr_scale: float = 0.0
    """Final lr as a fraction of the peak (polynomial, cosine)."""

    phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5)
    """Tri-stage warmup / hold / decay fractions of ``train.max_steps``."""

    init_lr_scale: float = 0.01
    """Tri-stage lr at step 0 as a fraction of the peak."""

    final_lr_scale: float = 0.05
    """Tri-stage lr at the end as a fraction of the peak."""

    def validate(self, prefix: str = "schedule") -> None:
        """A known name, warmup >= 0, fractions and scales in range, phases summing to 1."""
        if self.name not in ("polynomial", "tri_stage", "cosine", "constant"):
            raise UserInputError(
                f"`{prefix}.name` must be polynomial, tri_stage, cosine or constant, "
                f"but is {self.name!r} instead."
            )
        check_range(f"{prefix}.warmup_steps", self.warmup_steps, 0, integer=True)
        check_range(f"{prefix}.power", self.power, 0, low_open=True)
        check_range(f"{prefix}.end_lr_scale", self.end_lr_scale, 0, 1)
        for i, ratio in enumerate(self.phase_ratio):
            check_range(f"{prefix}.phase_ratio[{i}]", ratio, 0, 1)
        if abs(sum(self.phase_ratio) - 1.0) > 1e-6:
            raise UserInputError(
                f"`{prefix}.phase_ratio` must sum to 1, but is {list(self.phase_ratio)} instead."
            )
        check_range(f"{prefix}.init_lr_scale", self.init_lr_scale, 0, 1)
        # tri-stage decays exponentially to it: log(final_lr_scale) must exist
        check_range(f"{prefix}.final_lr_scale", self.final_lr_scale, 0, 1, low_open=True)

    def warmup_updates(self, max_steps: int) -> int:
        """Updates spent warming up under this schedule."""
        if self.name == "tri_stage":
            return int(self.phase_ratio[0] * max_steps)
        return self.warmup_steps


@dataclass(kw_only=True)
class TrainSection:
    """Steps, batching across steps and processes, precision, intervals."""

    max_steps: int = 400000
    """Optimizer updates to run."""

    grad_accum: int = 1
    """Batches accumulated per update (fairseq ``update_freq``)."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``bf16``: bf16 autocast (CPU and GPU). ``fp16``: fp16 autocast with loss scaling (GPU only).
    Logits, quantizer and losses always run in fp32."""

    seed: int = 1
    """Seeds the model init, the data order and every per-step random draw."""

    cpu: bool = False
    """Run on the CPU even if a GPU is visible."""

    log_interval: int = 100
    """Updates between metric records (and collapse checks)."""

    valid_interval: int = 10000
    """Updates between validations (and best-checkpoint decisions)."""

    save_interval: int = 10000
    """Updates between checkpoints; a checkpoint is also written at the end of the run."""

    keep_last: int = 2
    """Checkpoints to keep besides the best one."""

    on_save_error: Literal["stop", "continue"] = "stop"
    """When a checkpoint cannot be written (e.g. the disk is full): ``stop`` ends the run with a
    one-line error; ``continue`` logs the error and trains on (earlier checkpoints stay intact)."""

    max_nonfinite: int = 20
    """Stop the run after this many skipped (non-finite) updates in a row."""

    max_wall_s: float | None = None
    """Stop (with a checkpoint) after this many seconds of training; None for no limit."""

    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""

    tensorboard: bool = True
    """Write TensorBoard event files to ``exp_dir/tensorboard`` (needs ``tensorboard``)."""

    def validate(self) -> None:
        """Counts and intervals at least 1, a seed torch accepts, a known precision and save-error
        policy; raises :class:`UserInputError`."""
        for name in (
            "max_steps",
            "grad_accum",
            "log_interval",
            "valid_interval",
            "save_interval",
            "keep_last",
            "max_nonfinite",
        ):
            check_range(f"train.{name}", getattr(self, name), 1, integer=True)
        check_range("train.seed", self.seed, 0, MAX_SEED, integer=True)
        check_range("train.max_wall_s", self.max_wall_s, 0, optional=True)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise UserInputError(
                f"`train.precision` must be fp32, bf16 or fp16, but is {self.precision!r} instead."
            )
        if self.on_save_error not in ("stop", "continue"):
            raise UserInputError(
                f"`train.on_save_error` must be stop or continue, but is {self.on_save_error!r} instead."
            )


MAX_SEED = 2**63 - 1
"""Largest ``train.seed``: torch's generators take a signed 64-bit seed."""


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
class PretrainConfig:
    """Everything a pretraining run reads; written resolved to ``exp_dir/config.yaml``."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    diagnostics: DiagnosticsSection = field(default_factory=DiagnosticsSection)

    def to_dict(self) -> dict[str, Any]:
        """A YAML-safe dict (tuples become lists)."""
        return plain(dataclasses.asdict(self))

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


def plain(value: Any) -> Any:
    """Dicts, lists and tuples (as lists) of scalars: a YAML/JSON-safe copy of a dataclass dict."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


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
        defaults = plain(dataclasses.asdict(cls()))
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
