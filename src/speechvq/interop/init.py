"""A pretrained wav2vec 2.0 model from any of the model formats speechvq reads.

A fairseq ``.pt`` checkpoint, a speechvq model directory (``config.json`` + ``model.safetensors``)
or a transformers model directory. ``speechvq finetune-ctc --init`` also takes speechvq's own
training checkpoints and experiment directories; those are the training package's format, read by
:func:`speechvq.train.init_model.load_init_model`, which falls back to this module for the rest.
"""

from __future__ import annotations

from pathlib import Path

from speechvq.errors import UserInputError
from speechvq.io import read_config
from speechvq.models.wav2vec2 import Wav2Vec2Model


def load_pretrained_wav2vec2(path: Path, spec: str | None = None) -> Wav2Vec2Model:
    """The wav2vec 2.0 model in ``path``: a fairseq checkpoint file, or a speechvq or transformers
    model directory.

    Args:
        path: the file or directory.
        spec: how the user named it, for messages (default: ``path``).

    Raises:
        UserInputError: if ``path`` holds none of those, or a model that is not a pretrained
            wav2vec 2.0 model (a CTC model, vq-wav2vec).
    """
    spec = str(path) if spec is None else spec
    if path.is_file():
        from speechvq.interop.fairseq import import_fairseq

        model = import_fairseq(path)
    elif is_speechvq_dir(path):
        from speechvq.io import load_pretrained

        model = load_pretrained(path)
    elif (path / "config.json").is_file():
        from speechvq.interop.hf import load_hf

        model = load_hf(path)
    else:
        raise UserInputError(f"{spec}: not a model, experiment or checkpoint directory")
    if not isinstance(model, Wav2Vec2Model):
        raise UserInputError(f"{spec}: holds a {type(model).__name__}, not a pretrained wav2vec 2.0 model")
    return model


def is_speechvq_dir(path: Path) -> bool:
    """Whether ``path`` is a speechvq model directory (its ``config.json`` says so)."""
    try:
        read_config(path)
    except UserInputError:
        return False
    return True
