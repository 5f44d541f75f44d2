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
    if not path.is_file():  # a stage that did not run (--vq-wav2vec false)
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    found = [r for r in records if r.get("split") == split]
    return found[-1] if found else {}


def pretraining(exp_dir: Path) -> dict:
    train = last_record(exp_dir / "metrics.jsonl", "train")
    valid = last_record(exp_dir / "metrics.jsonl", "valid")
    return {
        "steps": train.get("step"),
        "loss_nats": train.get("loss"),
        "accuracy": train.get("accuracy"),
        "code_perplexity": train.get("code_perplexity"),
        "audio_s_per_s": train.get("audio_s_per_s"),
        "valid_loss": valid.get("loss"),
        "valid_accuracy": valid.get("accuracy"),
    }


def error_rates(exp_dir: Path) -> dict:
    rates = {}
    for name, prefix in (("test.wer", ""), ("test_lm.wer", "lm_")):
        path = exp_dir / name
        match = RATES.search(path.read_text()) if path.is_file() else None
        if match:
            rates[f"{prefix}wer"], rates[f"{prefix}cer"] = float(match.group(1)), float(match.group(2))
    return rates


def reduction(better: dict, base: dict) -> dict:
    """Relative error reduction of ``better`` over ``base``, in %."""
    return {
        key: 100.0 * (1.0 - better[key] / base[key])
        for key in ("wer", "cer", "lm_wer", "lm_cer")
        if better.get(key) is not None and base.get(key)
    }


def collect(exp: Path) -> dict:
    bert_train = last_record(exp / "unit_bert" / "metrics.jsonl", "train")
    bert_valid = last_record(exp / "unit_bert" / "metrics.jsonl", "valid")
    out: dict = {
        "pretrain": pretraining(exp / "pretrain"),
        "units": {},
        "vq_pretrain": pretraining(exp / "vq_pretrain"),
        "vq_units": {},
        "unit_bert": {
            "steps": bert_train.get("step"),
            "mlm_loss": bert_train.get("loss"),
            # validation: the MLM against what unit frequencies alone give
            **{
                f"valid_{key}": bert_valid.get(key)
                for key in ("loss", "accuracy", "unigram_ce", "majority_accuracy", "loss_below_unigram")
            },
        },
        "ctc": {},
    }
    for kind in ("codes", "kmeans"):
        quality = exp / "units" / kind / "quality.json"
        if quality.is_file():
            out["units"][kind] = json.loads(quality.read_text())
    for name in ("context", "logmel"):
        quality = exp / "vq_units" / f"test_{name}" / "quality.json"
        if quality.is_file():
            out["vq_units"][name] = json.loads(quality.read_text())
    for init in ("pretrained", "scratch", "vq_bert", "vq_units"):
        out["ctc"][init] = error_rates(exp / f"ctc_{init}")
    out["gain"] = reduction(out["ctc"]["pretrained"], out["ctc"]["scratch"])
    out["bert_gain"] = reduction(out["ctc"]["vq_bert"], out["ctc"]["vq_units"])
    return out


def render(r: dict) -> str:
    def fmt(value: object, spec: str = ".3f") -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    def pretrain_rows(title: str, p: dict) -> list[str]:
        return [
            f"| {title} ({p['steps']} updates) | loss (nats) / accuracy | {fmt(p['loss_nats'])} / {fmt(p['accuracy'])} |",
            f"| | validation loss / accuracy | {fmt(p['valid_loss'])} / {fmt(p['valid_accuracy'])} |",
            f"| | code perplexity | {fmt(p['code_perplexity'], '.1f')} |",
            f"| | throughput (audio s/s) | {fmt(p['audio_s_per_s'], '.1f')} |",
        ]

    def unit_row(title: str, q: dict) -> str:
        return (
            f"| {title} | PNMI / phone purity / cluster purity | "
            f"{fmt(q.get('pnmi'))} / {fmt(q.get('phone_purity'))} / {fmt(q.get('cluster_purity'))} |"
        )

    def ctc_rows(title: str, rates: dict) -> list[str]:
        return [
            f"| {title} | test WER / CER, greedy (%) | {fmt(rates.get('wer'), '.2f')} / {fmt(rates.get('cer'), '.2f')} |",
            f"| | test WER / CER, word LM (%) | {fmt(rates.get('lm_wer'), '.2f')} / {fmt(rates.get('lm_cer'), '.2f')} |",
        ]

    def gain_rows(title: str, g: dict) -> list[str]:
        return [
            f"| {title} | relative WER / CER reduction, greedy (%) | {fmt(g.get('wer'), '.1f')} / {fmt(g.get('cer'), '.1f')} |",
            f"| | relative WER / CER reduction, word LM (%) | {fmt(g.get('lm_wer'), '.1f')} / {fmt(g.get('lm_cer'), '.1f')} |",
        ]

    lines = ["| stage | metric | value |", "|---|---|---|"]
    lines += pretrain_rows("wav2vec 2.0 pretraining", r["pretrain"])
    for kind, q in r["units"].items():
        lines.append(unit_row(f"units: {kind}", q))
    lines += ctc_rows("CTC from pretrained", r["ctc"]["pretrained"])
    lines += ctc_rows("CTC from scratch", r["ctc"]["scratch"])
    lines += gain_rows("pretraining's gain", r["gain"])
    if r["vq_pretrain"].get("steps") is None:  # run with --vq-wav2vec false
        return "\n".join(lines)
    lines += pretrain_rows("vq-wav2vec pretraining", r["vq_pretrain"])
    names = {"context": "vq-wav2vec units: k-means of the context", "logmel": "baseline: k-means of log-mel"}
    for name, q in r["vq_units"].items():
        lines.append(unit_row(names[name], q))
    b = r["unit_bert"]
    lines += [
        f"| unit BERT ({b['steps']} updates) | validation MLM loss / unigram entropy (nats) | "
        f"{fmt(b['valid_loss'])} / {fmt(b['valid_unigram_ce'])} |",
        f"| | validation MLM accuracy / majority unit | {fmt(b['valid_accuracy'])} / {fmt(b['valid_majority_accuracy'])} |",
    ]
    lines += ctc_rows("CTC on BERT features", r["ctc"]["vq_bert"])
    lines += ctc_rows("CTC on the raw units", r["ctc"]["vq_units"])
    lines += gain_rows("the BERT's gain", r["bert_gain"])
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
