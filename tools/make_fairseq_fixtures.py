#!/usr/bin/env python3
"""Build the fairseq reference fixtures of ``tests/interop/test_fairseq.py``.

Usage:
    /path/to/fairseq-venv/bin/python tools/make_fairseq_fixtures.py --out tests/fixtures/fairseq
    /path/to/fairseq-venv/bin/python tools/make_fairseq_fixtures.py --out tests/fixtures/fairseq \\
        --speechvq-python .venv/bin/python          # also check speechvq's export in fairseq

Runs with a Python that has fairseq installed (e.g. the ``fairseq-fixed`` package built against
the pinned torch; see docs/vq_wav2vec.md), never with speechvq's own environment. For each kind of
model it builds a small random fairseq model, saves its checkpoint the way fairseq's trainer does
(``cfg`` as a plain container for hydra-era models; an ``argparse.Namespace`` under ``args`` for
vq-wav2vec, whose released checkpoints predate hydra), and saves the model's outputs on fixed
inputs to ``NAME.safetensors``:

* ``w2v2_base`` / ``w2v2_large``: wav2vec 2.0 in the BASE layout (group-norm extractor, post-LN)
  and the LARGE layout (layer-norm extractor with conv bias, pre-LN); tensors ``input``,
  ``features`` (encoder output), ``codes`` (quantizer targets in eval), ``context`` (Transformer
  output, no masking).
* ``w2v2_ctc``: ``wav2vec_ctc`` fine-tuned model; ``input``, ``features``, ``context``, ``logits``.
* ``vq_gumbel`` / ``vq_kmeans``: vq-wav2vec; ``input``, ``features``, ``codes``, ``quantized``,
  ``context`` (aggregator output), ``distractors`` (the negatives fairseq drew, as frame indices
  ``[B, T, K]``), ``cpc_logits`` (fairseq's flat BCE logits), ``loss`` (BCE sum) and, for k-means,
  ``kmeans_loss``.

With ``--speechvq-python`` random speechvq models (wav2vec 2.0 in both layouts, vq-wav2vec with
both quantizers) are exported by speechvq to fairseq checkpoints, loaded by fairseq's own
``checkpoint_utils.load_model_ensemble_and_task`` and run; ``manifest.json``'s ``export_check``
records the largest difference to speechvq's outputs.

Inputs are unpadded: fairseq's group-norm extractor normalises over the padded input, which
speechvq (and transformers) only match without padding. Outputs are recorded in eval mode.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

logger = logging.getLogger("make_fairseq_fixtures")

BASE_CONV = "[(32, 10, 5)] + [(32, 3, 2)] * 4 + [(32, 2, 2)] * 2"
VQ_CONV = "[(32, 10, 5), (32, 8, 4), (32, 4, 2), (32, 4, 2), (32, 4, 2), (32, 1, 1), (32, 1, 1), (32, 1, 1)]"
VQ_AGG = "[(24, 2, 1), (24, 3, 1), (24, 4, 1), (24, 5, 1)]"


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/fairseq"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild fixtures that already exist")
    parser.add_argument("--speechvq-python", default=None, help="a Python with speechvq, to check the export")
    return parser.parse_args()


def perturb_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Add noise to every floating parameter, so that norms are not identity and a swapped key
    shows up in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def fixed_input(seed: int, batch: int = 2, samples: int = 4000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, samples, generator=gen)


def full_cfg(model_cfg, task_cfg, criterion: dict) -> dict:
    """The ``cfg`` fairseq's trainer stores: the whole FairseqConfig as a plain container."""
    from fairseq.dataclass.configs import FairseqConfig

    cfg = OmegaConf.structured(FairseqConfig)
    OmegaConf.set_struct(cfg, False)
    cfg.model = model_cfg
    cfg.task = task_cfg
    cfg.criterion = OmegaConf.create(criterion)
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def checkpoint(
    cfg: dict | None, args: argparse.Namespace | None, model: torch.nn.Module, criterion: str
) -> dict:
    """A checkpoint laid out as fairseq's ``Trainer.state_dict`` (optimizer state left out)."""
    return {
        "args": args,
        "cfg": cfg,
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [
            {
                "criterion_name": criterion,
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 0.0},
    }


def w2v2_model_cfg(large: bool):
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config

    cfg = Wav2Vec2Config(
        extractor_mode="layer_norm" if large else "default",
        conv_feature_layers=BASE_CONV,
        conv_bias=large,
        encoder_layers=2,
        encoder_embed_dim=48,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        layer_norm_first=large,
        conv_pos=16,
        conv_pos_groups=4,
        final_dim=16,
        latent_vars=8,
        latent_groups=2,
        latent_dim=24 if large else 0,
        quantizer_depth=1,
        quantize_targets=True,
        num_negatives=5,
        logit_temp=0.1,
        encoder_layerdrop=0.1 if large else 0.05,
        dropout_input=0.1,
        dropout_features=0.1,
        feature_grad_mult=1.0 if large else 0.1,
        latent_temp=(2.0, 0.1, 0.999995) if large else (2.0, 0.5, 0.999995),
    )
    model_cfg = OmegaConf.structured(cfg)
    OmegaConf.set_struct(model_cfg, False)
    model_cfg._name = "wav2vec2"
    return model_cfg


def pretraining_task_cfg(normalize: bool):
    from fairseq.tasks.audio_pretraining import AudioPretrainingConfig

    task = OmegaConf.structured(AudioPretrainingConfig(data="/nonexistent", normalize=normalize))
    OmegaConf.set_struct(task, False)
    task._name = "audio_pretraining"
    return task


def make_w2v2(name: str, large: bool, out: Path, seed: int) -> None:
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model

    torch.manual_seed(seed)
    model_cfg = w2v2_model_cfg(large)
    model = Wav2Vec2Model.build_model(model_cfg, task=None)
    perturb_(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    cfg = full_cfg(
        model_cfg,
        pretraining_task_cfg(normalize=large),
        {"_name": "wav2vec", "infonce": True, "loss_weights": [0.1, 0.0 if large else 10.0], "log_keys": []},
    )
    torch.save(checkpoint(cfg, None, model, "Wav2vecCriterion"), out / f"{name}.pt")
    x = fixed_input(seed + 2)
    with torch.no_grad():
        features = model.feature_extractor(x).transpose(1, 2)
        _, codes = model.quantize(x)
        context = model.extract_features(x, padding_mask=None, mask=False)["x"]
    tensors = {"input": x, "features": features, "codes": codes, "context": context}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))


def make_omegaconf_variant(out: Path) -> None:
    """``w2v2_base`` with its ``cfg`` stored as an OmegaConf ``DictConfig`` (as some hydra-era
    checkpoints hold), to test that path of the loader; its outputs are ``w2v2_base``'s."""
    state = torch.load(out / "w2v2_base.pt", weights_only=False)
    state["cfg"] = OmegaConf.create(state["cfg"])
    torch.save(state, out / "w2v2_base_omegaconf.pt")


class _FakeTask:
    def __init__(self, vocab_size: int) -> None:
        self.target_dictionary = list(range(vocab_size))


def make_ctc(name: str, out: Path, seed: int) -> None:
    from fairseq.models.wav2vec.wav2vec2_asr import Wav2Vec2CtcConfig, Wav2VecCtc
    from fairseq.tasks.audio_finetuning import AudioFinetuningConfig

    torch.manual_seed(seed)
    w2v_args = OmegaConf.create(
        full_cfg(w2v2_model_cfg(large=False), pretraining_task_cfg(normalize=False), {"_name": "wav2vec"})
    )
    ctc_cfg = OmegaConf.structured(
        Wav2Vec2CtcConfig(
            w2v_path="/nonexistent/pretrained.pt",
            normalize=False,
            data="/nonexistent",
            dropout=0.0,
            final_dropout=0.1,
            activation_dropout=0.1,
            attention_dropout=0.0,
            layerdrop=0.1,
            mask_prob=0.5,
            mask_channel_prob=0.1,
            mask_channel_length=8,
            feature_grad_mult=0.0,
            freeze_finetune_updates=100,
        )
    )
    OmegaConf.set_struct(ctc_cfg, False)
    ctc_cfg.w2v_args = w2v_args
    ctc_cfg._name = "wav2vec_ctc"
    vocab_size = 12
    model = Wav2VecCtc.build_model(ctc_cfg, _FakeTask(vocab_size))
    perturb_(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    task = OmegaConf.structured(AudioFinetuningConfig(data="/nonexistent", normalize=False, labels="ltr"))
    OmegaConf.set_struct(task, False)
    task._name = "audio_finetuning"
    cfg = full_cfg(ctc_cfg, task, {"_name": "ctc", "zero_infinity": True})
    torch.save(checkpoint(cfg, None, model, "CtcCriterion"), out / f"{name}.pt")
    x = fixed_input(seed + 2)
    with torch.no_grad():
        w2v = model.w2v_encoder.w2v_model
        features = w2v.feature_extractor(x).transpose(1, 2)
        context = w2v.extract_features(x, padding_mask=None, mask=False)["x"]
        logits = model.w2v_encoder(source=x, padding_mask=None)["encoder_out"].transpose(0, 1)
    tensors = {"input": x, "features": features, "context": context, "logits": logits}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))


def vq_namespace(kmeans: bool) -> argparse.Namespace:
    """The legacy ``args`` of a vq-wav2vec run: the training parser's namespace plus every
    ``Wav2VecConfig`` field (as argparse-era fairseq stored them)."""
    import dataclasses

    from fairseq import options
    from fairseq.models.wav2vec.wav2vec import Wav2VecConfig

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        input_args=[
            "/nonexistent",
            "--arch",
            "wav2vec",
            "--task",
            "audio_pretraining",
            "--criterion",
            "wav2vec",
        ],
    )
    for f in dataclasses.fields(Wav2VecConfig):
        if not f.name.startswith("_") and f.name != "infonce":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            setattr(args, f.name, default)
    overrides = {
        "conv_feature_layers": VQ_CONV,
        "conv_aggregator_layers": VQ_AGG,
        "activation": "gelu",
        "offset": "auto",
        "skip_connections_agg": True,
        "residual_scale": 0.5,
        "prediction_steps": 4,
        "num_negatives": 5,
        "cross_sample_negatives": 0,
        "vq_vars": 8,
        "vq_groups": 2,
        "infonce": False,
    }
    if kmeans:
        overrides.update(
            vq_type="kmeans",
            vq_gamma=0.25,
            log_compression=False,
            skip_connections_feat=False,
            combine_groups=False,
            agg_zero_pad=True,
            loss_weights="[1]",
        )
    else:
        overrides.update(
            vq_type="gumbel",
            vq_depth=2,
            combine_groups=True,
            vq_temp=(2.0, 0.5, 0.999995),
            log_compression=True,
            skip_connections_feat=True,
        )
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def make_vq(name: str, kmeans: bool, out: Path, seed: int) -> None:
    from fairseq.models.wav2vec.wav2vec import Wav2VecModel

    torch.manual_seed(seed)
    args = vq_namespace(kmeans)
    model = Wav2VecModel(args)
    perturb_(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    torch.save(checkpoint(None, args, model, "Wav2vecCriterion"), out / f"{name}.pt")
    x = fixed_input(seed + 2, samples=6400)
    # Record the negatives fairseq draws: the second torch.randint call of sample_negatives.
    draws: list[torch.Tensor] = []
    real_randint = torch.randint

    def recording_randint(*a, **kw):
        result = real_randint(*a, **kw)
        draws.append(result.clone())
        return result

    with torch.no_grad():
        features = model.feature_extractor(x)  # (B, C, T)
        q = model.vector_quantizer(features, produce_targets=True)
        context = model.feature_aggregator(q["x"])
        torch.randint = recording_randint
        try:
            net = model(x)
        finally:
            torch.randint = real_randint
    batch, _, frames = features.shape
    k = args.num_negatives
    # fairseq draws in [0, T - 1) for flat slot j = t * K + k and skips frame j // K, but then
    # reads the flat draws as (K, T): target frame t of copy k gets slot k * T + t (so a
    # distractor can be the target frame itself). Record exactly what each target got.
    raw = draws[-1].view(batch, frames * k)
    skipped = torch.arange(frames).repeat_interleave(k)[None, :]
    shifted = raw + (raw >= skipped).long()
    distractors = shifted.view(batch, k, frames).transpose(1, 2)  # (B, K, T) -> (B, T, K)
    logits = net["cpc_logits"].float()
    labels = net["cpc_targets"]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
    codes = q["targets"]
    tensors = {
        "input": x,
        "features": features.transpose(1, 2),
        "codes": codes.view(batch, frames, -1),
        "quantized": q["x"].transpose(1, 2),
        "context": context.transpose(1, 2),
        "distractors": distractors,
        "cpc_logits": logits,
        "loss": loss,
    }
    if kmeans:
        tensors["kmeans_loss"] = q["kmeans_loss"].detach()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))


EXPORT_SCRIPT = r"""
import sys, torch
from safetensors.torch import save_file
from speechvq.config import wav2vec2_tiny
from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.interop.fairseq import speechvq_to_fairseq
torch.manual_seed(int(sys.argv[3]))
import dataclasses
large = sys.argv[4] == "layer_norm"
cfg = wav2vec2_tiny()
cfg.encoder = dataclasses.replace(cfg.encoder, norm_mode=sys.argv[4], conv_bias=large)
cfg.context = dataclasses.replace(cfg.context, dim=48, layer_norm_first=large)
model = build_wav2vec2(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
torch.save(speechvq_to_fairseq(model), sys.argv[1])
x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    features, _ = model.feature_encoder(x)
    projected, normed = model.feature_projection(features)
    context = model.context(projected).last_hidden_state
    codes = model.quantizer(normed).codes
save_file({k: v.contiguous() for k, v in {"input": x, "features": features, "context": context, "codes": codes}.items()}, sys.argv[2])
"""


EXPORT_VQ_SCRIPT = r"""
import sys, torch
from safetensors.torch import save_file
from speechvq.config import QuantizerConfig, KMeansQuantizerConfig, VqWav2VecConfig
from speechvq.models.vq_wav2vec import build_vq_wav2vec
from speechvq.interop.fairseq import speechvq_to_fairseq
torch.manual_seed(int(sys.argv[3]))
kmeans = sys.argv[4] == "kmeans"
layers = ((32, 10, 5), (32, 8, 4), (32, 4, 2), (32, 4, 2), (32, 4, 2), (32, 1, 1), (32, 1, 1), (32, 1, 1))
cfg = VqWav2VecConfig(
    encoder_layers=layers, aggregator_layers=((24, 2, 1), (24, 3, 1), (24, 4, 1), (24, 5, 1)),
    quantizer_type="kmeans" if kmeans else "gumbel", prediction_steps=4, num_negatives=5,
    quantizer=QuantizerConfig(codebook_size=8, codevector_dim=32, weight_proj_depth=2, weight_proj_factor=2,
                              combine_groups=True),
    kmeans=KMeansQuantizerConfig(codebook_size=8, codevector_dim=32),
    log_compression=not kmeans, encoder_skip_connections=not kmeans, aggregator_zero_pad=kmeans,
)
model = build_vq_wav2vec(cfg).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
torch.save(speechvq_to_fairseq(model), sys.argv[1])
x = torch.randn(2, 6400, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    features, lengths, q = model.encode(x)
    context = model.aggregate(q.quantized, lengths)
tensors = {"input": x, "features": features, "codes": q.codes, "quantized": q.quantized, "context": context}
save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[2])
"""


def check_export(python: str, out: Path, seed: int) -> dict:
    """Export a random speechvq model with speechvq, load it with fairseq, compare outputs."""
    from fairseq import checkpoint_utils
    from safetensors.torch import load_file

    results = {}
    for mode in ("group_norm", "layer_norm"):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, ref = os.path.join(tmp, "exported.pt"), os.path.join(tmp, "speechvq.safetensors")
            subprocess.run([python, "-c", EXPORT_SCRIPT, ckpt, ref, str(seed), mode], check=True)
            models, _cfg, _ = checkpoint_utils.load_model_ensemble_and_task([ckpt])
            model = models[0].eval()
            expected = load_file(ref)
            x = expected["input"]
            with torch.no_grad():
                got = {
                    "features": model.feature_extractor(x).transpose(1, 2),
                    "context": model.extract_features(x, padding_mask=None, mask=False)["x"],
                    "codes": model.quantize(x)[1],
                }
            diffs = {k: float((got[k].float() - expected[k].float()).abs().max()) for k in got}
            results[mode] = {
                "loaded_by": "fairseq.checkpoint_utils.load_model_ensemble_and_task",
                "max_abs_diff": diffs,
            }
            logger.info("export check %s: %s", mode, diffs)
    for kind in ("vq_gumbel", "vq_kmeans"):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, ref = os.path.join(tmp, "exported.pt"), os.path.join(tmp, "speechvq.safetensors")
            quantizer = kind.removeprefix("vq_")
            subprocess.run([python, "-c", EXPORT_VQ_SCRIPT, ckpt, ref, str(seed), quantizer], check=True)
            models, _cfg, _ = checkpoint_utils.load_model_ensemble_and_task([ckpt])
            model = models[0].eval()
            expected = load_file(ref)
            x = expected["input"]
            with torch.no_grad():
                features = model.feature_extractor(x)
                q = model.vector_quantizer(features, produce_targets=True)
                got = {
                    "features": features.transpose(1, 2),
                    "codes": q["targets"].view(x.size(0), features.size(2), -1),
                    "quantized": q["x"].transpose(1, 2),
                    "context": model.feature_aggregator(q["x"]).transpose(1, 2),
                }
            diffs = {k: float((got[k].float() - expected[k].float()).abs().max()) for k in got}
            results[kind] = {
                "loaded_by": "fairseq.checkpoint_utils.load_model_ensemble_and_task",
                "max_abs_diff": diffs,
            }
            logger.info("export check %s: %s", kind, diffs)
    return results


def main() -> None:
    args = get_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import fairseq

    builders = {
        "w2v2_base": lambda p: make_w2v2("w2v2_base", False, p, args.seed),
        "w2v2_large": lambda p: make_w2v2("w2v2_large", True, p, args.seed + 10),
        "w2v2_ctc": lambda p: make_ctc("w2v2_ctc", p, args.seed + 20),
        "vq_gumbel": lambda p: make_vq("vq_gumbel", False, p, args.seed + 30),
        "vq_kmeans": lambda p: make_vq("vq_kmeans", True, p, args.seed + 40),
    }
    for name, build in builders.items():
        if (args.out / f"{name}.safetensors").exists() and not args.force:
            logger.info("%s exists, skipping", name)
            continue
        logger.info("building %s", name)
        build(args.out)
    if args.force or not (args.out / "w2v2_base_omegaconf.pt").exists():
        make_omegaconf_variant(args.out)
    meta = {
        "fairseq": getattr(fairseq, "__version__", "unknown"),
        "torch": torch.__version__,
        "seed": args.seed,
        "fixtures": sorted(builders),
    }
    if args.speechvq_python:
        meta["export_check"] = check_export(args.speechvq_python, args.out, args.seed + 50)
    elif (args.out / "manifest.json").exists():
        meta["export_check"] = json.loads((args.out / "manifest.json").read_text()).get("export_check")
    (args.out / "manifest.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
    sys.exit(0)
