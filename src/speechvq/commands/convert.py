"""Convert a model between speechvq, transformers and fairseq formats.

Usage:
    speechvq convert exp/pretrain/best hf_model --from speechvq --to hf
    speechvq convert hf_model sv_model --from hf --to speechvq

Log-mel models (``model.encoder.kind: fbank``) go to transformers as custom classes that load with
``AutoModel.from_pretrained(dir, trust_remote_code=True)`` without speechvq, or without remote code
after ``import speechvq.interop.hf_fbank`` (:mod:`speechvq.interop.hf_fbank`).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from speechvq.errors import UserInputError

log = logging.getLogger("speechvq.convert")

FORMATS = ("speechvq", "hf", "fairseq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source model (directory, or a fairseq .pt file)")
    parser.add_argument("dst", help="destination directory (or .pt file for fairseq)")
    parser.add_argument("--from", dest="src_format", choices=FORMATS, required=True)
    parser.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)


def _is_ctc_dir(src: str, fmt: str) -> bool:
    from pathlib import Path

    from speechvq.files import read_json

    config = Path(src) / "config.json"
    if fmt == "fairseq" or not config.exists():
        return False
    meta = read_json(config, "model config")
    if fmt == "speechvq":
        return meta.get("model_type") == "wav2vec2_ctc"
    architectures = meta.get("architectures") or []
    return isinstance(architectures, list) and (
        "Wav2Vec2ForCTC" in architectures or "SpeechvqFbankForCTC" in architectures
    )


def _load(src: str, fmt: str) -> tuple[Any, Any]:
    """(model, vocabulary or None)."""
    if _is_ctc_dir(src, fmt):
        if fmt == "speechvq":
            from speechvq.models.ctc import load_ctc_pretrained

            return load_ctc_pretrained(src)
        from speechvq.interop.hf_ctc import load_hf_ctc

        return load_hf_ctc(src)
    if fmt == "speechvq":
        from speechvq.io import load_pretrained

        return load_pretrained(src), None
    if fmt == "hf":
        from speechvq.interop.hf import load_hf

        return load_hf(src), None
    from speechvq.interop import fairseq

    return fairseq.import_fairseq(src), None


def run(args: argparse.Namespace) -> int:
    from speechvq.files import check_output_dir, check_output_file

    if args.src_format == args.dst_format:
        raise UserInputError(f"--from and --to are both {args.src_format!r}: nothing to convert")
    if args.dst_format == "fairseq":
        check_output_file(args.dst, "the destination (a fairseq .pt file)")
    else:
        check_output_dir(args.dst, "the destination directory")
    model, vocab = _load(args.src, args.src_format)
    if args.dst_format == "speechvq":
        if vocab is not None:
            from speechvq.models.ctc import save_ctc_pretrained

            save_ctc_pretrained(model, vocab, args.dst)
        else:
            from speechvq.io import save_pretrained

            save_pretrained(model, args.dst)
    elif args.dst_format == "hf" and getattr(model.cfg.encoder, "kind", "conv") == "fbank":
        from speechvq.interop.hf_fbank import save_hf_fbank

        save_hf_fbank(model, args.dst, vocab)
    elif args.dst_format == "hf":
        if vocab is not None:
            from speechvq.interop.hf_ctc import save_hf_ctc

            save_hf_ctc(model, vocab, args.dst)
        else:
            from speechvq.interop.hf import save_hf

            save_hf(model, args.dst)
    else:
        from speechvq.interop import fairseq

        fairseq.save_fairseq_checkpoint(model, args.dst)
    log.info("wrote %s (%s)", args.dst, args.dst_format)
    return 0
