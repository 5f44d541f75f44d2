"""Export a fine-tuned :class:`~speechvq.models.ctc.CtcModel` as transformers' ``Wav2Vec2ForCTC``.

The directory written by :func:`save_hf_ctc` holds the model (``config.json``,
``model.safetensors``) and its ``Wav2Vec2Processor`` (``Wav2Vec2CTCTokenizer`` with the
vocabulary's ``vocab.json``; ``Wav2Vec2FeatureExtractor`` whose ``do_normalize`` is the model's
``normalize_waveform``), so that, offline::

    pipeline("automatic-speech-recognition", model=OUT)

transcribes like ``speechvq transcribe`` does. The encoder and context weights are renamed by
:data:`speechvq.interop.hf.HF_KEY_MAP`; this module adds only the output layer. The speechvq
config and vocabulary are embedded in the transformers config (``speechvq_config``,
``speechvq_vocabulary``), so :func:`load_hf_ctc` reads the export back losslessly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from speechvq.config import Wav2Vec2Config
from speechvq.errors import UserInputError
from speechvq.files import check_output_dir, read_json
from speechvq.interop.hf import HF_KEY_MAP, hf_config_from_speechvq, quiet_transformers, rename_keys
from speechvq.io import load_weights, read_safetensors, state_dict_for_save, write_directory
from speechvq.models.ctc import CtcConfig, CtcModel, build_ctc_model
from speechvq.text.vocab import BOS, EOS, PAD, UNK, WORD_DELIMITER, Vocabulary

HF_CTC_KEY_MAP: list[tuple[str, str]] = [*HF_KEY_MAP, ("lm_head.", "lm_head.")]
"""speechvq ``CtcModel`` -> ``Wav2Vec2ForCTC`` parameter names."""

_SPEECHVQ_ONLY = ("num_updates",)


def _has_mask_embedding(cfg: CtcConfig) -> bool:
    # transformers creates masked_spec_embed only when some masking is configured
    return cfg.mask.mask_prob > 0.0 or cfg.mask.channel_prob > 0.0


def speechvq_to_hf_ctc_state_dict(model: CtcModel) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` under ``Wav2Vec2ForCTC`` names."""
    state = {k: v for k, v in state_dict_for_save(model).items() if k not in _SPEECHVQ_ONLY}
    if not _has_mask_embedding(model.cfg):
        state.pop("mask_embedding")
    names = rename_keys(list(state), HF_CTC_KEY_MAP)
    return {names[k]: v for k, v in state.items()}


def hf_ctc_config_from_speechvq(cfg: CtcConfig, vocab: Vocabulary, num_updates: int | None = None) -> Any:
    """A ``transformers.Wav2Vec2Config`` for ``Wav2Vec2ForCTC`` with the same architecture."""
    if len(vocab) != cfg.vocab_size:
        raise ValueError(
            f"`vocab` must have {cfg.vocab_size} tokens (the model's), but has {len(vocab)} instead."
        )
    if cfg.blank_id != vocab.blank_id:
        raise ValueError(
            f"the model's `blank_id` must be {vocab.blank_id} (<pad>), but is {cfg.blank_id} instead."
        )
    # the shared architecture is described by the pretraining model's mapping
    hf = hf_config_from_speechvq(
        Wav2Vec2Config(
            encoder=cfg.encoder, context=cfg.context, mask=cfg.mask, feature_dropout_p=cfg.feature_dropout_p
        )
    )
    hf.architectures = ["Wav2Vec2ForCTC"]
    hf.vocab_size = cfg.vocab_size
    hf.pad_token_id = vocab.blank_id
    hf.bos_token_id = vocab.token_to_id(BOS)
    hf.eos_token_id = vocab.token_to_id(EOS)
    hf.final_dropout = cfg.final_dropout_p
    hf.ctc_loss_reduction = "sum"
    hf.ctc_zero_infinity = True
    hf.apply_spec_augment = _has_mask_embedding(cfg)
    hf.speechvq_model_type = CtcModel.model_type
    hf.speechvq_config = cfg.to_dict()
    hf.speechvq_vocabulary = vocab.to_dict()
    # the update count (it drives the step-based freezing) travels in the config, so that a round
    # trip is lossless; an export without it is taken to be past the freeze
    hf.speechvq_num_updates = int(cfg.freeze_updates if num_updates is None else num_updates)
    return hf


def to_hf_ctc(model: CtcModel, vocab: Vocabulary) -> Any:
    """A ``Wav2Vec2ForCTC`` holding the same weights (strict load), in eval mode."""
    from transformers import Wav2Vec2ForCTC

    hf = Wav2Vec2ForCTC(hf_ctc_config_from_speechvq(model.cfg, vocab, int(model.num_updates)))
    hf.load_state_dict(speechvq_to_hf_ctc_state_dict(model), strict=True)
    return hf.eval()


def hf_processor(cfg: CtcConfig, vocab: Vocabulary, directory: str | Path) -> Any:
    """The ``Wav2Vec2Processor`` of an export (writes the tokenizer's ``vocab.json`` to ``directory``)."""
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.json"
    vocab_file.write_text(json.dumps(vocab.hf_vocab(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tokenizer = Wav2Vec2CTCTokenizer(
        str(vocab_file),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        word_delimiter_token=WORD_DELIMITER,
        do_lower_case=False,
        clean_up_tokenization_spaces=False,
    )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16000,
        padding_value=0.0,
        do_normalize=cfg.normalize_waveform,
        # group-norm models are fed unpadded audio in transformers (their norm would see padding)
        return_attention_mask=cfg.encoder.norm_mode == "layer_norm",
    )
    return Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer)


def save_hf_ctc(model: CtcModel, vocab: Vocabulary, directory: str | Path) -> Path:
    """Write ``model`` and its processor as a transformers ``save_pretrained`` directory.

    Args:
        model: the fine-tuned model.
        vocab: its vocabulary (``len(vocab) == model.cfg.vocab_size``).
        directory: the output directory (created).

    Returns:
        ``directory``.
    """
    directory = check_output_dir(directory, "the transformers model directory")
    hf = to_hf_ctc(model, vocab)

    def save(tmp: Path) -> None:
        hf.save_pretrained(tmp)
        hf_processor(model.cfg, vocab, tmp).save_pretrained(tmp)

    with quiet_transformers():
        return write_directory(directory, save)


def load_hf_ctc(directory: str | Path) -> tuple[CtcModel, Vocabulary]:
    """Read a directory written by :func:`save_hf_ctc` back into speechvq (offline).

    Raises:
        UserInputError: if the directory is not such an export.
    """

    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise UserInputError(f"{directory}: not a transformers model directory (no config.json)")
    meta = read_json(config_path, "model config")
    if meta.get("speechvq_model_type") != CtcModel.model_type or "speechvq_vocabulary" not in meta:
        raise UserInputError(
            f"{config_path}: not a speechvq CTC export (no speechvq_config / speechvq_vocabulary)"
        )
    try:
        cfg = CtcConfig.from_dict(meta["speechvq_config"])
        vocab = Vocabulary.from_dict(meta["speechvq_vocabulary"])
        num_updates = int(meta.get("speechvq_num_updates", cfg.freeze_updates))
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise UserInputError(f"{config_path}: invalid speechvq CTC export config: {err}") from None
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise UserInputError(f"{directory}: missing model.safetensors")
    state = read_safetensors(weights)
    try:
        names = rename_keys(list(state), HF_CTC_KEY_MAP, reverse=True)
    except KeyError as err:
        raise UserInputError(f"{weights}: unexpected parameter {err.args[0]}") from None
    converted = {names[k]: v for k, v in state.items()}
    model = build_ctc_model(cfg)
    if "mask_embedding" not in converted:
        converted["mask_embedding"] = model.mask_embedding.detach().clone()
    converted["num_updates"] = torch.tensor(num_updates)
    load_weights(model, converted, weights)
    return model.eval(), vocab
