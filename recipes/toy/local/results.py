#!/usr/bin/env python3
"""Collect the toy recipe's numbers into ``EXP/results.md`` and ``EXP/results.json`` and print them.

Usage:
    python3 local/results.py exp
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RATES = re.compile(r"WER ([0-9.]+)%.*CER ([0-9.]+)%")


def get_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exp", type=Path)
    return parser.parse_args()


def last_record(path: Path, split: str) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    found = [r for r in records if r.get("split") == split]
    return found[-1] if found else {}


def collect(exp: Path) -> dict:
    pre = last_record(exp / "pretrain" / "metrics.jsonl", "train")
    pre_valid = last_record(exp / "pretrain" / "metrics.jsonl", "valid")
    bert = last_record(exp / "unit_bert" / "metrics.jsonl", "train")
    out = {
        "pretrain": {
            "steps": pre.get("step"),
            "loss_nats": pre.get("loss"),
            "accuracy": pre.get("accuracy"),
            "code_perplexity": pre.get("code_perplexity"),
            "audio_s_per_s": pre.get("audio_s_per_s"),
            "valid_loss": pre_valid.get("loss"),
            "valid_accuracy": pre_valid.get("accuracy"),
        },
        "units": {},
        "unit_bert": {"steps": bert.get("step"), "mlm_loss": bert.get("loss")},
        "ctc": {},
    }
    for kind in ("codes", "kmeans"):
        quality = exp / "units" / kind / "quality.json"
        if quality.is_file():
            out["units"][kind] = json.loads(quality.read_text())
    for init in ("pretrained", "scratch"):
        rates = {}
        for name, prefix in (("test.wer", ""), ("test_lm.wer", "lm_")):
            path = exp / f"ctc_{init}" / name
            match = RATES.search(path.read_text()) if path.is_file() else None
            if match:
                rates[f"{prefix}wer"], rates[f"{prefix}cer"] = float(match.group(1)), float(match.group(2))
        out["ctc"][init] = rates
    pre, scratch = out["ctc"]["pretrained"], out["ctc"]["scratch"]
    out["gain"] = {  # relative error reduction of the pretrained model, in %
        key: 100.0 * (1.0 - pre[key] / scratch[key])
        for key in ("wer", "cer", "lm_wer", "lm_cer")
        if pre.get(key) is not None and scratch.get(key)
    }
    return out


def render(r: dict) -> str:
    def fmt(value: object, spec: str = ".3f") -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    p = r["pretrain"]
    lines = [
        "| stage | metric | value |",
        "|---|---|---|",
        f"| pretraining ({p['steps']} updates) | loss (nats) / accuracy | {fmt(p['loss_nats'])} / {fmt(p['accuracy'])} |",
        f"| | validation loss / accuracy | {fmt(p['valid_loss'])} / {fmt(p['valid_accuracy'])} |",
        f"| | code perplexity | {fmt(p['code_perplexity'], '.1f')} |",
        f"| | throughput (audio s/s) | {fmt(p['audio_s_per_s'], '.1f')} |",
    ]
    for kind, q in r["units"].items():
        lines.append(
            f"| units: {kind} | PNMI / phone purity / cluster purity | "
            f"{fmt(q.get('pnmi'))} / {fmt(q.get('phone_purity'))} / {fmt(q.get('cluster_purity'))} |"
        )
    lines.append(
        f"| unit BERT ({r['unit_bert']['steps']} updates) | MLM loss | {fmt(r['unit_bert']['mlm_loss'])} |"
    )
    for init, rates in r["ctc"].items():
        lines.append(
            f"| CTC from {init} | test WER / CER, greedy (%) | {fmt(rates.get('wer'), '.2f')} / {fmt(rates.get('cer'), '.2f')} |"
        )
        lines.append(
            f"| | test WER / CER, word LM (%) | {fmt(rates.get('lm_wer'), '.2f')} / {fmt(rates.get('lm_cer'), '.2f')} |"
        )
    g = r["gain"]
    lines.append(
        f"| pretraining's gain | relative WER / CER reduction, greedy (%) | {fmt(g.get('wer'), '.1f')} / {fmt(g.get('cer'), '.1f')} |"
    )
    lines.append(
        f"| | relative WER / CER reduction, word LM (%) | {fmt(g.get('lm_wer'), '.1f')} / {fmt(g.get('lm_cer'), '.1f')} |"
    )
    return "\n".join(lines)


def main() -> None:
    args = get_args()
    results = collect(args.exp)
    (args.exp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = render(results)
    (args.exp / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
