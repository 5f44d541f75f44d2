"""Configuration reference generated from the config dataclasses' attribute docstrings.

Every config field is documented once, by the docstring directly under it; this module reads those
docstrings from the source (``ast``), so ``docs/configuration.md`` can never drift from the code.
``tests/test_configdoc.py`` fails when the committed file differs from what this produces; refresh it
with ``python -m speechvq.configdoc > docs/configuration.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
from typing import Any

# (title, "module:Class", intro)
SECTIONS: list[tuple[str, str, str]] = [
    (
        "Model: wav2vec 2.0",
        "speechvq.config:Wav2Vec2Config",
        "Top-level model config (`model:` in a pretrain YAML).",
    ),
    ("Model: feature encoder", "speechvq.config:FeatureEncoderConfig", "`model.encoder.*`"),
    ("Model: Gumbel quantizer", "speechvq.config:QuantizerConfig", "`model.quantizer.*`"),
    ("Model: k-means quantizer", "speechvq.config:KMeansQuantizerConfig", "`model.kmeans.*`"),
    ("Model: masking", "speechvq.config:MaskConfig", "`model.mask.*`"),
    ("Model: context network", "speechvq.config:ContextConfig", "`model.context.*`"),
    ("Model: loss", "speechvq.config:LossConfig", "`model.loss.*`"),
    ("Model: vq-wav2vec", "speechvq.config:VqWav2VecConfig", "The vq-wav2vec model."),
    (
        "Model: CTC fine-tuning",
        "speechvq.models.ctc:CtcConfig",
        "The CTC model built on a pretrained encoder.",
    ),
    ("Pretraining run", "speechvq.train.config:PretrainConfig", "A `speechvq pretrain --config` YAML."),
    ("Pretraining run: model", "speechvq.train.config:ModelSection", "`model:`"),
    ("Pretraining run: data", "speechvq.train.config:DataSection", "`data:`"),
    (
        "Data augmentation",
        "speechvq.data.augment:AugmentConfig",
        "`data.augment:` of a pretraining or CTC fine-tuning YAML (training split only).",
    ),
    ("Pretraining run: optimizer", "speechvq.train.config:OptimSection", "`optim:`"),
    ("Pretraining run: schedule", "speechvq.train.config:ScheduleSection", "`schedule:`"),
    ("Pretraining run: training", "speechvq.train.config:TrainSection", "`train:`"),
    ("Pretraining run: diagnostics", "speechvq.train.config:DiagnosticsSection", "`diagnostics:`"),
    (
        "CTC fine-tuning run",
        "speechvq.train.finetune:FinetuneConfig",
        "A `speechvq finetune-ctc --config` YAML.",
    ),
    ("CTC fine-tuning run: model", "speechvq.train.finetune:FinetuneModelSection", "`model:`"),
    ("CTC fine-tuning run: data", "speechvq.train.finetune:FinetuneDataSection", "`data:`"),
    ("CTC fine-tuning run: schedule", "speechvq.train.finetune:FinetuneScheduleSection", "`schedule:`"),
    ("Unit BERT", "speechvq.units.bert:UnitBertConfig", "`model:` of a `speechvq pretrain-unit-bert` YAML."),
    (
        "Unit BERT run",
        "speechvq.train.tasks.unit_bert:UnitBertRunConfig",
        "A `speechvq pretrain-unit-bert --config` YAML.",
    ),
    ("Unit BERT run: data", "speechvq.train.tasks.unit_bert:UnitDataSection", "`data:`"),
    (
        "CTC over unit-BERT features",
        "speechvq.train.finetune:UnitCtcRunConfig",
        "A `speechvq finetune-ctc --init UNIT_BERT --config` YAML (e.g. `conf/finetune_units_small_cpu.yaml`).",
    ),
    ("CTC over unit-BERT features: model", "speechvq.units.ctc:UnitCtcModelSection", "`model:`"),
    ("CTC over unit-BERT features: data", "speechvq.train.finetune:UnitCtcDataSection", "`data:`"),
]


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring directly under its annotated assignment in the class body (of
    ``cls`` or of the dataclass it inherits the field from)."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, [*body[1:], None]):
            is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            if is_field and is_doc and isinstance(following.value.value, str):  # type: ignore[union-attr]
                docs[node.target.id] = inspect.cleandoc(following.value.value)  # type: ignore[union-attr]
    return docs


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):  # the class, or a public preset of it
            preset = getattr(f.default_factory, "__name__", "_")
            return f"`{type(value).__name__ if preset.startswith(('_', '<')) else preset}()`"
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{value!r}`"


def _type(f: dataclasses.Field[Any]) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return f"`{t}`".replace("|", "\\|")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python -m speechvq.configdoc`; do not edit by hand",
        "(`tests/test_configdoc.py` keeps it in sync). Each description is the field's docstring in the",
        "code, the one place a default is documented.",
        "",
    ]
    for title, spec, intro in SECTIONS:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        docs = field_docs(cls)
        lines += [
            f"## {title}",
            "",
            f"{intro} (`{module}.{name}`)",
            "",
            "| field | type | default | description |",
        ]
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            text = docs.get(f.name, "").replace("\n", " ").replace("|", "\\|")
            if not text and f.default_factory is not dataclasses.MISSING:
                sub = type(f.default_factory()).__name__
                text = next((f"see *{t}*" for t, sp, _ in SECTIONS if sp.endswith(":" + sub)), "")
            lines.append(f"| `{f.name}` | {_type(f)} | {_default(f)} | {text} |")
        lines.append("")
    return "\n".join(lines)


def undocumented() -> list[str]:
    """``Class.field`` for every field without a docstring (nested config fields excepted)."""
    missing = []
    for _, spec, _ in SECTIONS:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            nested = f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
                f.default_factory()
            )
            if f.name not in docs and not nested:
                missing.append(f"{name}.{f.name}")
    return missing


if __name__ == "__main__":
    sys.stdout.write(render())
