"""Hostile inputs through every command: each ends in one stderr line naming the file or field and the
problem with exit code 2, or in a counted skip (exit code 0 and a warning with the count); never a
traceback, never a hang (each case runs under a deadline), never exit 0 with a wrong result.

The cases are the hostile user's, not the project's own fixtures: values out of range, files of
the wrong kind (a directory, a FIFO, a file where a directory goes), damaged and truncated files,
absurd sizes that would make the program allocate without bound, inputs that make every item
unusable. ``test_reliability_bad_input.py`` holds the earlier matrix of damaged files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hostile_inputs import (
    Case,
    billion_laughs,
    deep_json,
    fairseq_pt,
    fifo,
    float_wav,
    gzip_bomb,
    huge_npy_header,
    make_hostile_workspace,
    manifest,
    md5,
    tar_gz,
    truncated_wav,
    units_dir,
    write,
)

from speechvq.cli import COMMANDS, main

DEADLINE_S = 60
"""Each case must end within this; a hang fails the test instead of blocking the suite."""


# -- command lines ---------------------------------------------------------------------------------------


def pt(w: Path, *sets: str, config: str = "pt.yaml") -> list[str]:
    argv = ["pretrain", "--config", str(w / config), "--exp-dir", str(w / "exp")]
    return argv + (["--set", *sets] if sets else [])


def ft(
    w: Path, *sets: str, init: str = "none", train: Path | None = None, valid: Path | None = None
) -> list[str]:
    argv = ["finetune-ctc", "--config", str(w / "ft.yaml"), "--init", init, "--train", str(train or w / "good.tsv"),
            "--exp-dir", str(w / "fexp")]  # fmt: skip
    if valid is not None:
        argv += ["--valid", str(valid)]
    return argv + (["--set", *sets] if sets else [])


def fu(w: Path, units: Path | None = None) -> list[str]:
    """finetune-ctc from the unit BERT of the workspace."""
    return ["finetune-ctc", "--config", str(w / "fu.yaml"), "--init", str(w / "uexp" / "best_model"),
            "--train", str(w / "good.tsv"), "--units", str(units or w / "units"), "--exp-dir", str(w / "fexp")]  # fmt: skip


def tr(w: Path, *audio: str | Path, opts: tuple[str, ...] = ()) -> list[str]:
    return ["transcribe", str(w / "ctc"), *(str(a) for a in audio or (w / "good.tsv",)), *opts]


def ef(
    w: Path, *opts: str, model: Path | None = None, data: Path | None = None, out: Path | None = None
) -> list[str]:
    argv = [
        "extract-features",
        str(model or w / "model"),
        str(data or w / "good.tsv"),
        "--out",
        str(out or w / "f"),
    ]
    return argv + (list(opts) if "--layers" in opts else ["--layers", "1", *opts])


def cv(src: Path, dst: Path, src_format: str = "speechvq", dst_format: str = "hf") -> list[str]:
    return ["convert", str(src), str(dst), "--from", src_format, "--to", dst_format]


def eu(w: Path, man: Path | None = None, *opts: str, km: bool = False) -> list[str]:
    argv = ["export-units", str(w / "model"), str(man or w / "good.tsv"), "--out", str(w / "out")]
    if km:
        return [*argv, "--kind", "kmeans", "--layer", "1", "--km", str(w / "km"), *opts]
    return [*argv, "--kind", "codes", *opts]


def km(w: Path, *opts: str) -> list[str]:
    return ["fit-kmeans", str(w / "model"), str(w / "good.tsv"), "--layer", "1", "--k", "2",
            "--out", str(w / "k"), *opts]  # fmt: skip


def uq(w: Path, *opts: str) -> list[str]:
    return ["unit-quality", str(w / "units"), str(w / "ali"), *opts]


def lm(w: Path, text: Path | None = None, *opts: str, out: Path | None = None) -> list[str]:
    return ["train-lm", str(text or w / "good.wrd"), "--out", str(out or w / "lm.arpa"), *opts]


def dl(w: Path, *opts: str) -> list[str]:
    return ["download-librispeech", "--subset", "dev-clean", "--out", str(w / "dl"), *opts]


def dl_archive(w: Path, make: object) -> list[str]:
    """download-librispeech of an archive already in --out (verified by its MD5, so nothing is fetched)."""
    archive = w / "dl" / "dev-clean.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    make(archive)  # type: ignore[operator]
    return dl(w, "--md5", md5(archive), "--mirror", "http://127.0.0.1:9/unused")


def ub(w: Path, *sets: str, units: Path | None = None) -> list[str]:
    argv = ["pretrain-unit-bert", "--config", str(w / "ub.yaml"), "--units", str(units or w / "units"),
            "--exp-dir", str(w / "uexp")]  # fmt: skip
    return argv + (["--set", *sets] if sets else [])


def config(w: Path, text: str | bytes) -> Path:
    return write(w / "c.yaml", text)


def ckpt_step(w: Path) -> Path:
    return w / "pexp" / "checkpoints" / "step_00000001"


def flip_byte(path: Path, offset: int = 0) -> Path:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def out_of_vocab_valid(w: Path) -> Path:
    write(w / "v.ltr", "H É L L O |\nW O R L D |\n")
    return manifest(w, "v.tsv", ("a0.wav", 8000), ("a1.wav", 8000))


# -- the cases -------------------------------------------------------------------------------------------

E, S = "error", "skip"

CASES: dict[str, Case] = {
    # pretrain: every config value checked at load, one line naming field, value and range
    "pretrain-lr-negative": Case(lambda w: pt(w, "optim.lr=-1"), ("`optim.lr`", "> 0", "-1.0")),
    "pretrain-lr-nan": Case(lambda w: pt(w, "optim.lr=.nan"), ("`optim.lr`", "finite", "nan")),
    "pretrain-lr-inf-string": Case(lambda w: pt(w, "optim.lr=inf"), ("`optim.lr`", "inf")),
    "pretrain-lr-zero": Case(lambda w: pt(w, "optim.lr=0"), ("`optim.lr`", "> 0", "0.0")),
    "pretrain-beta1-negative": Case(
        lambda w: pt(w, "optim.betas=[-0.1,0.9]"), ("`optim.betas[0]`", "[0, 1)")
    ),
    "pretrain-beta2-one": Case(
        lambda w: pt(w, "optim.betas=[0.9,1.0]"), ("`optim.betas[1]`", "[0, 1)", "1.0")
    ),
    "pretrain-eps-negative": Case(lambda w: pt(w, "optim.eps=-1e-8"), ("`optim.eps`", ">= 0")),
    "pretrain-weight-decay-negative": Case(
        lambda w: pt(w, "optim.weight_decay=-0.1"), ("`optim.weight_decay`",)
    ),
    "pretrain-clip-nan": Case(lambda w: pt(w, "optim.clip_grad_norm=.nan"), ("`optim.clip_grad_norm`",)),
    "pretrain-warmup-negative": Case(
        lambda w: pt(w, "schedule.warmup_steps=-5"), ("`schedule.warmup_steps`", ">= 0", "-5")
    ),
    "pretrain-power-zero": Case(lambda w: pt(w, "schedule.power=0"), ("`schedule.power`", "> 0")),
    "pretrain-phase-negative": Case(
        lambda w: pt(w, "schedule.phase_ratio=[1.2,-0.1,-0.1]"), ("`schedule.phase_ratio[0]`", "[0, 1]")
    ),
    "pretrain-end-lr-scale-two": Case(
        lambda w: pt(w, "schedule.end_lr_scale=2"), ("`schedule.end_lr_scale`",)
    ),
    "pretrain-seed-negative": Case(lambda w: pt(w, "train.seed=-1"), ("`train.seed`", "-1")),
    "pretrain-seed-beyond-int64": Case(lambda w: pt(w, f"train.seed={2**64}"), ("`train.seed`", str(2**64))),
    "pretrain-max-steps-zero": Case(lambda w: pt(w, "train.max_steps=0"), ("`train.max_steps`", ">= 1")),
    "pretrain-max-nonfinite-zero": Case(lambda w: pt(w, "train.max_nonfinite=0"), ("`train.max_nonfinite`",)),
    "pretrain-precision-unknown": Case(lambda w: pt(w, "train.precision=fp8"), ("train.precision", "fp8")),
    "pretrain-on-save-error-unknown": Case(
        lambda w: pt(w, "train.on_save_error=retry"), ("train.on_save_error", "retry")
    ),
    "pretrain-max-wall-negative": Case(lambda w: pt(w, "train.max_wall_s=-1"), ("`train.max_wall_s`",)),
    "pretrain-max-tokens-zero": Case(
        lambda w: pt(w, "data.max_tokens=0"), ("`data.max_tokens`", ">= 1", "0")
    ),
    "pretrain-max-sample-size-zero": Case(
        lambda w: pt(w, "data.max_sample_size=0"), ("`data.max_sample_size`",)
    ),
    "pretrain-min-above-max-sample-size": Case(
        lambda w: pt(w, "data.min_sample_size=5000", "data.max_sample_size=4000"),
        ("`data.min_sample_size`", "4000"),
    ),
    "pretrain-workers-negative": Case(lambda w: pt(w, "data.num_workers=-1"), ("`data.num_workers`", ">= 0")),
    "pretrain-sample-rate-zero": Case(lambda w: pt(w, "data.sample_rate=0"), ("`data.sample_rate`", "0")),
    "pretrain-diagnostics-window-zero": Case(
        lambda w: pt(w, "diagnostics.window=0"), ("`diagnostics.window`",)
    ),
    "pretrain-model-dropout-above-one": Case(
        lambda w: pt(w, "model.context.dropout_p=2"), ("`model.context.dropout_p`", "[0, 1]")
    ),
    "pretrain-model-billion-layers": Case(
        lambda w: pt(w, "model.context.num_layers=1000000000"), ("`model.context.num_layers`", "1000000000")
    ),
    "pretrain-max-sample-size-below-one-frame": Case(
        lambda w: pt(w, "data.max_sample_size=100", "data.min_sample_size=50"),
        ("`data.max_sample_size`", ">= 400"),
    ),
    "pretrain-model-logit-temp-zero": Case(
        lambda w: pt(w, "model.loss.logit_temp=0"), ("`model.loss.logit_temp`", "> 0")
    ),
    "pretrain-model-gumbel-temperature-zero": Case(
        lambda w: pt(w, "model.quantizer.temperature=[0,0,0]"),
        ("`model.quantizer.temperature`", "start >= end > 0"),
    ),
    "pretrain-model-zero-codebooks": Case(
        lambda w: pt(w, "model.quantizer.num_codebooks=0"), ("`model.quantizer.num_codebooks`",)
    ),
    "pretrain-set-python-tag": Case(
        lambda w: pt(w, "optim.lr=!!python/object/apply:os.system [touch pwned]"), ("--set optim.lr=", "tags")
    ),
    "pretrain-set-float-tag": Case(
        lambda w: pt(w, "optim.lr=!!float 1"), ("--set optim.lr=!!float 1", "tags")
    ),
    "pretrain-set-invalid-yaml": Case(
        lambda w: pt(w, "optim.betas=[0.9"), ("--set optim.betas=[0.9", "invalid YAML")
    ),
    "pretrain-set-unknown-section": Case(lambda w: pt(w, "trian.max_steps=1"), ("trian.max_steps",)),
    "pretrain-config-not-utf8": Case(
        lambda w: pt(w, config=config(w, b"model: {preset: tiny}\n# \xff\n").name), ("c.yaml:2:", "not UTF-8")
    ),
    "pretrain-config-is-directory": Case(lambda w: pt(w, config="units"), ("units", "directory")),
    "pretrain-config-is-fifo": Case(lambda w: pt(w, config=fifo(w / "c.yaml").name), ("c.yaml", "FIFO")),
    "pretrain-config-billion-laughs": Case(
        lambda w: pt(w, config=config(w, billion_laughs()).name), ("c.yaml", "expands to more than")
    ),
    "pretrain-config-too-large": Case(
        lambda w: pt(w, config=config(w, "# " + "x" * (17 << 20) + "\n").name), ("c.yaml", "at most")
    ),
    "pretrain-all-items-missing": Case(
        lambda w: pt(w, f"data.train={manifest(w, 'm.tsv', ('x.wav', 8000), ('y.wav', 8000))}"),
        ("m.tsv", "no item could be used", "missing: 2"),
    ),
    "pretrain-empty-manifest": Case(
        lambda w: pt(w, f"data.train={manifest(w, 'm.tsv')}"), ("m.tsv", "no usable")
    ),
    "pretrain-valid-all-missing": Case(
        lambda w: pt(w, f"data.valid={manifest(w, 'v.tsv', ('x.wav', 8000))}"),
        ("v.tsv", "no validation item could be used"),
    ),
    "pretrain-exp-dir-is-file": Case(
        lambda w: ["pretrain", "--config", str(w / "pt.yaml"), "--exp-dir", str(w / "good.wrd")],
        ("good.wrd", "file"),
    ),
    "pretrain-fifo-in-manifest": Case(
        lambda w: (
            pt(w, f"data.train={manifest(w, 'm.tsv', ('f.wav', 8000), ('a0.wav', 8000))}")
            if fifo(w / "f.wav")
            else []
        ),
        ("skipped", "unreadable: 1"),
        S,
    ),
    "pretrain-truncated-wav-in-manifest": Case(
        lambda w: (
            pt(w, f"data.train={manifest(w, 'm.tsv', ('t.wav', 8000), ('a0.wav', 8000))}")
            if truncated_wav(w)
            else []
        ),
        ("skipped", "corrupt: 1"),
        S,
    ),
    "pretrain-empty-best-json": Case(
        lambda w: pt(w, "train.max_steps=2") if write(w / "exp" / "checkpoints" / "best.json", "") else [],
        ("ignoring", "best.json"),
        S,
    ),
    # finetune-ctc
    "finetune-ctc-transcript-line-not-utf8": Case(
        lambda w: ft(w) if write(w / "good.ltr", b"H E L L O |\n\xff\xfe |\n") else [],
        ("good.tsv", "1 transcript line(s) are not UTF-8", "line 2"),
        S,
    ),
    "finetune-ctc-valid-all-missing": Case(
        lambda w: ft(w, valid=manifest(w, "v.tsv", ("x.wav", 8000))) if write(w / "v.ltr", "H I |\n") else [],
        ("v.tsv", "no validation item could be used", "missing: 1"),
    ),
    "finetune-ctc-valid-letters-outside-vocab": Case(
        lambda w: ft(w, valid=out_of_vocab_valid(w)),
        ("1 of 2 references", "outside the training vocabulary", "É"),
        S,
    ),
    "finetune-ctc-empty-train-manifest": Case(
        lambda w: ft(w, train=manifest(w, "e.tsv")) if write(w / "e.ltr", "") else [], ("e.tsv", "no usable")
    ),
    "finetune-ctc-labels-missing": Case(
        lambda w: ft(w, train=manifest(w, "n.tsv", ("a0.wav", 8000))), ("n.ltr", "does not exist")
    ),
    "finetune-ctc-mask-prob-negative": Case(lambda w: ft(w, "mask.mask_prob=-0.1"), ("`mask.mask_prob`",)),
    "finetune-ctc-channel-prob-above-one": Case(
        lambda w: ft(w, "mask.channel_prob=1.5"), ("`mask.channel_prob`", "[0, 1]")
    ),
    "finetune-ctc-final-dropout-above-one": Case(
        lambda w: ft(w, "model.final_dropout_p=1.5"), ("`model.final_dropout_p`",)
    ),
    "finetune-ctc-sentencepiece-size-zero": Case(
        lambda w: ft(w, "data.sentencepiece_vocab_size=0"), ("`data.sentencepiece_vocab_size`",)
    ),
    "finetune-ctc-init-checkpoint-config-damaged": Case(
        lambda w: ft(w, init=str(ckpt_step(w))) if flip_byte(ckpt_step(w) / "config.yaml") else [],
        ("step_00000001", "config.yaml does not match its sha256"),
    ),
    "finetune-ctc-init-checkpoint-weights-damaged": Case(
        lambda w: ft(w, init=str(w / "pexp")) if flip_byte(ckpt_step(w) / "model.safetensors", 100) else [],
        ("pexp", "none of the 1 checkpoints is intact"),
    ),
    "finetune-ctc-init-not-a-checkpoint": Case(
        lambda w: ft(w, init=str(write(w / "x.pt", b"not torch"))),
        ("x.pt", "not a readable torch checkpoint"),
    ),
    "finetune-ctc-unit-bert-units-of-another-manifest": Case(
        lambda w: fu(w) if units_dir(w, "1 2\n") and write(w / "units" / "utts.txt", "a0.wav\n") else [],
        ("units.txt", "has 1 lines", "2 items"),
    ),
    "finetune-ctc-unit-bert-config-list": Case(
        lambda w: fu(w) if write(w / "uexp" / "best_model" / "unit_bert.json", "[1]") else [],
        ("unit_bert.json", "JSON object"),
    ),
    "finetune-ctc-unit-bert-transcript-not-utf8": Case(
        lambda w: fu(w) if write(w / "good.ltr", b"H E L L O |\n\xff |\n") else [],
        ("units.txt", "1 of 2 utterance(s) skipped", "bad_transcript: 1"),
        S,
    ),
    # transcribe
    "transcribe-empty-manifest": Case(lambda w: tr(w, manifest(w, "e.tsv")), ("e.tsv", "lists no audio")),
    "transcribe-out-is-directory": Case(
        lambda w: tr(w, opts=("--out", str(w / "units"))), ("units", "--out", "directory")
    ),
    "transcribe-out-under-a-file": Case(
        lambda w: tr(w, opts=("--out", str(w / "good.wrd" / "h.wrd"))), ("good.wrd", "is a file")
    ),
    "transcribe-fifo-named-wav": Case(lambda w: tr(w, fifo(w / "f.wav")), ("f.wav", "FIFO")),
    "transcribe-truncated-wav": Case(lambda w: tr(w, truncated_wav(w)), ("t.wav", "truncated")),
    "transcribe-samples-1e30": Case(
        lambda w: tr(w, float_wav(w, "h.wav", 1e30)), ("h.wav", "out of range", "1e+30")
    ),
    "transcribe-samples-nan": Case(lambda w: tr(w, float_wav(w, "n.wav", math.nan)), ("n.wav", "NaN")),
    "transcribe-audio-is-directory": Case(lambda w: tr(w, w / "units"), ("units", "directory")),
    "transcribe-one-of-two-missing": Case(
        lambda w: tr(w, manifest(w, "m.tsv", ("a0.wav", 8000), ("gone.wav", 8000))),
        ("1 of 2 inputs skipped", "missing: 1"),
        S,
    ),
    "transcribe-manifest-length-absurd": Case(
        lambda w: tr(w, manifest(w, "m.tsv", ("a0.wav", 99999999999999))), ("a0.wav", "99999999999999")
    ),
    "transcribe-device-unknown": Case(lambda w: tr(w, opts=("--device", "gpu7")), ("--device", "gpu7")),
    "transcribe-lm-weight-nan": Case(lambda w: tr(w, opts=("--lm-weight", "nan")), ("--lm-weight", "nan")),
    "transcribe-word-bonus-inf": Case(
        lambda w: tr(w, opts=("--word-bonus", "0,inf")), ("--word-bonus", "inf")
    ),
    "transcribe-beam-zero": Case(lambda w: tr(w, opts=("--beam", "0")), ("--beam", ">= 1")),
    "transcribe-model-config-list": Case(
        lambda w: tr(w) if write(w / "ctc" / "config.json", "[1, 2]") else [],
        ("config.json", "JSON object", "list"),
    ),
    "transcribe-model-config-not-utf8": Case(
        lambda w: tr(w) if write(w / "ctc" / "config.json", b'{"a": "\xff"}') else [],
        ("config.json:1:", "not UTF-8"),
    ),
    "transcribe-model-config-nested-deep": Case(
        lambda w: tr(w) if write(w / "ctc" / "config.json", deep_json(100_000)) else [],
        ("config.json", "nested too deeply"),
    ),
    "transcribe-labels-fifo": Case(
        lambda w: tr(w, opts=("--labels", str(fifo(w / "l.wrd")))), ("l.wrd", "FIFO")
    ),
    "transcribe-lexicon-not-utf8": Case(
        lambda w: tr(w, opts=("--lexicon", str(write(w / "lex.txt", b"HELLO\n\xff\n")))),
        ("lex.txt:2:", "UTF-8"),
    ),
    "transcribe-lm-not-arpa": Case(
        lambda w: tr(w, opts=("--lm", str(write(w / "x.arpa", "hello\n")))), ("x.arpa", "ARPA")
    ),
    # extract-features
    "extract-features-layer-unknown": Case(lambda w: ef(w, "--layers", "top"), ("--layer", "top")),
    "extract-features-layer-too-deep": Case(lambda w: ef(w, "--layers", "9"), ("--layer", "9")),
    "extract-features-out-is-a-file": Case(
        lambda w: ef(w, out=write(w / "o.txt", "x")), ("o.txt", "--out must be a directory")
    ),
    "extract-features-empty-manifest": Case(
        lambda w: ef(w, data=manifest(w, "e.tsv")), ("e.tsv", "lists no audio")
    ),
    "extract-features-chunk-negative": Case(lambda w: ef(w, "--chunk-s", "-1"), ("--chunk-s", "-1")),
    "extract-features-device-unknown": Case(lambda w: ef(w, "--device", "gpu7"), ("--device", "gpu7")),
    "extract-features-model-missing": Case(
        lambda w: ef(w, model=w / "no_model"), ("no_model", "not a speechvq model")
    ),
    # import
    "import-kaldi-no-wav-scp": Case(
        lambda w: [
            "import",
            "kaldi",
            str(write(w / "kd" / "text", "u1 HELLO\n").parent),
            "--out",
            str(w / "o"),
        ],
        ("wav.scp",),
    ),
    "import-kaldi-piped-command": Case(
        lambda w: (
            [
                "import",
                "kaldi",
                str(write(w / "kd" / "wav.scp", "u1 sox a0.wav -t wav - |\n").parent),
                "--out",
                str(w / "o"),
            ]
            if write(w / "kd" / "text", "u1 HELLO\n")
            else []
        ),
        ("wav.scp:1", "command"),
    ),
    "import-commonvoice-missing-column": Case(
        lambda w: [
            "import",
            "commonvoice",
            str(write(w / "cv.tsv", "client_id\tsentence\nc1\tHI\n")),
            "--out",
            str(w / "o"),
        ],
        ("cv.tsv", "path"),
    ),
    "import-ljspeech-not-utf8": Case(
        lambda w: [
            "import",
            "ljspeech",
            str(write(w / "lj" / "metadata.csv", b"a0|\xff\xfe|x\n")),
            "--out",
            str(w / "o"),
        ],
        ("metadata.csv", "UTF-8"),
    ),
    "import-lhotse-invalid-json": Case(
        lambda w: ["import", "lhotse", str(write(w / "recordings.jsonl", "{oops\n")), "--out", str(w / "o")],
        ("recordings.jsonl", "JSON"),
    ),
    "import-source-missing": Case(
        lambda w: ["import", "speechbrain", str(w / "nope.csv"), "--out", str(w / "o")], ("nope.csv",)
    ),
    # convert
    "convert-config-json-invalid": Case(
        lambda w: cv(w / "ctc", w / "o") if write(w / "ctc" / "config.json", "{oops") else [],
        ("config.json:1:", "invalid JSON"),
    ),
    "convert-config-json-list": Case(
        lambda w: cv(w / "model", w / "o") if write(w / "model" / "config.json", "[]") else [],
        ("config.json", "JSON object"),
    ),
    "convert-hf-config-json-list": Case(
        lambda w: (
            cv(w / "model", w / "o", "hf", "speechvq") if write(w / "model" / "config.json", "[1]") else []
        ),
        ("config.json", "JSON object"),
    ),
    "convert-weights-wrong-shape": Case(
        lambda w: (
            cv(w / "model", w / "o")
            if shutil.copy(w / "ctc" / "model.safetensors", w / "model" / "model.safetensors")
            else []
        ),
        ("model.safetensors", "do not match"),
    ),
    "convert-weights-not-safetensors": Case(
        lambda w: cv(w / "model", w / "o") if write(w / "model" / "model.safetensors", b"\xff" * 64) else [],
        ("model.safetensors", "not a readable safetensors file"),
    ),
    "convert-hf-of-a-speechvq-directory": Case(
        lambda w: cv(w / "model", w / "o", "hf", "speechvq"),
        ("model", "not a transformers wav2vec 2.0 checkpoint"),
    ),
    "convert-destination-is-a-file": Case(
        lambda w: cv(w / "model", w / "good.wrd"), ("good.wrd", "must be a directory")
    ),
    "convert-destination-under-a-file": Case(
        lambda w: cv(w / "model", w / "good.wrd" / "x"), ("good.wrd", "is a file")
    ),
    "convert-fairseq-destination-is-a-directory": Case(
        lambda w: cv(w / "model", w / "units", "speechvq", "fairseq"), ("units", "must be a file")
    ),
    "convert-fairseq-conv-layers-times-1e8": Case(
        lambda w: cv(
            fairseq_pt(w, {"conv_feature_layers": "[(512, 10, 5)] * 100000000"}),
            w / "o",
            "fairseq",
            "speechvq",
        ),
        ("fs.pt", "conv_feature_layers", "100000000"),
    ),
    "convert-fairseq-conv-layers-nested-products": Case(
        lambda w: cv(
            fairseq_pt(w, {"conv_feature_layers": "[(512, 10, 5)] * 1000 * 1000"}),
            w / "o",
            "fairseq",
            "speechvq",
        ),
        ("fs.pt", "conv_feature_layers", "256"),
    ),
    "convert-fairseq-conv-layers-power": Case(
        lambda w: cv(
            fairseq_pt(w, {"conv_feature_layers": "[(512, 10, 5)] * 10**9"}), w / "o", "fairseq", "speechvq"
        ),
        ("fs.pt", "conv_feature_layers", "unsupported"),
    ),
    "convert-fairseq-billion-encoder-layers": Case(
        lambda w: cv(fairseq_pt(w, {"encoder_layers": 10**9}), w / "o", "fairseq", "speechvq"),
        ("fs.pt", "`num_layers`"),
    ),
    "convert-fairseq-checkpoint-fifo": Case(
        lambda w: cv(fifo(w / "f.pt"), w / "o", "fairseq", "speechvq"), ("f.pt", "FIFO")
    ),
    # export-units
    "export-units-out-is-a-file": Case(
        lambda w: [*eu(w), "--out", str(w / "good.wrd")], ("good.wrd", "--out")
    ),
    "export-units-empty-manifest": Case(lambda w: eu(w, manifest(w, "e.tsv")), ("e.tsv", "lists no audio")),
    "export-units-all-items-missing": Case(
        lambda w: eu(w, manifest(w, "m.tsv", ("x.wav", 8000))), ("m.tsv", "none of its 1 items", "missing: 1")
    ),
    "export-units-max-tokens-zero": Case(
        lambda w: eu(w, None, "--max-tokens", "0"), ("--max-tokens", ">= 1")
    ),
    "export-units-shard-size-zero": Case(
        lambda w: eu(w, None, "--shard-size", "0"), ("--shard-size", ">= 1")
    ),
    "export-units-device-unknown": Case(lambda w: eu(w, None, "--device", "tpu"), ("--device", "tpu")),
    "export-units-centroids-claim-huge-shape": Case(
        lambda w: eu(w, km=True) if huge_npy_header(w / "km" / "centroids.npy", (10**12, 8)) else [],
        ("centroids.npy", "mmap length is greater than file size"),
    ),
    "export-units-kmeans-k-negative": Case(
        lambda w: (
            eu(w, km=True)
            if write(w / "km" / "kmeans.json", '{"format": "speechvq-kmeans", "k": -4, "dim": 8}')
            else []
        ),
        ("kmeans.json", "`k`", "-4"),
    ),
    "export-units-one-item-missing": Case(
        lambda w: eu(w, manifest(w, "m.tsv", ("a0.wav", 8000), ("gone.wav", 8000))),
        ("gone.wav", "does not exist"),
        S,
    ),
    # fit-kmeans
    "fit-kmeans-shard-size-zero": Case(lambda w: km(w, "--shard-size", "0"), ("--shard-size", ">= 1")),
    "fit-kmeans-batch-size-zero": Case(lambda w: km(w, "--batch-size", "0"), ("--batch-size", ">= 1")),
    "fit-kmeans-n-init-zero": Case(lambda w: km(w, "--n-init", "0"), ("--n-init", ">= 1")),
    "fit-kmeans-max-iter-zero": Case(lambda w: km(w, "--max-iter", "0"), ("--max-iter", ">= 1")),
    "fit-kmeans-percent-nan": Case(lambda w: km(w, "--percent", "nan"), ("--percent", "nan")),
    "fit-kmeans-out-is-a-file": Case(lambda w: [*km(w), "--out", str(w / "good.wrd")], ("good.wrd", "--out")),
    "fit-kmeans-features-dir-is-a-file": Case(
        lambda w: km(w, "--features-dir", str(w / "good.wrd")), ("good.wrd",)
    ),
    # unit-quality
    "unit-quality-json-is-a-directory": Case(
        lambda w: uq(w, "--json", str(w / "ali")), ("ali", "--json", "directory")
    ),
    "unit-quality-frame-stride-zero": Case(lambda w: uq(w, "--frame-stride", "0"), ("--frame-stride", "> 0")),
    "unit-quality-frame-stride-nan": Case(
        lambda w: uq(w, "--frame-stride", "nan"), ("--frame-stride", "nan")
    ),
    "unit-quality-alignment-not-utf8": Case(
        lambda w: uq(w) if write(w / "ali" / "a0.phones", b"0 0.03 \xff\n") else [], ("a0.phones:1:", "UTF-8")
    ),
    "unit-quality-alignment-nan-times": Case(
        lambda w: uq(w) if write(w / "ali" / "a0.phones", "nan nan A\n") else [], ("a0.phones:1:", "finite")
    ),
    "unit-quality-durations-of-1e12-frames": Case(
        lambda w: (
            uq(w)
            if units_dir(w, "1 2\n3 0\n", {"frame_stride_s": 0.02, "dedup": True}, "1 999999999999\n1 1\n")
            else []
        ),
        ("durations.txt:1:", "at most"),
    ),
    "unit-quality-units-not-utf8": Case(
        lambda w: uq(w) if units_dir(w, b"1 \xff\n3 0\n") else [], ("units.txt:1:", "UTF-8")
    ),
    "unit-quality-meta-json-list": Case(
        lambda w: uq(w) if write(w / "units" / "meta.json", "[]") else [], ("meta.json", "JSON object")
    ),
    # train-lm
    "train-lm-out-is-a-directory": Case(lambda w: lm(w, out=w / "units"), ("units", "--out", "directory")),
    "train-lm-text-is-fifo": Case(lambda w: lm(w, fifo(w / "t.txt")), ("t.txt", "FIFO")),
    "train-lm-order-huge": Case(lambda w: lm(w, None, "--order", "1000"), ("--order", "1000")),
    "train-lm-text-without-sentences": Case(
        lambda w: lm(w, write(w / "t.txt", "\n  \n")), ("t.txt", "no sentence")
    ),
    # manifest
    "manifest-out-is-a-file": Case(
        lambda w: ["manifest", str(w), "--ext", "wav", "--out", str(w / "good.wrd")], ("good.wrd", "--out")
    ),
    "manifest-ext-empty": Case(
        lambda w: ["manifest", str(w), "--ext", "", "--out", str(w / "o")], ("--ext",)
    ),
    "manifest-valid-percent-nan": Case(
        lambda w: ["manifest", str(w), "--valid-percent", "nan", "--out", str(w / "o")],
        ("--valid-percent", "nan"),
    ),
    # prepare-librispeech
    "prepare-librispeech-out-is-a-file": Case(
        lambda w: ["prepare-librispeech", str(w / "L"), "--out", str(w / "good.wrd")], ("good.wrd", "--out")
    ),
    "prepare-librispeech-transcript-not-utf8": Case(
        lambda w: (
            ["prepare-librispeech", str(w / "L"), "--out", str(w / "o")]
            if write(w / "L" / "train" / "1" / "2" / "1-2.trans.txt", b"1-2-0 H\xffI\n")
            else []
        ),
        ("1-2.trans.txt:1:", "not UTF-8"),
        S,
    ),
    "prepare-librispeech-split-not-found": Case(
        lambda w: ["prepare-librispeech", str(w / "L"), "--out", str(w / "o"), "--splits", "dev-other"],
        ("dev-other", "not found"),
    ),
    # download-librispeech (archives already in --out: nothing is fetched)
    "download-librispeech-out-is-a-file": Case(
        lambda w: ["download-librispeech", "--subset", "dev-clean", "--out", str(w / "good.wrd")],
        ("good.wrd", "--out"),
    ),
    "download-librispeech-checksums-not-utf8": Case(
        lambda w: dl(w, "--checksums", str(write(w / "md5.txt", b"\xff\xfe"))), ("md5.txt:1:", "UTF-8")
    ),
    "download-librispeech-checksums-is-a-directory": Case(
        lambda w: dl(w, "--checksums", str(w / "units")), ("units", "directory")
    ),
    "download-librispeech-checksums-malformed": Case(
        lambda w: dl(w, "--checksums", str(write(w / "md5.txt", "abc dev-clean.tar.gz\n"))),
        ("md5.txt:1:", "<md5>"),
    ),
    "download-librispeech-subset-unknown": Case(
        lambda w: ["download-librispeech", "--subset", "train-clean-9000", "--out", str(w / "dl")],
        ("--subset", "train-clean-9000"),
    ),
    "download-librispeech-archive-bomb": Case(
        lambda w: dl_archive(w, lambda a: gzip_bomb(a, 64 << 20)), ("dev-clean.tar.gz", "times its size")
    ),
    "download-librispeech-archive-overwrites-itself": Case(
        lambda w: dl_archive(w, lambda a: tar_gz(a, {"dev-clean.tar.gz": b"gotcha"})),
        ("would overwrite the archive being read",),
    ),
    "download-librispeech-archive-not-a-tar": Case(
        lambda w: dl_archive(w, lambda a: write(a, b"plain bytes, not a tar archive")),
        ("dev-clean.tar.gz", "not a readable tar"),
    ),
    "download-librispeech-archive-escapes-target": Case(
        lambda w: dl_archive(w, lambda a: tar_gz(a, {"../../escaped.txt": b"x"})), ("escaped.txt", "'..'")
    ),
    # validate
    "validate-vocab-not-utf8": Case(
        lambda w: ["validate", str(w / "good.tsv"), "--vocab", str(write(w / "d.txt", b"A 1\n\xff 2\n"))],
        ("d.txt:2:", "UTF-8"),
    ),
    "validate-vocab-is-a-directory": Case(
        lambda w: ["validate", str(w / "good.tsv"), "--vocab", str(w / "units")], ("units", "directory")
    ),
    "validate-raw-format-malformed": Case(
        lambda w: ["validate", str(w / "good.tsv"), "--raw-format", "x:y"], ("--raw-format", "x:y")
    ),
    "validate-manifest-is-fifo": Case(lambda w: ["validate", str(fifo(w / "f.tsv"))], ("f.tsv", "FIFO")),
    # plot
    "plot-experiment-missing": Case(lambda w: ["plot", str(w / "nope")], ("nope", "metrics.jsonl")),
    "plot-metrics-line-torn": Case(
        lambda w: (
            ["plot", str(w / "pexp")]
            if (w / "pexp" / "metrics.jsonl").open("a").write('{"split": "tr')
            else []
        ),
        ("metrics.jsonl", "skipped 1 line"),
        S,
    ),
    "plot-codebook-usage-damaged": Case(
        lambda w: ["plot", str(w / "pexp")] if write(w / "pexp" / "codebook_usage.json", "[1") else [],
        ("codebook_usage.json", "left out"),
        S,
    ),
    "plot-out-is-a-directory": Case(
        lambda w: ["plot", str(w / "pexp"), "--out", str(w / "units")], ("units", "--out")
    ),
    "plot-metrics-is-a-directory": Case(
        lambda w: ["plot", str(w / "e")] if (w / "e" / "metrics.jsonl").mkdir(parents=True) is None else [],
        ("metrics.jsonl", "directory"),
    ),
    # synth-corpus
    "synth-corpus-out-is-a-file": Case(
        lambda w: ["synth-corpus", "--out", str(w / "good.wrd")], ("good.wrd", "--out")
    ),
    "synth-corpus-hours-nan": Case(
        lambda w: ["synth-corpus", "--out", str(w / "s"), "--hours", "nan"], ("--hours", "nan")
    ),
    "synth-corpus-out-not-empty": Case(
        lambda w: ["synth-corpus", "--out", str(w / "units")], ("units", "not empty")
    ),
    # pretrain-unit-bert
    "pretrain-unit-bert-units-not-utf8": Case(
        lambda w: ub(w) if units_dir(w, b"1 2\n\xff 3\n") else [], ("units.txt:2:", "UTF-8")
    ),
    "pretrain-unit-bert-units-missing": Case(
        lambda w: ub(w, units=w / "nothere"), ("nothere", "does not exist")
    ),
    "pretrain-unit-bert-lr-negative": Case(lambda w: ub(w, "optim.lr=-1"), ("`optim.lr`", "> 0")),
    "pretrain-unit-bert-max-tokens-below-positions": Case(
        lambda w: ub(w, "data.max_tokens=8"), ("`data.max_tokens`", "max_positions")
    ),
    "pretrain-unit-bert-workers-negative": Case(
        lambda w: ub(w, "data.num_workers=-2"), ("`data.num_workers`",)
    ),
    # the command line itself
    "cli-unknown-command": Case(lambda w: ["transcribee", "x"], ("invalid choice", "transcribee")),
    "cli-option-not-an-integer": Case(
        lambda w: tr(w, opts=("--batch-size", "many")), ("--batch-size", "many")
    ),
}


# -- running them ----------------------------------------------------------------------------------------


class Hang(BaseException):
    """A case ran past its deadline (a BaseException: code that skips bad items must not swallow it)."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hostile_workspace(tmp_path_factory.mktemp("hostile") / "w")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def command_of(name: str) -> str | None:
    """The command a case runs: its name starts with it (``cli-`` cases test the parser itself)."""
    found = [c for c in COMMANDS if name.startswith(c + "-")]
    return max(found, key=len) if found else None


def test_the_suite_covers_every_command_with_at_least_80_distinct_inputs() -> None:
    assert len(CASES) >= 80
    assert {command_of(name) for name in CASES} == {*COMMANDS, None}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_ends_in_one_line_or_a_counted_skip(
    name: str,
    pristine: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = CASES[name]
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    monkeypatch.chdir(w)  # nothing a case runs may write outside it (e.g. a python/object tag's file)
    argv = case.argv(w)
    assert argv and argv[0] == (command_of(name) or argv[0]), (
        "the case runs another command than its name says"
    )
    capsys.readouterr()
    with caplog.at_level(logging.WARNING), deadline(DEADLINE_S):
        rc = main(["--log-level", "WARNING", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert not (w / "pwned").exists()
    if case.outcome == "error":
        assert rc == 2, f"exit code {rc}, stderr:\n{err}"
        assert len(lines) == 1, f"stderr is not one line:\n{err}"
        assert lines[0].startswith(f"speechvq {command_of(name) or ''}".rstrip()), lines[0]
        for part in case.expect:
            assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    else:
        assert rc == 0, f"exit code {rc}, stderr:\n{err}"
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(all(part in message for part in case.expect) for message in warnings), (
            f"no warning holds {case.expect}; warnings: {warnings}"
        )


def test_a_fifo_named_wav_never_blocks_a_real_process(tmp_path: Path) -> None:
    """In a separate process (an in-process alarm could hide a blocked open): transcribe and validate
    of a FIFO return at once with one line."""
    from bad_inputs import make_workspace

    w = make_workspace(tmp_path / "w")
    fifo(w / "f.wav")
    manifest(w, "m.tsv", ("f.wav", 8000))
    for argv in (["transcribe", str(w / "ctc"), str(w / "f.wav")], ["export-units", str(w / "model"), str(w / "m.tsv"),
                 "--kind", "codes", "--out", str(w / "o")]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "speechvq", "--log-level", "ERROR", *argv],
            capture_output=True, text=True, timeout=120, env={**_env(), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "f.wav" in done.stderr, done.stderr


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_skipped_items_are_counted_at_every_epoch_end_and_in_the_run_summary(
    pristine: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = tmp_path / "w"
    shutil.copytree(pristine, w, symlinks=True)
    train = manifest(w, "m.tsv", ("a0.wav", 8000), ("gone.wav", 8000), ("a1.wav", 8000))
    with caplog.at_level(logging.WARNING), deadline(DEADLINE_S):
        assert main(pt(w, f"data.train={train}", "train.max_steps=3")) == 0  # one batch = one epoch
    messages = [r.getMessage() for r in caplog.records]
    assert sum("gone.wav: file does not exist" in m for m in messages) == 1  # each bad item once
    for epoch in (0, 1):
        assert any(
            f"m.tsv: epoch {epoch} done: 1 of 3 items skipped so far (missing: 1)" in m for m in messages
        )
    assert any("run summary: 1 training item(s) skipped (missing: 1)" in m for m in messages), messages
