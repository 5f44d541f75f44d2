"""Bounded work on hostile files: archive extraction limits and bounded parsing of configs found in
checkpoints and YAML files. Each refusal comes before the expensive work (decompressing, allocating)."""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hostile_inputs import billion_laughs, gzip_bomb, tar_gz
from hypothesis import given, settings
from hypothesis import strategies as st

from speechvq.config import MAX_PARAMETERS, wav2vec2_base
from speechvq.configio import MAX_YAML_NODES, parse_yaml
from speechvq.data.download import ExtractLimits, safe_extract
from speechvq.errors import UserInputError
from speechvq.interop.fairseq_config import MAX_LAYER_SPECS, _eval_layers


def _nothing_extracted(target: Path) -> bool:
    return not target.exists() or not any(target.iterdir())


def test_a_decompression_bomb_is_refused_from_its_header_before_it_is_decompressed(tmp_path: Path) -> None:
    bomb = gzip_bomb(tmp_path / "bomb.tar.gz", 128 << 20)  # 128 MiB of zeros in ~0.13 MB
    assert bomb.stat().st_size < 256 << 10
    start = time.perf_counter()
    with pytest.raises(UserInputError, match=r"bomb\.tar\.gz: refusing to extract: .* times its size"):
        safe_extract(bomb, tmp_path / "t")
    assert time.perf_counter() - start < 5  # the header said it: nothing was inflated to find out
    assert _nothing_extracted(tmp_path / "t")


def test_extraction_limits_on_total_bytes_and_member_count(tmp_path: Path) -> None:
    archive = tar_gz(tmp_path / "a.tar.gz", {f"d/{i}.txt": b"x" * 100 for i in range(20)})
    with pytest.raises(UserInputError, match="more than 10 members"):
        safe_extract(archive, tmp_path / "t1", ExtractLimits(max_members=10))
    with pytest.raises(UserInputError, match="more than 1000 bytes"):
        safe_extract(archive, tmp_path / "t2", ExtractLimits(max_total_bytes=1000))
    assert _nothing_extracted(tmp_path / "t1") and _nothing_extracted(tmp_path / "t2")
    assert len(safe_extract(archive, tmp_path / "t3")) == 20  # within the default limits: extracted
    assert (tmp_path / "t3" / "d" / "19.txt").read_bytes() == b"x" * 100


def test_a_member_that_would_overwrite_the_archive_is_refused_and_the_archive_survives(
    tmp_path: Path,
) -> None:
    archive = tar_gz(tmp_path / "x.tar.gz", {"ok.txt": b"fine", "x.tar.gz": b"gotcha"})
    before = archive.read_bytes()
    with pytest.raises(UserInputError, match=r"x\.tar\.gz: would overwrite the archive being read"):
        safe_extract(archive, tmp_path)
    assert archive.read_bytes() == before and not (tmp_path / "ok.txt").exists()


def test_an_extraction_that_fails_half_way_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.txt", "b.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4096
            tar.addfile(info, io.BytesIO(b"y" * 4096))
    path.write_bytes(path.read_bytes()[:6000])  # b.txt's data is cut off
    with pytest.raises(UserInputError, match=r"cut\.tar"):
        safe_extract(path, tmp_path / "t")
    assert _nothing_extracted(tmp_path / "t")


def test_an_archive_needing_more_than_the_free_space_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    archive = tar_gz(tmp_path / "a.tar.gz", {"big.bin": b"z" * 5000})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(UserInputError, match=r"no space left on device: .* needs 5000 bytes, 100 are free"):
        safe_extract(archive, tmp_path / "t")


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.one_of(st.integers(-5, 10**7).map(str), st.just("(512, 10, 5)"), st.just("[(512, 3, 2)]")),
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from([" + ", " * ", " ** ", ", "]), inner).map("".join),
            inner.map(lambda s: f"[{s}]"),
            inner.map(lambda s: f"({s})"),
        ),
        max_leaves=12,
    )
)
def test_fairseq_layer_strings_parse_to_a_bounded_list_or_are_refused_without_allocating(text: str) -> None:
    """Any expression of numbers, tuples, lists, +, * and **: a list of at most MAX_LAYER_SPECS
    layers, or a UserInputError naming the field, never more than a little memory or time."""
    tracemalloc.start()
    try:
        layers = _eval_layers(text, "conv_feature_layers")
    except UserInputError as err:
        assert "conv_feature_layers" in str(err)
        layers = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 8 << 20
    if layers is not None:
        assert len(layers) <= MAX_LAYER_SPECS and all(len(spec) == 3 for spec in layers)


@pytest.mark.parametrize(
    "text",
    [
        "[(512, 10, 5)] * 100000000",
        "[(512, 10, 5)] * 1000 * 1000",
        "1000000 * [(512, 10, 5)]",
        "[(512, 10, 5)] * 10**9",
        "[(512, 10, 5)] * (2 * 3 * 1000)",
        "[" * 10_000 + "]" * 10_000,
        "[(512, 10, 5)] + " * 5_000 + "[]",
    ],
)
def test_crafted_fairseq_layer_strings_are_refused(text: str) -> None:
    with pytest.raises(UserInputError, match="conv_feature_layers"):
        _eval_layers(text, "conv_feature_layers")


def test_fairseq_layer_strings_of_real_checkpoints_still_parse() -> None:
    assert (
        _eval_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2", "x")
        == wav2vec2_base().encoder.conv_layers
    )


def test_a_billion_laughs_yaml_is_refused_before_it_is_expanded() -> None:
    with pytest.raises(UserInputError, match=f"expands to more than {MAX_YAML_NODES} values"):
        parse_yaml(billion_laughs(), "c.yaml")
    assert parse_yaml(billion_laughs(levels=3), "c.yaml")["model"] == {"preset": "tiny"}  # 1110 values: fine


def test_a_model_config_beyond_the_parameter_bound_is_refused_before_anything_is_built() -> None:
    from speechvq.config import ContextConfig, Wav2Vec2Config

    with pytest.raises(ValueError, match="at most 1e\\+10 parameters"):
        Wav2Vec2Config(
            context=ContextConfig(dim=65536, num_heads=16, ffn_dim=262144, num_layers=48, pos_conv_groups=16)
        )
    assert MAX_PARAMETERS >= 2 * 10**9  # the largest released wav2vec 2.0 models still load
