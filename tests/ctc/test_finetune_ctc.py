"""`speechvq finetune-ctc`: overfitting through the command, freezing through the loop, exact resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml
from ctc_toy import SAMPLE_RATE, TRANSCRIPTS, synthesize
from safetensors.torch import load_file

from speechvq.cli import main
from speechvq.config import wav2vec2_tiny
from speechvq.data.manifest import ManifestItem, write_manifest
from speechvq.io import save_pretrained
from speechvq.models.ctc import load_ctc_pretrained
from speechvq.models.wav2vec2 import build_wav2vec2
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import load_config
from speechvq.train.finetune import FinetuneConfig, finetune
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.ctc import CtcTask


def _ltr(text: str) -> str:
    return " ".join(" ".join(word) + " |" for word in text.split())


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tone corpus of ctc_toy as wav files + manifest + ``.ltr`` labels."""
    root = tmp_path_factory.mktemp("toy")
    items = []
    for i, text in enumerate(TRANSCRIPTS):
        wav = synthesize(text).numpy()
        sf.write(root / f"u{i}.wav", wav, SAMPLE_RATE)
        items.append(ManifestItem(relpath=f"u{i}.wav", num_samples=len(wav), line=0))
    write_manifest(root / "train.tsv", root, items)
    (root / "train.ltr").write_text("".join(_ltr(t) + "\n" for t in TRANSCRIPTS))
    return root / "train.tsv"


def _config(tmp_path: Path, **sections: dict) -> Path:
    data = {
        "model": {"preset": "tiny", "freeze_updates": 0, "dropout_p": 0.0, "attention_dropout_p": 0.0,
                  "activation_dropout_p": 0.0, "layer_drop_p": 0.0},
        "mask": {"mask_prob": 0.0, "channel_prob": 0.0},
        "data": {"labels": "ltr", "vocab": "letters", "max_tokens": 100000},
        "optim": {"lr": 3.0e-3, "eps": 1.0e-8, "weight_decay": 0.0, "clip_grad_norm": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 150, "log_interval": 10, "valid_interval": 50, "save_interval": 1000,
                  "keep_last": 1, "progress_bar": False, "tensorboard": False},
    }  # fmt: skip
    for name, values in sections.items():
        data[name].update(values)
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_finetune_ctc_command_overfits_a_few_utterances_to_zero_cer(
    toy_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "exp"
    argv = ["finetune-ctc", "--config", str(_config(tmp_path)), "--init", "none", "--train", str(toy_manifest),
            "--valid", str(toy_manifest), "--exp-dir", str(exp)]  # fmt: skip
    assert main(argv) == 0
    valid = [r for r in read_metrics(exp) if r["split"] == "valid"]
    assert valid[-1]["cer"] == 0.0 and valid[-1]["wer"] == 0.0
    assert ckpt.read_best(exp / "checkpoints")["valid_loss"] == 0.0  # the best WER
    capsys.readouterr()
    labels = toy_manifest.with_suffix(".ltr")
    assert main(["transcribe", str(exp / "best_model"), str(toy_manifest), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in TRANSCRIPTS)
    # its curves: the CTC panels, each with points from this run
    from speechvq.commands.plot import CTC_PANELS, panels_for

    records = read_metrics(exp)
    assert panels_for(records) is CTC_PANELS
    assert panels_for([r for r in records if r["split"] == "train"]) is CTC_PANELS  # before validating
    for _, series in CTC_PANELS:
        for split, key in series:
            assert any(r["split"] == split and r.get(key) is not None for r in records), key
    assert main(["plot", str(exp)]) == 0
    assert (exp / "curves.png").stat().st_size > 10_000


def test_finetune_trains_only_the_output_layer_during_the_first_updates(
    toy_manifest: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    pretrained = save_pretrained(build_wav2vec2(wav2vec2_tiny()), tmp_path / "w2v")
    body = load_file(str(pretrained / "model.safetensors"))
    cfg = load_config(
        _config(tmp_path, model={"freeze_updates": 3}, train={"max_steps": 5, "save_interval": 1}),
        [f"data.train={toy_manifest}"],
        FinetuneConfig,
    )
    finetune(cfg, str(pretrained), tmp_path / "exp")
    root = tmp_path / "exp" / "checkpoints"
    ckpt.rotate_checkpoints(root, 10)  # (keep_last=1 already removed all but step 5)
    step5 = load_file(str(root / "step_00000005" / "model.safetensors"))
    # rerun to step 3 only, from scratch in a fresh directory, and compare with the pretrained body
    finetune(cfg, str(pretrained), tmp_path / "exp3", stop_at_step=3)
    step3 = load_file(str(ckpt.latest_checkpoint(tmp_path / "exp3" / "checkpoints") / "model.safetensors"))
    shared = [k for k in step3 if k in body]
    assert shared and "lm_head.weight" not in body
    assert all(torch.equal(step3[k], body[k]) for k in shared)  # frozen body, frozen encoder
    changed = [k for k in shared if not torch.equal(step5[k], body[k])]
    assert changed and not any(k.startswith("feature_encoder.") for k in changed)  # body trains from 3 on
    assert not torch.equal(step3["lm_head.weight"], step5["lm_head.weight"])


def test_finetune_resumes_exactly_after_an_interruption(toy_manifest: Path, tmp_path: Path) -> None:
    # masks, LayerDrop and dropout on, batches of ~2 utterances crossing epochs, accumulation 2
    path = _config(
        tmp_path,
        model={"layer_drop_p": 0.2, "dropout_p": 0.1},
        mask={"mask_prob": 0.2, "mask_length": 2, "min_masks": 1, "channel_prob": 0.1, "channel_length": 4},
        data={"max_tokens": 12000},
        train={"max_steps": 4, "grad_accum": 2, "valid_interval": 1000},
        schedule={"name": "tri_stage"},
    )
    cfg = load_config(path, [f"data.train={toy_manifest}"], FinetuneConfig)
    finetune(cfg, None, tmp_path / "straight")
    finetune(cfg, None, tmp_path / "resumed", stop_at_step=2)
    finetune(cfg, None, tmp_path / "resumed", require_resume=True)
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "resumed" / "best_model" / "config.json").is_file()


@pytest.mark.parametrize("kind", ["speechvq", "experiment", "checkpoint", "hf", "fairseq"])
def test_finetune_init_reads_every_pretrained_format(tmp_path: Path, kind: str) -> None:
    from speechvq.interop.fairseq import save_fairseq_checkpoint
    from speechvq.interop.hf import save_hf
    from speechvq.train.config import ModelSection, PretrainConfig, dump_config
    from speechvq.train.init_model import load_init_model

    torch.manual_seed(0)
    model = build_wav2vec2(wav2vec2_tiny()).eval()
    if kind == "speechvq":
        spec = save_pretrained(model, tmp_path / "m")
    elif kind in ("experiment", "checkpoint"):
        yaml_text = dump_config(PretrainConfig(model=ModelSection(preset="tiny")))
        for step in (1, 2):
            ckpt.save_checkpoint(
                tmp_path / "exp" / "checkpoints", step, weights=model.state_dict() if step == 1 else {},
                state={}, config_yaml=yaml_text, valid_loss=1.0,
            )  # fmt: skip
        ckpt.write_best(tmp_path / "exp" / "checkpoints", 1, 1.0)  # the best one, not the broken newest
        spec = (
            tmp_path / "exp" if kind == "experiment" else tmp_path / "exp" / "checkpoints" / "step_00000001"
        )
    elif kind == "hf":
        spec = save_hf(model, tmp_path / "hf")
    else:
        linear = model.feature_projection.linear  # fairseq has no projection when the widths match
        with torch.no_grad():
            linear.weight.copy_(torch.eye(linear.weight.size(0)))
            linear.bias.zero_()
        spec = save_fairseq_checkpoint(model, tmp_path / "w2v.pt")
    loaded = load_init_model(str(spec))
    x = torch.randn(1, 4000)
    with torch.no_grad():
        expected = model.extract_features(x)[0][-1]
        got = loaded.eval().extract_features(x)[0][-1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.integration
def test_finetune_two_processes_match_one_process_with_accumulation(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    # 8 utterances of equal length, 2 per batch: both world sizes see the same batches. The frozen
    # body (first 2 updates), LayerDrop and masks exercise find_unused_parameters and the seeding.
    root = tmp_path / "audio"
    root.mkdir()
    items, lines = [], []
    for i in range(8):
        text = TRANSCRIPTS[i % len(TRANSCRIPTS)]
        wav = torch.zeros(12000)
        tone = synthesize(text)[:12000]
        wav[: len(tone)] = tone
        sf.write(root / f"u{i}.wav", wav.numpy(), SAMPLE_RATE)
        items.append(ManifestItem(relpath=f"u{i}.wav", num_samples=12000, line=0))
        lines.append(_ltr(text) + "\n")
    write_manifest(root / "train.tsv", root, items)
    (root / "train.ltr").write_text("".join(lines))
    sections = dict(
        model={"freeze_updates": 2, "layer_drop_p": 0.5, "dropout_p": 0.1},
        mask={"mask_prob": 0.2, "mask_length": 2, "min_masks": 1},
        data={"max_tokens": 24000},
        train={"max_steps": 4, "log_interval": 1, "cpu": True, "valid_interval": 1000},
    )
    single = load_config(_config(tmp_path, **sections), [f"data.train={root / 'train.tsv'}", "train.grad_accum=2"],
                         FinetuneConfig)  # fmt: skip
    finetune(single, None, tmp_path / "single")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "speechvq", "finetune-ctc", "--config", str(tmp_path / "ft.yaml"), "--init", "none",
           "--train", str(root / "train.tsv"), "--exp-dir", str(tmp_path / "ddp")]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(exp: Path) -> list[float]:
        return [r["loss"] for r in read_metrics(exp) if r["split"] == "train"]

    assert len(losses(tmp_path / "ddp")) == 4
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    wa = load_file(str(ckpt.latest_checkpoint(tmp_path / "single" / "checkpoints") / "model.safetensors"))
    wb = load_file(str(ckpt.latest_checkpoint(tmp_path / "ddp" / "checkpoints") / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-4, msg=key)


def test_finetune_from_scratch_with_the_log_mel_front_end(toy_manifest: Path, tmp_path: Path) -> None:
    # model.encoder_kind gives a from-scratch baseline the architecture of a log-mel pretrained model
    path = _config(tmp_path, model={"encoder_kind": "fbank"}, train={"max_steps": 2, "valid_interval": 1000})
    cfg = load_config(path, [f"data.train={toy_manifest}"], FinetuneConfig)
    finetune(cfg, None, tmp_path / "exp")
    model, _ = load_ctc_pretrained(tmp_path / "exp" / "best_model")
    assert model.cfg.encoder.kind == "fbank"
    assert sum(p.numel() for p in model.feature_encoder.parameters()) == 0


@pytest.mark.parametrize("metric", ["wer", "cer", "loss"])
def test_finetune_best_checkpoint_follows_data_best_metric(
    toy_manifest: Path, tmp_path: Path, metric: str
) -> None:
    cfg = load_config(
        _config(tmp_path), [f"data.train={toy_manifest}", f"data.best_metric={metric}"], FinetuneConfig
    )
    task = CtcTask(cfg, None, tmp_path / "exp")
    sums = {
        "loss": 30.0,
        "utterances": 3.0,
        "word_errors": 9.0,
        "words": 9.0,
        "char_errors": 5.0,
        "chars": 50.0,
    }
    record, score = task.eval_record(sums)
    assert record == {"loss": 10.0, "wer": 1.0, "cer": 0.1}
    assert score == record[metric]


def test_finetune_reinit_layers_is_checked_against_the_pretrained_model(
    toy_manifest: Path, tmp_path: Path
) -> None:
    from speechvq.errors import UserInputError

    torch.manual_seed(0)
    init = save_pretrained(build_wav2vec2(wav2vec2_tiny()), tmp_path / "pretrained")
    blocks = wav2vec2_tiny().context.num_layers
    cfg = load_config(
        _config(tmp_path, train={"max_steps": 2, "valid_interval": 1000}),
        [f"data.train={toy_manifest}", f"model.reinit_layers={blocks + 1}"],
        FinetuneConfig,
    )
    with pytest.raises(UserInputError, match=r"`model\.reinit_layers` must be at most"):
        finetune(cfg, str(init), tmp_path / "bad")
    cfg.model.reinit_layers = 1
    finetune(cfg, str(init), tmp_path / "exp")
    tuned = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())
    assert tuned["model"]["reinit_layers"] == 1


def test_finetune_random_weights_keeps_the_init_architecture_and_drops_its_weights(
    toy_manifest: Path, tmp_path: Path
) -> None:
    # the from-scratch baseline of a pretrained model: its sizes and front end, none of its weights
    torch.manual_seed(0)
    arch = wav2vec2_tiny()
    arch.context = dataclasses.replace(arch.context, num_layers=3, dim=48, ffn_dim=96)
    arch.encoder = dataclasses.replace(arch.encoder, kind="fbank")
    pretrained = build_wav2vec2(arch)
    init = save_pretrained(pretrained, tmp_path / "pretrained")
    overrides = [f"data.train={toy_manifest}", "model.random_weights=true", "model.freeze_updates=5"]
    cfg = load_config(
        _config(tmp_path, train={"max_steps": 1, "valid_interval": 1000}), overrides, FinetuneConfig
    )
    task = CtcTask(cfg, str(init), tmp_path / "exp")
    assert task.ctc_cfg.context == dataclasses.replace(
        arch.context, **{k: getattr(task.ctc_cfg.context, k) for k in ("dropout_p", "attention_dropout_p",
                                                                       "activation_dropout_p", "layer_drop_p")}
    )  # fmt: skip
    assert task.ctc_cfg.encoder.kind == "fbank" and task.ctc_cfg.freeze_updates == 0
    model = task.build_model()
    shared = pretrained.state_dict()
    tuned = model.state_dict()
    common = [
        k for k in tuned if k in shared and tuned[k].shape == shared[k].shape and tuned[k].is_floating_point()
    ]
    assert len(common) > 10  # the same tensors exist (same architecture) ...
    weights = [k for k in common if k.endswith("weight") and "norm" not in k]
    assert weights and all(not torch.equal(tuned[k], shared[k]) for k in weights)  # ... with fresh values


def test_finetune_augments_the_training_split_only(toy_manifest: Path, tmp_path: Path) -> None:
    overrides = [f"data.train={toy_manifest}", f"data.valid={toy_manifest}", "data.augment.speed_prob=1.0",
                 "data.augment.speed_factors=[1.1]", "data.augment.gain_prob=1.0"]  # fmt: skip
    cfg = load_config(
        _config(tmp_path, train={"max_steps": 2, "valid_interval": 2}), overrides, FinetuneConfig
    )
    task = CtcTask(cfg, None, tmp_path / "exp")
    train_ds = task.open_data(str(toy_manifest), train=True, num_replicas=1, rank=0)[0]
    valid_ds = task.open_data(str(toy_manifest), train=False, num_replicas=1, rank=0)[0]
    assert valid_ds.augment is None and train_ds.augment is not None
    # factor 1.1: the training items come out ~1/1.1 as long as the listed (and validation) ones
    assert abs(len(train_ds[0]["waveform"]) - valid_ds.sizes[0] / 1.1) <= 2
    assert len(valid_ds[0]["waveform"]) == valid_ds.sizes[0]
    assert finetune(cfg, None, tmp_path / "run").step == 2
