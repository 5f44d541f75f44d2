"""The LibriSpeech pretraining, fine-tuning and units recipes: every stage dry-runs, and every
command it would run is accepted by that command's own argument parser."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from local_http import FIXTURES
from speechvq.cli import COMMANDS
from speechvq.data import read_labels, read_manifest

RECIPES = Path(__file__).parents[2] / "recipes" / "librispeech"


def _run(script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(RECIPES / script), *args], capture_output=True, text=True, env=env)


def _speechvq_commands(stderr: str) -> list[list[str]]:
    """The argument lists of every `speechvq ...` / `accelerate launch ... -m speechvq ...` line."""
    found = []
    for line in stderr.splitlines():
        if not line.startswith("+ "):
            continue
        words = shlex.split(line[2:])
        if words[0] == "speechvq":
            found.append(words[1:])
        elif "-m" in words and words[words.index("-m") + 1] == "speechvq":
            found.append(words[words.index("-m") + 2 :])
    return found


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("pretrain.sh", [], {"pretrain", "plot"}),
        (
            "pretrain.sh",
            ["--model", "large", "--num-processes", "8", "--num-machines", "2"],
            {"pretrain", "plot"},
        ),
        ("finetune_ctc.sh", ["--lm", "lm.arpa"], {"finetune-ctc", "transcribe"}),
        (
            "bert_units.sh",
            [],
            {"fit-kmeans", "export-units", "pretrain-unit-bert", "finetune-ctc", "transcribe"},
        ),
        (
            "bert_units.sh",
            ["--kind", "codes", "--joint", "true", "--model", "exp/pretrain_vq_wav2vec_gumbel/best_model"],
            {"export-units", "pretrain-unit-bert", "finetune-ctc", "transcribe"},
        ),
        ("pretrain.sh", ["--model", "vq_wav2vec_kmeans"], {"pretrain", "plot"}),
    ],
)
def test_every_stage_dry_runs_with_valid_commands(script, args, expected, tmp_path):
    done = _run(script, ["--dry-run", "true", "--exp-dir" if script != "finetune_ctc.sh" else "--exp-prefix",
                         str(tmp_path / "exp"), *args])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Stage 0:" in done.stderr and "Stage 1:" in done.stderr and "Stage 2:" in done.stderr
    commands = _speechvq_commands(done.stderr)
    assert {c[0] for c in commands} == expected
    for command in commands:
        parser = argparse.ArgumentParser(prog=f"speechvq {command[0]}", exit_on_error=False)
        importlib.import_module(COMMANDS[command[0]][0]).add_arguments(parser)
        parser.parse_args(command[1:])  # raises on an unknown or missing argument
    assert not (tmp_path / "exp").exists()  # a dry run writes nothing


def test_finetune_decoding_scores_every_subset_and_tunes_the_lm_on_the_validation_subset(tmp_path):
    done = _run("finetune_ctc.sh", ["--dry-run", "true", "--exp-prefix", str(tmp_path), "--budgets", "1h",
                                    "--lm", "lm.arpa", "--lexicon", "lexicon.txt"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    decodes = [c for c in _speechvq_commands(done.stderr) if c[0] == "transcribe"]
    # dev-other tuning, then greedy and LM for each of the two test subsets
    assert [c[2].rsplit("/", 1)[1] for c in decodes] == ["dev-other.tsv"] + ["test-clean.tsv"] * 2 + [
        "test-other.tsv"
    ] * 2
    for command in decodes:
        labels = command[command.index("--labels") + 1]
        assert labels == command[2].replace(".tsv", ".wrd")
    tune = decodes[0]
    assert "1,1.5,2,2.5" in tune and "--word-bonus=-1,0,1" in tune and "--lexicon" in tune
    assert "--lm" not in decodes[1] and "--lm" in decodes[2] and "--lexicon" in decodes[2]


def test_multi_node_launch_passes_the_rendezvous_to_accelerate(tmp_path):
    done = _run(
        "pretrain.sh",
        ["--dry-run", "true", "--exp-dir", str(tmp_path), "--num-processes", "16", "--num-machines", "2",
         "--machine-rank", "1", "--main-process-ip", "10.1.2.3"],
    )  # fmt: skip
    launch = next(line for line in done.stderr.splitlines() if line.startswith("+ accelerate launch"))
    for part in ("--multi_gpu", "--num_processes 16", "--num_machines 2", "--machine_rank 1", "10.1.2.3"):
        assert part in launch


def test_combine_manifests_and_wer_table(tmp_path):
    local = RECIPES / "local"
    sys.path.insert(0, str(local))
    try:
        from combine_manifests import combine
        from wer_table import table
    finally:
        sys.path.remove(str(local))
    from speechvq.data.librispeech import scan_split, write_split

    parts = []
    for name in ("a", "b"):
        split = tmp_path / "corpus" / name
        import shutil

        shutil.copytree(FIXTURES / "test-clean", split)
        utts, problems = scan_split(split)
        assert not problems
        write_split(split, tmp_path / "manifests", name, utts)
        parts.append(tmp_path / "manifests" / f"{name}.tsv")
    count = combine(parts, tmp_path / "manifests" / "all.tsv")
    merged = read_manifest(tmp_path / "manifests" / "all.tsv")
    assert count == len(merged.items) == 2 * len(read_manifest(parts[0]).items)
    assert all((merged.root / item.relpath).is_file() for item in merged.items)
    assert len(read_labels(tmp_path / "manifests" / "all.ltr")) == count

    decode = tmp_path / "exp" / "1h" / "decode_test-clean"
    decode.mkdir(parents=True)
    (decode / "greedy.wer").write_text("WER 12.34% (5/40: 1 sub, 2 del, 2 ins)  CER 3.00% (6/200)\n")
    text = table(tmp_path / "exp", ["1h"], ["test-clean"])
    assert "| 1h | 12.34 | - |" in text


def test_bert_units_compares_bert_features_with_the_raw_units_on_every_test_subset(tmp_path):
    done = _run("bert_units.sh", ["--dry-run", "true", "--exp-dir", str(tmp_path / "exp"), "--kind", "codes",
                                  "--joint", "true"])  # fmt: skip
    assert done.returncode == 0, done.stderr
    commands = _speechvq_commands(done.stderr)
    exports = [c for c in commands if c[0] == "export-units"]
    assert all("--joint" in c for c in exports)  # the paper's BERT input: one id per frame
    exported = {c[c.index("--out") + 1].rsplit("/", 1)[1] for c in exports}
    assert exported == {"train-clean-100", "dev-other", "test-clean", "test-other"}
    finetunes = [c for c in commands if c[0] == "finetune-ctc"]
    assert [("model.layer=0" in c) for c in finetunes] == [False, True]  # BERT features, then raw units
    decodes = [c for c in commands if c[0] == "transcribe"]
    assert [(c[1].rsplit("/", 2)[1], c[2].rsplit("/", 1)[1]) for c in decodes] == [
        (feats, subset) for feats in ("ctc_bert", "ctc_units") for subset in ("test-clean", "test-other")
    ]
    assert "--budgets ctc_bert ctc_units" in done.stderr  # the WER table's rows
    # the pretraining config of each vq-wav2vec model exists under the name pretrain.sh builds
    assert (RECIPES.parents[1] / "conf" / "pretrain_vq_wav2vec_gumbel.yaml").is_file()
