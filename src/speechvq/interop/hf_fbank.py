"""Export of log-mel (``model.encoder.kind: fbank``) models to transformers, as custom classes.

transformers' ``Wav2Vec2Model`` has only the raw-waveform CNN, so a log-mel model is exported as
:mod:`speechvq.interop.modeling_speechvq_fbank`'s ``SpeechvqFbankModel`` (a pretraining model's
body) or ``SpeechvqFbankForCTC`` (a fine-tuned model, with its processor's tokenizer). The export
directory holds ``config.json`` (with ``auto_map`` and the embedded speechvq config, so that
``speechvq convert --from hf`` and ``transcribe`` read it back), ``model.safetensors`` and
``modeling_speechvq_fbank.py``. It is for inference: a pretraining model's body is exported
without its quantizer and pretraining projections (read back, they are freshly initialised); a
CTC model's export is complete. Loading it:

* without speechvq: ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` (or
  ``AutoModelForCTC``), which imports the copied file;
* with speechvq: ``import speechvq.interop.hf_fbank``, then ``AutoModel.from_pretrained(dir)``
  (the classes are registered with the Auto classes here; no remote code runs).

Weights are renamed by :data:`speechvq.interop.hf.HF_KEY_MAP`, as for the CNN models.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from speechvq.errors import UserInputError
from speechvq.interop.hf import hf_config_from_speechvq, speechvq_to_hf_state_dict
from speechvq.interop.modeling_speechvq_fbank import (
    SpeechvqFbankConfig,
    SpeechvqFbankForCTC,
    SpeechvqFbankModel,
)

MODELING_FILE = Path(__file__).with_name("modeling_speechvq_fbank.py")
AUTO_MAP = {
    "AutoConfig": "modeling_speechvq_fbank.SpeechvqFbankConfig",
    "AutoModel": "modeling_speechvq_fbank.SpeechvqFbankModel",
    "AutoModelForCTC": "modeling_speechvq_fbank.SpeechvqFbankForCTC",
}


def _register() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCTC

    try:
        AutoConfig.register(SpeechvqFbankConfig.model_type, SpeechvqFbankConfig)
        AutoModel.register(SpeechvqFbankConfig, SpeechvqFbankModel)
        AutoModelForCTC.register(SpeechvqFbankConfig, SpeechvqFbankForCTC)
    except ValueError:  # already registered (the module was imported under another name)
        pass


_register()


def fbank_config(cfg: Any) -> SpeechvqFbankConfig:
    """The :class:`SpeechvqFbankConfig` of a speechvq config with ``encoder.kind == "fbank"``;
    its waveform normalisation is the config's ``waveform_norm`` (enabled and eps)."""
    e = cfg.encoder
    if e.kind != "fbank":
        raise UserInputError(
            f"`model.encoder.kind` must be 'fbank' for this export, but is {e.kind!r} instead."
        )
    conv = dataclasses.replace(e, kind="conv")  # hf_config_from_speechvq describes the body only
    norm = cfg.waveform_norm
    if not hasattr(cfg, "quantizer"):  # a CtcConfig: the body as a pretraining config describes it
        from speechvq.config import Wav2Vec2Config

        cfg = Wav2Vec2Config(
            encoder=e, context=cfg.context, mask=cfg.mask, feature_dropout_p=cfg.feature_dropout_p
        )
    body = hf_config_from_speechvq(dataclasses.replace(cfg, encoder=conv)).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "speechvq_config", "speechvq_num_updates",
                "num_feat_extract_layers"):  # fmt: skip
        body.pop(key, None)
    # one "conv layer" with the front end's receptive field and stride (560 and 320 samples at
    # 16 kHz), so that transformers' frame-count helpers (inputs_to_logits_ratio,
    # _get_feat_extract_output_lengths) give the log-mel frame counts
    window, hop = round(0.025 * 16000), round(0.010 * 16000)
    body.update(
        num_mel_bins=e.num_mels, fbank_stack=e.fbank_stack, normalize_waveform=norm.enabled, normalize_eps=norm.eps,
        conv_dim=[e.num_mels * e.fbank_stack], conv_kernel=[window + (e.fbank_stack - 1) * hop],
        conv_stride=[hop * e.fbank_stack], auto_map=AUTO_MAP, apply_spec_augment=False, mask_time_prob=0.0,
        mask_feature_prob=0.0,
    )  # fmt: skip
    return SpeechvqFbankConfig(**body)


def _body_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-named weights of the body (``wav2vec2.*``), without the pretraining heads."""
    return {k: v for k, v in state.items() if k.startswith("wav2vec2.")}


def to_hf_fbank(model: Any) -> Any:
    """A ``SpeechvqFbankModel`` (wav2vec 2.0 model) or ``SpeechvqFbankForCTC`` (CTC model) with
    the same weights (strict load), in eval mode."""
    kind = getattr(model, "model_type", None)  # the registered type (speechvq.io.MODEL_TYPES)
    if kind == "wav2vec2":
        hf_cfg = fbank_config(model.cfg)
        hf_cfg.architectures = ["SpeechvqFbankModel"]
        hf_cfg.speechvq_config = model.cfg.to_dict()
        hf_cfg.speechvq_num_updates = int(model.quantizer.num_updates)
        hf = SpeechvqFbankModel(hf_cfg)
        state = {
            k.removeprefix("wav2vec2."): v for k, v in _body_state(speechvq_to_hf_state_dict(model)).items()
        }
    elif kind == "wav2vec2_ctc":
        from speechvq.interop.hf_ctc import speechvq_to_hf_ctc_state_dict

        hf_cfg = fbank_config(model.cfg)
        hf_cfg.architectures = ["SpeechvqFbankForCTC"]
        hf_cfg.vocab_size = model.cfg.vocab_size
        hf_cfg.final_dropout = model.cfg.final_dropout_p
        hf = SpeechvqFbankForCTC(hf_cfg)
        state = speechvq_to_hf_ctc_state_dict(model)
        if "wav2vec2.masked_spec_embed" not in state:
            state["wav2vec2.masked_spec_embed"] = model.mask_embedding.detach().clone()
    else:
        raise UserInputError(f"a {type(model).__name__} cannot be exported to transformers")
    hf.load_state_dict(state, strict=True)
    return hf.eval()


def save_hf_fbank(model: Any, directory: str | Path, vocab: Any = None) -> Path:
    """Write the export directory described in the module docstring (with a CTC model's
    tokenizer and ``speechvq_vocabulary`` when ``vocab`` is given)."""
    directory = Path(directory)
    hf = to_hf_fbank(model)
    if vocab is not None:
        from speechvq.interop.hf_ctc import hf_ctc_config_from_speechvq, hf_processor

        meta = hf_ctc_config_from_speechvq(_as_conv(model.cfg), vocab, int(model.num_updates))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "ctc_loss_reduction", "ctc_zero_infinity",
                    "speechvq_model_type", "speechvq_vocabulary", "speechvq_num_updates"):  # fmt: skip
            setattr(hf.config, key, getattr(meta, key))
        hf.config.speechvq_config = model.cfg.to_dict()
        hf_processor(model.cfg, vocab, directory).save_pretrained(directory)
    hf.save_pretrained(directory)
    shutil.copyfile(MODELING_FILE, directory / MODELING_FILE.name)
    return directory


def _as_conv(cfg: Any) -> Any:
    """``cfg`` with a conv encoder: for the transformers helpers that describe the body only."""
    return dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, kind="conv"))
