from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from speechvq.errors import UserInputError
from speechvq.units.io import UnitWriter, read_units, run_length_decode, run_length_encode


@given(st.lists(st.integers(0, 3), max_size=50))
def test_run_length_encode_decodes_back(seq: list[int]) -> None:
    values, durations = run_length_encode(seq)
    assert run_length_decode(values, durations) == seq
    assert all(a != b for a, b in itertools.pairwise(values))


def test_run_length_encode_example() -> None:
    assert run_length_encode(["a", "a", "b", "a"]) == (["a", "b", "a"], [2, 1, 1])


def _write(tmp_path: Path, dedup: bool) -> list[list[str]]:
    seqs = [["3", "3", "1", "7", "7", "7"], [], ["0-1", "0-1", "2-5"]]
    with UnitWriter(tmp_path, frame_stride_s=0.02, dedup=dedup, meta={"kind": "test"}) as w:
        for i, s in enumerate(seqs):
            w.write(f"a/u{i}.flac", s)
    return seqs


@pytest.mark.parametrize("dedup", [False, True])
def test_units_round_trip_in_order(tmp_path: Path, dedup: bool) -> None:
    seqs = _write(tmp_path, dedup)
    units = read_units(tmp_path)
    assert len(units) == 3
    assert [units.frames(i) for i in range(3)] == seqs
    assert units.utterances == ["a/u0.flac", "a/u1.flac", "a/u2.flac"]
    assert units.meta["kind"] == "test" and units.meta["num_frames"] == 9
    if dedup:
        assert units.tokens[0] == ["3", "1", "7"] and units.durations[0] == [2, 1, 3]
    else:
        assert units.tokens == seqs and units.durations is None


def test_units_timestamps_mark_token_starts(tmp_path: Path) -> None:
    _write(tmp_path, dedup=True)
    lines = (tmp_path / "timestamps.txt").read_text().split("\n")
    assert lines[0] == "0 0.04 0.06"
    assert lines[1] == ""
    assert lines[2] == "0 0.04"
    _write(tmp_path, dedup=False)
    assert (tmp_path / "timestamps.txt").read_text().split("\n")[0] == "0 0.02 0.04 0.06 0.08 0.1"
    assert not (tmp_path / "durations.txt").exists()


def test_units_frame_ids_are_integers(tmp_path: Path) -> None:
    _write(tmp_path, dedup=True)
    assert read_units(tmp_path).frame_ids(0).tolist() == [3, 3, 1, 7, 7, 7]


def test_unit_writer_leaves_no_meta_when_interrupted(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), UnitWriter(tmp_path, frame_stride_s=0.02) as w:
        w.write("u", ["1"])
        raise RuntimeError("boom")
    assert not (tmp_path / "meta.json").exists()


def test_read_units_raises_when_durations_do_not_match(tmp_path: Path) -> None:
    _write(tmp_path, dedup=True)
    (tmp_path / "durations.txt").write_text("2 1\n\n2 1\n")
    with pytest.raises(UserInputError, match=r"durations.txt:1: expected 3 positive durations"):
        read_units(tmp_path)


def test_unit_writer_rejects_tokens_with_spaces(tmp_path: Path) -> None:
    with UnitWriter(tmp_path, frame_stride_s=0.02) as w, pytest.raises(ValueError, match="whitespace"):
        w.write("u", ["1 2"])
