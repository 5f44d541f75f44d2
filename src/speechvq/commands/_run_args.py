"""Arguments and error handling shared by the training commands (pretrain, finetune-ctc,
pretrain-unit-bert)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_run_arguments(parser: argparse.ArgumentParser, *, configs: str, example: str) -> None:
    """``--config``, ``--exp-dir``, ``--set`` and ``--resume``.

    Args:
        parser: the command's parser.
        configs: its shipped configs, for the help (e.g. ``conf/pretrain_*.yaml``); the help
            names the first of them (``pretrain_base``).
        example: example overrides for the help.
    """
    from speechvq.configs import bundled_configs

    prefix = configs.rsplit("/", 1)[-1].split("*")[0]  # conf/pretrain_*.yaml -> pretrain_
    shipped = next((name for name in bundled_configs() if name.startswith(prefix)), prefix + "...")
    parser.add_argument(
        "--config",
        required=True,
        help=f"YAML run config: a path, or the name of a shipped config ({configs}, e.g. {shipped})",
    )
    parser.add_argument(
        "--exp-dir", required=True, help="experiment directory (checkpoints, metrics, best_model)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=f"type-checked config override, e.g. {example}",
    )
    parser.add_argument(
        "--resume", action="store_true", help="fail unless a checkpoint exists to resume from"
    )


def run_training(command: str, train: Callable[[], Any]) -> Any | None:
    """``train()``, or None (after a one-line message) when it stopped on non-finite updates.

    A run during which checkpoints could not be written (``train.on_save_error: continue``) ends
    with a one-line error (exit code 2) saying so, even though it trained to the end: its
    ``best_model`` may be stale, and an exit code 0 would hide that.

    Raises:
        UserInputError: checkpoints could not be written during the run.
        StoppedBySignal: the run stopped on SIGTERM/SIGINT after writing a checkpoint (the CLI
            prints how to resume and exits with 128 + the signal number).
    """
    import signal

    from speechvq.errors import UserInputError
    from speechvq.signals import StoppedBySignal
    from speechvq.train import NonFiniteError

    try:
        summary = train()
    except NonFiniteError as err:
        print(f"speechvq {command}: stopped: {err}", file=sys.stderr)
        return None
    if getattr(summary, "stopped_by", None) is not None:
        name = signal.Signals(summary.stopped_by).name
        raise StoppedBySignal(
            f"stopped by {name} after update {summary.step}, with a checkpoint", summary.stopped_by
        )
    failures = getattr(summary, "save_failures", None)
    if failures and summary.main_process:
        best = summary.best
        kept = (
            f"best_model is from step {best['step']}"
            if best
            else "best_model is from the last checkpoint written"
        )
        if summary.unsaved_best is not None:
            lost = summary.unsaved_best
            kept += (
                f", but step {lost['step']} scored better ({lost['valid_loss']:.4g}) and its checkpoint "
                "could not be written: best_model is stale"
            )
        raise UserInputError(
            f"{len(failures)} checkpoint(s) could not be written during the run "
            f"(train.on_save_error=continue); {kept}. First failure: {failures[0]}"
        )
    return summary
