from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from speechvq.errors import UserInputError
from speechvq.units.quality import JointCounts, frame_labels, read_alignment, unit_quality


def test_unit_quality_equals_hand_computed_values() -> None:
    # phones a, a, a, b, b, c ; units 1, 1, 2, 2, 2, 3 (6 frames)
    counts = JointCounts()
    counts.update(["a", "a", "a", "b", "b", "c"], [1, 1, 2, 2, 2, 3])
    q = unit_quality(counts.matrix())
    # phone purity: unit 1 -> a (2/2), unit 2 -> b (2/3), unit 3 -> c (1/1): (2 + 2 + 1) / 6
    assert q.phone_purity == pytest.approx(5 / 6)
    # cluster purity: phone a -> unit 1 (2/3), b -> unit 2 (2/2), c -> unit 3: (2 + 2 + 1) / 6
    assert q.cluster_purity == pytest.approx(5 / 6)
    # H(y) = -(1/2 ln 1/2 + 1/3 ln 1/3 + 1/6 ln 1/6); H(y|z) = p(z=2) * H(1/3, 2/3) = 1/2 * H(1/3, 2/3)
    h_y = -(0.5 * math.log(0.5) + (1 / 3) * math.log(1 / 3) + (1 / 6) * math.log(1 / 6))
    h_y_z = 0.5 * -((1 / 3) * math.log(1 / 3) + (2 / 3) * math.log(2 / 3))
    assert q.pnmi == pytest.approx((h_y - h_y_z) / h_y)
    assert (q.num_frames, q.num_phones, q.num_units) == (6, 3, 3)


def test_unit_quality_extremes() -> None:
    perfect = unit_quality(np.diag([3, 4, 5]))
    assert perfect.pnmi == pytest.approx(1.0) and perfect.phone_purity == pytest.approx(1.0)
    independent = unit_quality(np.outer([1, 2], [3, 1]))  # p(y, z) = p(y) p(z)
    assert independent.pnmi == pytest.approx(0.0, abs=1e-12)
    one_unit = unit_quality(np.array([[2], [6]]))
    assert one_unit.phone_purity == pytest.approx(0.75) and one_unit.cluster_purity == pytest.approx(1.0)


def test_unit_quality_raises_on_empty_counts() -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        unit_quality(np.zeros((2, 2)))


def test_joint_counts_skips_unaligned_frames() -> None:
    counts = JointCounts()
    counts.update(["a", None, "b"], ["1", "2", "1"])
    assert counts.matrix().sum() == 2 and "2" not in counts.units


def test_frame_labels_take_the_phone_at_the_frame_centre() -> None:
    segments = [(0.0, 0.03, "sil"), (0.03, 0.05, "a"), (0.06, 0.10, "b")]
    # centres 0.01, 0.03, 0.05, 0.07, 0.09, 0.11
    assert frame_labels(segments, 6, 0.02) == ["sil", "a", None, "b", "b", None]
    # a frame whose receptive field is centred 0.025 s after its start (centres 0.025, 0.045, ...)
    assert frame_labels(segments, 5, 0.02, frame_centre_s=0.025) == ["sil", "a", "b", "b", None]


def test_evaluate_units_reads_each_frame_at_its_recorded_centre(tmp_path: Path) -> None:
    from speechvq.units.io import UnitWriter, read_units
    from speechvq.units.quality import evaluate_units

    (tmp_path / "a.phones").write_text("0 0.2 a\n0.2 0.4 b\n")
    # frame 0's receptive field is centred at 0.15 s: labels a, b, b, (none), which the units follow
    for name, centre in (("late", 0.15), ("plain", None)):
        with UnitWriter(tmp_path / name, frame_stride_s=0.1, frame_centre_s=centre) as w:
            w.write("a.flac", ["1", "2", "2", "3"])
    assert read_units(tmp_path / "late").meta["frame_centre_s"] == 0.15
    late = evaluate_units(read_units(tmp_path / "late"), tmp_path)
    assert late.num_frames == 3 and late.phone_purity == 1.0
    # without a recorded centre, half a stride: 0.05 a, 0.15 a, 0.25 b, 0.35 b
    assert "frame_centre_s" not in read_units(tmp_path / "plain").meta
    plain = evaluate_units(read_units(tmp_path / "plain"), tmp_path)
    assert plain.num_frames == 4 and plain.phone_purity == pytest.approx(3 / 4)
    shifted = evaluate_units(read_units(tmp_path / "plain"), tmp_path, frame_centre_s=0.15)
    assert shifted.num_frames == 3 and shifted.phone_purity == 1.0


def test_read_alignment_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "u.phones"
    path.write_text("0.0 0.1 a\n0.1 x b\n")
    with pytest.raises(UserInputError, match=r"u.phones:2: expected"):
        read_alignment(path)
    path.write_text("0.0 0.1 a\n0.1 0.25 b\n")
    assert read_alignment(path) == [(0.0, 0.1, "a"), (0.1, 0.25, "b")]


def test_evaluate_units_finds_alignments_and_matches_the_counts(tmp_path: Path) -> None:
    from speechvq.units.io import UnitWriter, read_units
    from speechvq.units.quality import evaluate_units

    with UnitWriter(tmp_path / "units", frame_stride_s=0.1, dedup=True) as w:
        w.write("spk/a.flac", ["1", "1", "2", "2", "2", "3"])
    # not beside the manifest path, but somewhere below the root: found by name
    (tmp_path / "ali" / "other").mkdir(parents=True)
    (tmp_path / "ali" / "other" / "a.phones").write_text("0 0.3 a\n0.3 0.5 b\n0.5 0.6 c\n")
    q = evaluate_units(read_units(tmp_path / "units"), tmp_path / "ali")
    assert q.phone_purity == pytest.approx(5 / 6) and q.num_frames == 6
    with pytest.raises(UserInputError, match=r"no alignment file for utterance 1 \(spk/a.flac\)"):
        evaluate_units(read_units(tmp_path / "units"), tmp_path / "ali", suffix=".words")
