"""Checkpoint integrity: checksums, partial and corrupt checkpoints, leftovers, a full disk, malicious pickles."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from faults import make_corpus

from speechvq.cli import main
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import config_from_dict
from speechvq.train.tasks.pretrain import pretrain


def _save(root: Path, step: int) -> Path:
    return ckpt.save_checkpoint(
        root,
        step,
        weights={"w": torch.full((4,), float(step))},
        state={"step": step},
        config_yaml="train: {}\n",
    )


def _rehash(path: Path) -> None:
    """Make meta.json's checksums match the (tampered) files, as an attacker could."""
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"] = {n: ckpt.sha256_file(path / n) for n in meta["sha256"]}
    (path / "meta.json").write_text(json.dumps(meta))


def test_meta_json_holds_the_sha256_of_every_file(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    assert sorted(meta["sha256"]) == ["config.yaml", "model.safetensors", "state.pt"]
    for name, digest in meta["sha256"].items():
        assert ckpt.sha256_file(path / name) == digest
    assert ckpt.verify_checkpoint(path) is None


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "delete-state", "delete-meta", "bad-meta"])
def test_latest_checkpoint_skips_a_damaged_newest_checkpoint_with_a_warning_naming_it(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / "model.safetensors"
    if damage == "flip-byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:10])
    elif damage == "delete-state":
        (newest / "state.pt").unlink()
    elif damage == "delete-meta":
        (newest / "meta.json").unlink()
    else:
        (newest / "meta.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="speechvq.train.checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    assert any("step_00000002" in r.getMessage() for r in caplog.records)
    with pytest.raises(ckpt.CorruptCheckpointError, match="step_00000002"):
        ckpt.load_checkpoint(newest)


def test_latest_checkpoint_refuses_when_no_checkpoint_is_intact(tmp_path: Path) -> None:
    (_save(tmp_path, 1) / "state.pt").unlink()
    with pytest.raises(ckpt.CorruptCheckpointError, match="none of the 1 checkpoints is intact"):
        ckpt.latest_checkpoint(tmp_path)


def test_checkpoints_without_checksums_still_load_when_complete(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    (path / "meta.json").write_text(json.dumps({"step": 1, "valid_loss": None}))
    assert ckpt.latest_checkpoint(tmp_path) == path
    assert torch.equal(ckpt.load_checkpoint(path)[0]["w"], torch.full((4,), 1.0))


def test_the_next_save_removes_what_a_killed_writer_left_and_restores_a_replaced_checkpoint(
    tmp_path: Path,
) -> None:
    _save(tmp_path, 1)
    step2 = _save(tmp_path, 2)
    (tmp_path / ".tmp_step_00000003_123").mkdir()  # killed while writing step 3
    (tmp_path / ".tmp_step_00000003_123" / "model.safetensors").write_bytes(b"partial")
    os.replace(step2, tmp_path / ".old_step_00000002_124")  # killed while replacing step 2
    (tmp_path / ".del_step_00000000_125").mkdir()  # killed while rotating step 0 away
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001"
    _save(tmp_path, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002", "step_00000004"]
    assert ckpt.verify_checkpoint(tmp_path / "step_00000002") is None


def test_rotation_interrupted_mid_delete_never_leaves_a_partial_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for step in (1, 2, 3):
        _save(tmp_path, step)

    def dies_half_way(path: Path, *args: object, **kwargs: object) -> None:
        (Path(path) / "state.pt").unlink()
        raise KeyboardInterrupt  # stands for a kill during the deletion

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.rotate_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    assert all(ckpt.verify_checkpoint(p) is None for p in ckpt.list_checkpoints(tmp_path))


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned_by_state_pt",))


def test_state_pt_with_a_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _save(tmp_path / "ckpts", 1)
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "payload": _RunsCode()}, f, protocol=2)
    _rehash(path)  # the checksums match: only the loader stands in the way
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"state\.pt: refused to load.*could run code"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "pwned_by_state_pt").exists()


def _cfg(manifest: Path, path: Path, **train: object) -> Path:
    data = {
        "model": {"preset": "tiny"},
        "data": {"train": str(manifest), "max_sample_size": 12000, "min_sample_size": 4000, "max_tokens": 36000},
        "schedule": {"name": "polynomial", "warmup_steps": 2},
        "train": {"max_steps": 4, "log_interval": 1, "save_interval": 1, "keep_last": 5, "cpu": True,
                  "progress_bar": False, "tensorboard": False, **train},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), num_files=4)


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, writer: str, step: int) -> None:
    """The ``writer`` of checkpoint ``step`` writes half its bytes, then fails with ENOSPC."""
    real = ckpt.save_file if writer == "save_file" else torch.save

    def partial(obj: object, path: object, *args: object, **kwargs: object) -> None:
        if f"step_{step:08d}" in str(path):
            real(obj, path, *args, **kwargs)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            if writer == "torch.save-runtime":  # how torch's zip writer reports a full disk
                raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 256")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(obj, path, *args, **kwargs)

    if writer == "save_file":
        monkeypatch.setattr(ckpt, "save_file", partial)
    else:
        monkeypatch.setattr(ckpt.torch, "save", partial)


@pytest.mark.parametrize("writer", ["save_file", "torch.save", "torch.save-runtime"])
def test_disk_full_during_a_checkpoint_stops_the_run_with_one_line_and_keeps_the_previous_checkpoint(
    manifest: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    writer: str,
) -> None:
    _fill_disk_at(monkeypatch, writer, step=3)
    config = _cfg(manifest, tmp_path / "c.yaml")
    exp = tmp_path / "exp"
    assert main(["--log-level", "ERROR", "pretrain", "--config", str(config), "--exp-dir", str(exp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    name = "model.safetensors" if writer == "save_file" else "state.pt"
    # torch's zip writer says "enforce fail at inline_container.cc": reported as the full disk it is
    assert (
        f"error: no space left on device: {exp}/checkpoints/step_00000003/{name} (checkpoint not written"
        in err[0]
    )
    assert "step_00000002 is intact" in err[0]
    ckpts = exp / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]  # no temp dir left
    assert ckpt.latest_checkpoint(ckpts).name == "step_00000002"
    weights, state = ckpt.load_checkpoint(ckpts / "step_00000002")
    assert state["step"] == 2 and weights
    # with space again, the same command resumes from step 2 and finishes
    monkeypatch.undo()
    assert main(["--log-level", "ERROR", "pretrain", "--config", str(config), "--exp-dir", str(exp)]) == 0
    assert ckpt.latest_checkpoint(ckpts).name == "step_00000004"


def test_disk_full_with_on_save_error_continue_trains_on(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fill_disk_at(monkeypatch, "save_file", step=3)
    cfg = config_from_dict(
        yaml.safe_load(_cfg(manifest, tmp_path / "c.yaml", on_save_error="continue").read_text())
    )
    with caplog.at_level(logging.ERROR):
        summary = pretrain(cfg, tmp_path / "exp")
    assert summary.step == 4
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "exp" / "checkpoints")] == [
        "step_00000001", "step_00000002", "step_00000004",
    ]  # fmt: skip
    assert any("no space left on device" in r.getMessage() for r in caplog.records)
    assert not [p for p in (tmp_path / "exp" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_resuming_from_a_checkpoint_with_a_malicious_state_pt_fails_with_one_line(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _cfg(manifest, tmp_path / "c.yaml", max_steps=1)
    exp = tmp_path / "exp"
    assert main(["--log-level", "ERROR", "pretrain", "--config", str(config), "--exp-dir", str(exp)]) == 0
    path = exp / "checkpoints" / "step_00000001"
    with open(path / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "payload": _RunsCode()}, f, protocol=2)
    _rehash(path)
    capsys.readouterr()
    assert main(["--log-level", "ERROR", "pretrain", "--config", str(config), "--exp-dir", str(exp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state.pt: refused to load" in err[0], err
    assert not (tmp_path / "pwned_by_state_pt").exists()


def test_disk_full_with_on_save_error_continue_does_not_end_with_exit_code_0_and_a_stale_best_model(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The run trains to the end, but its best-scoring checkpoint (validation every update) could
    not be written: the command says so in one line with exit code 2 instead of exiting 0."""
    _fill_disk_at(monkeypatch, "save_file", step=3)
    config = _cfg(manifest, tmp_path / "c.yaml", on_save_error="continue", valid_interval=1)
    exp = tmp_path / "exp"
    argv = ["--log-level", "ERROR", "pretrain", "--config", str(config), "--exp-dir", str(exp),
            "--set", f"data.valid={manifest}"]  # fmt: skip
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert "1 checkpoint(s) could not be written during the run (train.on_save_error=continue)" in err[0]
    assert "no space left on device" in err[0] and "step_00000003" in err[0]
    best = ckpt.read_best(exp / "checkpoints")
    assert f"best_model is from step {best['step']}" in err[0]
    assert (exp / "best_model").is_dir()  # exported all the same, from a checkpoint that exists
    assert [p.name for p in ckpt.list_checkpoints(exp / "checkpoints")][-1] == "step_00000004"
