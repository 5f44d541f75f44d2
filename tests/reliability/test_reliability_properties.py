"""Property-based tests: the manifest, label and unit parsers round-trip and never raise anything
but ``UserInputError`` on junk; invariants of the span-mask and distractor samplers not covered by
``tests/models/test_masking.py``."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechvq.data.manifest import ManifestItem, parse_manifest, read_labels, read_manifest, write_manifest
from speechvq.errors import UserInputError
from speechvq.models.masking import compute_span_mask, sample_distractors
from speechvq.units.io import UnitWriter, read_units

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# file names a manifest can hold: no tabs or line breaks, no surrounding blanks
_name_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r")
relpaths = st.text(_name_chars, min_size=1, max_size=20).filter(lambda s: s == s.strip() and s.strip())


_BASE = Path(tempfile.mkdtemp(prefix="svq_prop_"))
atexit.register(shutil.rmtree, _BASE, ignore_errors=True)


def _tmp() -> Path:
    """A fresh directory per example (hypothesis does not mix with function-scoped tmp_path)."""
    return Path(tempfile.mkdtemp(dir=_BASE))


@FAST
@given(items=st.lists(st.tuples(relpaths, st.integers(0, 10**9)), max_size=8))
def test_manifest_round_trips_every_item(items: list[tuple[str, int]]) -> None:
    d = _tmp()
    write_manifest(d / "m.tsv", d, [ManifestItem(r, n, 0) for r, n in items])
    m = read_manifest(d / "m.tsv")
    assert m.root == d.resolve()
    assert [(i.relpath, i.num_samples) for i in m.items] == items
    assert [i.line for i in m.items] == list(range(2, len(items) + 2))


@FAST
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_manifest_parser_on_junk_raises_only_user_input_errors(data: bytes) -> None:
    d = _tmp()
    (d / "m.tsv").write_bytes(data)
    try:
        manifest, problems = parse_manifest(d / "m.tsv")
    except UserInputError as err:
        assert "m.tsv" in str(err) and "\n" not in str(err)
        return
    assert all(p.startswith(f"{d / 'm.tsv'}:") for p in problems)
    assert all(i.num_samples >= 0 and i.relpath for i in manifest.items)
    try:
        read_manifest(d / "m.tsv")
    except UserInputError as err:
        assert "m.tsv" in str(err)


_label_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r")


@FAST
@given(lines=st.lists(st.text(_label_chars, max_size=30), max_size=8))
def test_labels_round_trip_line_for_line(lines: list[str]) -> None:
    d = _tmp()
    (d / "l.wrd").write_bytes("".join(ln + "\n" for ln in lines).encode("utf-8"))
    assert read_labels(d / "l.wrd") == lines


@FAST
@given(data=st.binary(max_size=200))
def test_label_parser_on_junk_raises_only_user_input_errors(data: bytes) -> None:
    d = _tmp()
    (d / "l.wrd").write_bytes(data)
    try:
        labels = read_labels(d / "l.wrd")
    except UserInputError as err:
        assert "l.wrd:" in str(err)
        return
    assert all("\n" not in ln for ln in labels)


@FAST
@given(
    utts=st.lists(st.lists(st.integers(0, 9), max_size=12), max_size=5),
    dedup=st.booleans(),
)
def test_units_round_trip_through_writer_and_reader(utts: list[list[int]], dedup: bool) -> None:
    d = _tmp() / "u"
    with UnitWriter(d, frame_stride_s=0.02, dedup=dedup, meta={"vocab_size": 10}) as w:
        for i, tokens in enumerate(utts):
            w.write(f"utt{i}.wav", tokens)
    units = read_units(d)
    assert units.utterances == [f"utt{i}.wav" for i in range(len(utts))]
    assert [units.frame_ids(i).tolist() for i in range(len(units))] == utts


@FAST
@given(
    units=st.text(max_size=80),
    durations=st.none() | st.text(max_size=80),
    vocab_size=st.none() | st.integers(1, 20),
)
def test_unit_parser_on_junk_raises_only_user_input_errors(
    units: str, durations: str | None, vocab_size: int | None
) -> None:
    d = _tmp()
    (d / "units.txt").write_text(units, encoding="utf-8", errors="surrogatepass")
    meta: dict = {"frame_stride_s": 0.02, "vocab_size": vocab_size}
    if durations is not None:
        meta["dedup"] = True
        (d / "durations.txt").write_text(durations, encoding="utf-8", errors="surrogatepass")
    (d / "meta.json").write_text(json.dumps(meta))
    try:
        read = read_units(d)
    except UserInputError as err:
        assert ".txt" in str(err) or "meta.json" in str(err)
        return
    if vocab_size is not None:  # every id checked: frame_ids cannot fail
        for i in range(len(read)):
            ids = read.frame_ids(i)
            assert ((ids >= 0) & (ids < vocab_size)).all()


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 80), min_size=1, max_size=5),
    mask_prob=st.floats(0.0, 1.0),
    mask_length=st.integers(1, 12),
    min_masks=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_span_mask_runs_are_whole_spans_and_bounded_in_number(
    lengths: list[int], mask_prob: float, mask_length: int, min_masks: int, seed: int
) -> None:
    lengths_t = torch.tensor(lengths)
    max_len = max(lengths) + 2

    def draw() -> torch.Tensor:
        return compute_span_mask(
            lengths_t, max_len, mask_prob=mask_prob, mask_length=mask_length, min_masks=min_masks,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    mask = draw()
    assert torch.equal(mask, draw())  # a seeded generator fixes the mask
    for row, n in zip(mask.tolist(), lengths):
        # a maximal run of masked frames is at least one whole span, unless clipped at the end
        runs, start = [], None
        for t, m in enumerate([*row, False]):
            if m and start is None:
                start = t
            elif not m and start is not None:
                runs.append((start, t))
                start = None
        for a, b in runs:
            assert b - a >= mask_length or b == n, (row, n, a, b)
        # at most max(min_masks, floor(p n / M) + 1) spans, each M frames, at most n - 1 spans
        spans = min(max(min_masks, int(mask_prob * n / mask_length) + 1), max(n - 1, 0))
        assert sum(row) <= min(n, spans * mask_length)
        if mask_prob == 0 and min_masks == 0:
            assert not any(row)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    mask_prob=st.floats(0.05, 1.0),
    mask_length=st.integers(1, 10),
    seed=st.integers(0, 2**31 - 1),
)
def test_span_mask_with_require_same_masks_gives_every_row_the_same_count_inside_its_length(
    lengths: list[int], mask_prob: float, mask_length: int, seed: int
) -> None:
    lengths_t = torch.tensor(lengths)
    kwargs = dict(mask_prob=mask_prob, mask_length=mask_length, min_masks=1)
    free = compute_span_mask(lengths_t, max(lengths), generator=torch.Generator().manual_seed(seed), **kwargs)
    same = compute_span_mask(
        lengths_t,
        max(lengths),
        require_same_masks=True,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    counts = same.sum(1)
    assert (counts == counts[0]).all()
    assert int(counts[0]) == int(free.sum(1).min())
    assert not (same & ~(torch.arange(max(lengths))[None, :] < lengths_t[:, None])).any()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4).flatmap(
        lambda b: st.integers(1, 12).flatmap(
            lambda t: st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)
        )
    ),
    k=st.integers(1, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_distractors_of_any_shape_are_reproducible_ordered_and_self_only_for_lone_frames(
    rows: list[list[bool]], k: int, seed: int
) -> None:
    mask = torch.tensor(rows)
    target, distractors = sample_distractors(mask, k, torch.Generator().manual_seed(seed))
    again = sample_distractors(mask, k, torch.Generator().manual_seed(seed))
    assert torch.equal(target, again[0]) and torch.equal(distractors, again[1])
    assert torch.equal(target, mask.reshape(-1).nonzero().squeeze(-1))  # utterance-major order
    width = mask.size(1)
    for i, tgt in enumerate(target.tolist()):
        utt = tgt // width
        n = int(mask[utt].sum())
        row = distractors[i].tolist()
        if n == 1:
            assert row == [tgt] * k  # no other frame: points at itself (masked to -inf downstream)
        else:
            assert tgt not in row and all(mask.reshape(-1)[j] and j // width == utt for j in row)
