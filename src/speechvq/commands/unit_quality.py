"""``speechvq unit-quality``: phone purity, cluster purity and PNMI of units vs phone alignments.

Usage:
    speechvq unit-quality units/test data/synth/test
    speechvq unit-quality units/test data/synth/test --json quality.json

UNITS is an ``export-units`` directory; ALIGNMENTS is the directory the ``.phones`` files
(``start_s end_s phone`` per line, as the synthetic corpus writes them) are found in: for the
utterance ``rel/path/utt.flac`` first ``ALIGNMENTS/rel/path/utt.phones``, else any
``utt.phones`` below ALIGNMENTS. Each frame gets the phone at its centre, the middle of its
receptive field in the input (``meta.json``'s ``frame_centre_s``: half the front end's receptive
field for ``export-units``); unaligned frames are not counted. Measures as in the HuBERT paper (see ``speechvq.units.quality``).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("units", help="export-units output directory")
    parser.add_argument("alignments", help="directory holding the .phones alignment files")
    parser.add_argument("--suffix", default=".phones", help="alignment file suffix (default .phones)")
    parser.add_argument("--frame-stride", type=float, help="seconds per frame (default: from meta.json)")
    parser.add_argument(
        "--frame-centre",
        type=float,
        help="seconds from the start to the centre of frame 0's receptive field (default: from "
        "meta.json, else half a frame stride)",
    )
    parser.add_argument("--json", help="also write the result here as JSON")


def run(args: argparse.Namespace) -> int:
    from speechvq.files import check_output_file, write_atomic
    from speechvq.ranges import check_range
    from speechvq.units.io import read_units
    from speechvq.units.quality import evaluate_units

    check_range("--frame-stride", args.frame_stride, 0, low_open=True, optional=True)
    check_range("--frame-centre", args.frame_centre, 0, optional=True)
    if args.json:
        check_output_file(args.json, "--json")
    units = read_units(args.units)
    quality = evaluate_units(
        units,
        args.alignments,
        suffix=args.suffix,
        frame_stride_s=args.frame_stride,
        frame_centre_s=args.frame_centre,
    )
    print(
        f"phone purity {quality.phone_purity:.4f}  cluster purity {quality.cluster_purity:.4f}  "
        f"PNMI {quality.pnmi:.4f}  ({quality.num_frames} frames, {quality.num_phones} phones, "
        f"{quality.num_units} units)"
    )
    if args.json:
        write_atomic(args.json, json.dumps(quality.as_dict(), indent=2) + "\n")
    return 0
