"""What a training run says about how it was launched: the start-up summary line, and a warning
when ``accelerate launch`` was asked for several processes but started one.

Without a GPU, ``accelerate launch --num_processes 2`` (or with ``--cpu``) runs a single process and
says nothing: it forms a process group on CPUs only with ``--multi_gpu`` (gloo) or a ``MULTI_CPU``
config. The only trace of the request is the launcher's own command line (or its config file),
which the launched process can read as its parent's (Linux ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from speechvq.models.kernels.lowp_guard import cpu_name
from speechvq.progress import duration


def _launcher_options(argv: list[str]) -> list[str] | None:
    """The options of an ``accelerate launch`` command line (after ``launch``, up to the launched
    script or module), or None if ``argv`` is not one."""
    for i, arg in enumerate(argv):
        if arg == "accelerate.commands.launch" or (
            Path(arg).name.startswith("accelerate") and argv[i + 1 : i + 2] == ["launch"]
        ):
            start = i + 1 if arg == "accelerate.commands.launch" else i + 2
            options = []
            for option in argv[start:]:
                if option == "-m" or option.endswith(".py"):
                    break
                options.append(option)
            return options
    return None


def _option(options: list[str], *names: str) -> str | None:
    """The value of the first of ``names`` in ``options`` (``--opt V`` or ``--opt=V``)."""
    for i, arg in enumerate(options):
        for name in names:
            if arg == name and i + 1 < len(options):
                return options[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def requested_processes(launcher_argv: list[str] | None = None) -> tuple[int, str] | None:
    """(N, where it was asked) when this process was started by ``accelerate launch`` asking for N
    processes in all, else None. ``launcher_argv``: the launcher's command line (default: this
    process's parent's, read from ``/proc``)."""
    options = _launcher_options(launcher_argv if launcher_argv is not None else _parent_argv())
    if options is None:
        return None
    value = _option(options, "--num_processes", "--num-processes")
    if value is not None:
        with contextlib.suppress(ValueError):
            return int(value), f"--num_processes {value}"
        return None
    config_file = _option(options, "--config_file", "--config-file") or _default_accelerate_config()
    if config_file is None:
        return None
    try:
        data = yaml.safe_load(Path(config_file).read_text(encoding="utf-8")) or {}
        return int(data["num_processes"]), f"num_processes in {config_file}"
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _parent_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _default_accelerate_config() -> str | None:
    try:
        from accelerate.commands.config import default_config_file
    except ImportError:
        return None
    return default_config_file if Path(default_config_file).is_file() else None


def process_count_warning(world_size: int, launcher_argv: list[str] | None = None) -> str | None:
    """A one-line warning when ``accelerate launch`` asked for more processes than run, else None."""
    if "WORLD_SIZE" in os.environ:  # a process group was formed (its size is world_size)
        return None
    asked = requested_processes(launcher_argv)
    if asked is None or asked[0] <= world_size:
        return None
    count, where = asked
    return (
        f"accelerate launch asked for {count} processes ({where}), but this run is {world_size} "
        "process: accelerate starts several processes only with --multi_gpu (on CPUs too, where "
        "they use gloo) or a MULTI_CPU config; see docs/training.md"
    )


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (Intel(R) Xeon(R) ..., 2 threads)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"{device} ({cpu_name()}, {threads} thread{'' if threads == 1 else 's'})"


def describe_data(dataset: Any) -> str:
    """``1,234 utterances, 2.50 h`` (or ``12.5 min``) for an audio dataset, else ``1,234 items``."""
    count = len(dataset)
    sizes = getattr(dataset, "raw_sizes", None)
    rate = getattr(dataset, "sample_rate", None)
    if sizes is not None and rate:
        return f"{count:,} utterances, {duration(float(np.sum(sizes)) / rate)}"
    return f"{count:,} items"


def describe_parameters(model: torch.nn.Module) -> str:
    """``94.4M parameters (all trainable)`` or ``94.4M parameters, 90.2M trainable``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def count(n: int) -> str:
        return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"

    return f"{count(total)} parameters" + (
        " (all trainable)" if trainable == total else f", {count(trainable)} trainable"
    )
