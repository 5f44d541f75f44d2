#!/usr/bin/env python3
"""Collect the WER lines written by finetune_ctc.sh's decoding stage into one markdown table.

Usage:
    python3 local/wer_table.py exp/ctc --budgets 10min 1h --subsets test-clean test-other
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

WER = re.compile(r"WER ([0-9.]+)%")


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp_prefix", type=Path)
    parser.add_argument("--budgets", nargs="+", required=True)
    parser.add_argument("--subsets", nargs="+", required=True)
    return parser.parse_args()


def read_wer(path: Path) -> str:
    if not path.is_file():
        return "-"
    match = WER.search(path.read_text())
    return match.group(1) if match else "-"


def table(exp_prefix: Path, budgets: list[str], subsets: list[str]) -> str:
    header = ["labelled"] + [f"{s} {d}" for s in subsets for d in ("greedy", "LM")]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for budget in budgets:
        cells = [budget]
        for subset in subsets:
            decode = exp_prefix / budget / f"decode_{subset}"
            cells += [read_wer(decode / "greedy.wer"), read_wer(decode / "lm.wer")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    args = get_args()
    text = table(args.exp_prefix, args.budgets, args.subsets)
    print(text)
    (args.exp_prefix / "wer_table.md").write_text(text + "\n")
