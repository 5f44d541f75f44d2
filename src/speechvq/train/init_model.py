"""``--init`` of ``speechvq finetune-ctc``: the pretrained wav2vec 2.0 model to fine-tune.

Five formats: a pretraining experiment directory (its best checkpoint, else its newest), a
``checkpoints`` directory, one checkpoint directory (:mod:`speechvq.train.checkpoint`), and the
model formats of :func:`speechvq.interop.init.load_pretrained_wav2vec2` (a speechvq or
transformers model directory, a fairseq ``.pt`` checkpoint).
"""

from __future__ import annotations

from pathlib import Path

from speechvq.config import Wav2Vec2Config
from speechvq.configio import parse_yaml
from speechvq.errors import UserInputError
from speechvq.files import read_text
from speechvq.interop.init import load_pretrained_wav2vec2
from speechvq.models.wav2vec2 import Wav2Vec2Model, build_wav2vec2
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import config_from_dict


def load_init_model(spec: str) -> Wav2Vec2Model:
    """The pretrained wav2vec 2.0 model named by ``--init``.

    Args:
        spec: a speechvq model directory, a pretraining experiment directory (its best checkpoint,
            else its newest), a checkpoint directory or a ``checkpoints`` directory, a transformers
            model directory, or a fairseq ``.pt`` checkpoint.

    Raises:
        UserInputError: if nothing usable is there.
    """
    path = Path(spec)
    if not path.exists():
        raise UserInputError(f"{spec}: --init not found (give a model, experiment or checkpoint, or 'none')")
    if path.is_dir() and ((path / "checkpoints").is_dir() or ckpt.list_checkpoints(path)):
        return checkpoint_model(
            _pick_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        )
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file():
        return checkpoint_model(path)
    return load_pretrained_wav2vec2(path, spec)


def _pick_checkpoint(root: Path) -> Path:
    path = ckpt.best_checkpoint(root)
    if path is None:
        raise UserInputError(f"{root}: no checkpoint")
    return path


def checkpoint_model(path: Path) -> Wav2Vec2Model:
    """Rebuild the pretraining model of a :mod:`speechvq.train.checkpoint` directory.

    The checkpoint is verified (every sha256) before any of its files is parsed.
    """
    problem = ckpt.verify_checkpoint(path)
    if problem is not None:
        raise ckpt.CorruptCheckpointError(f"{path}: {problem}")
    try:
        saved = parse_yaml(read_text(path / "config.yaml", "checkpoint config"), f"{path}/config.yaml")
        w2v_cfg: Wav2Vec2Config = config_from_dict(saved).model_config()
    except (UserInputError, TypeError, ValueError, KeyError) as err:
        raise UserInputError(f"{path}/config.yaml: not a pretraining checkpoint config: {err}") from err
    if not isinstance(w2v_cfg, Wav2Vec2Config):
        raise UserInputError(
            f"{path}: a vq-wav2vec checkpoint; CTC fine-tuning starts from wav2vec 2.0 (for vq-wav2vec, "
            "export its units and fine-tune a unit BERT: docs/units.md)"
        )
    model = build_wav2vec2(w2v_cfg)
    try:
        model.load_state_dict(ckpt.load_checkpoint(path)[0])
    except RuntimeError as err:
        raise UserInputError(
            f"{path}/model.safetensors: the weights do not fit its config ({str(err).splitlines()[0][:200]})"
        ) from None
    return model
