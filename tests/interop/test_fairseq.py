"""fairseq import / export, checked against outputs fairseq itself produced.

The fixtures in tests/fixtures/fairseq were written by tools/make_fairseq_fixtures.py with
fairseq (the ``fairseq-fixed`` build, see its manifest.json); these tests do not need fairseq.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechvq.config import wav2vec2_tiny
from speechvq.errors import UserInputError
from speechvq.interop.fairseq import import_fairseq, save_fairseq_checkpoint, speechvq_to_fairseq
from speechvq.interop.fairseq_checkpoint import fairseq_model_kind, load_fairseq_checkpoint
from speechvq.interop.fairseq_config import _eval_layers
from speechvq.models.ctc import CtcModel
from speechvq.models.vq_wav2vec import VqWav2VecModel
from speechvq.models.wav2vec2 import Wav2Vec2Model, build_wav2vec2

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fairseq"
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors the fixtures hold, computed by speechvq (eval mode, no masking)."""
    with torch.no_grad():
        if isinstance(model, VqWav2VecModel):
            features, lengths, q = model.encode(x)
            return {
                "features": features,
                "codes": q.codes,
                "quantized": q.quantized,
                "context": model.aggregate(q.quantized, lengths),
            }
        features, _ = model.feature_encoder(x)
        projected, normed = model.feature_projection(features)
        out = {"features": features, "context": model.context(projected).last_hidden_state}
        if isinstance(model, CtcModel):
            out["logits"] = model(x).logits
        else:
            out["codes"] = model.quantizer(normed).codes
        return out


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("w2v2_base", Wav2Vec2Model),
        ("w2v2_large", Wav2Vec2Model),
        ("w2v2_ctc", CtcModel),
        ("vq_gumbel", VqWav2VecModel),
        ("vq_kmeans", VqWav2VecModel),
    ],
)
def test_imported_checkpoint_reproduces_fairseq_outputs(name: str, cls: type) -> None:
    model = import_fairseq(FIXTURES / f"{name}.pt")
    assert isinstance(model, cls)
    ref = load_file(str(FIXTURES / f"{name}.safetensors"))
    got = _outputs(model, ref["input"])
    for key, value in got.items():
        assert value.shape == ref[key].shape, key
        if key == "codes":
            assert torch.equal(value, ref[key].to(value.dtype)), key
        else:
            torch.testing.assert_close(value, ref[key], atol=ATOL, rtol=0, msg=key)


def test_fixture_layouts_cover_base_and_large() -> None:
    base = import_fairseq(FIXTURES / "w2v2_base.pt")
    large = import_fairseq(FIXTURES / "w2v2_large.pt")
    assert (base.cfg.encoder.norm_mode, base.cfg.context.layer_norm_first) == ("group_norm", False)
    assert (large.cfg.encoder.norm_mode, large.cfg.encoder.conv_bias) == ("layer_norm", True)
    assert large.cfg.context.layer_norm_first
    assert base.cfg.loss.diversity_weight == 0.1 and base.cfg.loss.feature_penalty_weight == 10.0


@pytest.mark.parametrize("name", ["vq_gumbel", "vq_kmeans"])
def test_vq_wav2vec_loss_matches_fairseq_with_its_negatives(name: str) -> None:
    model = import_fairseq(FIXTURES / f"{name}.pt")
    ref = load_file(str(FIXTURES / f"{name}.safetensors"))
    with torch.no_grad():
        out = model(ref["input"], distractor_index=ref["distractors"])
        loss = model.compute_loss(out)
    batch, frames, k = ref["distractors"].shape
    # fairseq's flat cpc_logits: per step, (copies, B, T - offset) -> ours (B * (T - offset), copies)
    chunks, start = [], 0
    for step in range(model.cfg.prediction_steps):
        n = batch * (frames - model.offset - step)
        chunks.append(ref["cpc_logits"][start : start + n * (k + 1)].view(k + 1, n).T)
        start += n * (k + 1)
    assert start == ref["cpc_logits"].numel()
    torch.testing.assert_close(out.logits, torch.cat(chunks), atol=ATOL, rtol=0)
    torch.testing.assert_close(loss.contrastive, ref["loss"], atol=1e-3, rtol=1e-6)
    if "kmeans_loss" in ref:
        torch.testing.assert_close(out.quantizer.loss, ref["kmeans_loss"], atol=ATOL, rtol=0)
        assert loss.diversity == pytest.approx(out.num_targets * float(ref["kmeans_loss"]), rel=1e-5)


def test_imported_base_through_transformers_matches_fairseq() -> None:
    import speechvq.interop.hf as hf

    model = import_fairseq(FIXTURES / "w2v2_base.pt")
    ref = load_file(str(FIXTURES / "w2v2_base.safetensors"))
    hf_model = hf.to_hf(model).eval()
    with torch.no_grad():
        out = hf_model.wav2vec2(ref["input"])
    # transformers returns the encoder features after the projection's LayerNorm
    normed = torch.nn.functional.layer_norm(
        ref["features"],
        (ref["features"].size(-1),),
        *hf_model.wav2vec2.feature_projection.layer_norm.parameters(),
    )
    torch.testing.assert_close(out.extract_features, normed, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, ref["context"], atol=ATOL, rtol=0)


def _tiny_exportable() -> Wav2Vec2Model:
    cfg = wav2vec2_tiny()
    cfg.context.dim = 48  # differs from the encoder width, so fairseq has a post_extract_proj too
    model = build_wav2vec2(cfg)
    model.set_num_updates_(1234)
    return model


def test_speechvq_to_fairseq_to_speechvq_is_lossless(tmp_path: Path) -> None:
    model = _tiny_exportable()
    path = save_fairseq_checkpoint(model, tmp_path / "exported.pt")
    back = import_fairseq(path)
    assert back.cfg == model.cfg
    original, restored = model.state_dict(), back.state_dict()
    assert sorted(original) == sorted(restored)
    for key, value in original.items():
        assert torch.equal(value, restored[key]), key


def test_export_of_imported_fairseq_model_restores_its_state_dict() -> None:
    ckpt = load_fairseq_checkpoint(FIXTURES / "w2v2_base.pt")
    model = import_fairseq(FIXTURES / "w2v2_base.pt")
    exported = speechvq_to_fairseq(model)["model"]
    assert sorted(exported) == sorted(ckpt["model"])
    for key, value in ckpt["model"].items():
        assert torch.equal(exported[key], value), key


def test_export_was_loaded_and_matched_by_fairseq() -> None:
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    for mode in ("group_norm", "layer_norm", "vq_gumbel", "vq_kmeans"):  # tools/make_fairseq_fixtures.py
        check = manifest["export_check"][mode]
        assert check["loaded_by"].startswith("fairseq.")
        assert max(check["max_abs_diff"].values()) <= ATOL


def test_exported_checkpoint_loads_with_plain_weights_only(tmp_path: Path) -> None:
    path = save_fairseq_checkpoint(_tiny_exportable(), tmp_path / "exported.pt")
    state = torch.load(path, weights_only=True)  # what fairseq's own loader does under torch >= 2.6
    assert state["cfg"]["model"]["_name"] == "wav2vec2"


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "args": _Exploit(marker)}, path)
    with pytest.raises(UserInputError, match=r"evil\.pt: refused to load.*(system|posix)"):
        import_fairseq(path)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_plain.pt"
    path.write_bytes(pickle.dumps({"model": _Exploit(marker)}, protocol=2))
    with pytest.raises(UserInputError, match=r"refused to load|not a readable"):
        load_fairseq_checkpoint(path)
    assert not marker.exists()


def test_omegaconf_checkpoint_loads() -> None:
    import omegaconf  # noqa: F401  (a dev dependency)

    model = import_fairseq(FIXTURES / "w2v2_base_omegaconf.pt")
    ref = load_file(str(FIXTURES / "w2v2_base.safetensors"))
    torch.testing.assert_close(_outputs(model, ref["input"])["context"], ref["context"], atol=ATOL, rtol=0)


def test_omegaconf_checkpoint_without_omegaconf_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # as if it were not installed
    with pytest.raises(UserInputError, match=r"refused to load.*install omegaconf"):
        load_fairseq_checkpoint(FIXTURES / "w2v2_base_omegaconf.pt")


def test_non_checkpoint_and_missing_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(UserInputError, match=r"junk\.pt"):
        load_fairseq_checkpoint(junk)
    with pytest.raises(UserInputError, match="no such"):
        load_fairseq_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserInputError, match="not a fairseq checkpoint"):
        load_fairseq_checkpoint(tmp_path / "other.pt")


def test_unsupported_fairseq_model_is_refused_by_name() -> None:
    ckpt = load_fairseq_checkpoint(FIXTURES / "w2v2_base.pt")
    ckpt["cfg"]["model"]["_name"] = "hubert"
    with pytest.raises(UserInputError, match="hubert"):
        fairseq_model_kind(ckpt)


def test_layer_strings_are_parsed_without_eval() -> None:
    assert _eval_layers("[(512, 10, 5)] + [(512, 3, 2)] * 2", "x") == ((512, 10, 5), (512, 3, 2), (512, 3, 2))
    with pytest.raises(UserInputError, match="conv_feature_layers"):
        _eval_layers("__import__('os').system('true')", "conv_feature_layers")


def test_convert_cli_imports_and_exports_fairseq(tmp_path: Path) -> None:
    from speechvq.cli import main
    from speechvq.io import load_pretrained

    assert (
        main(
            [
                "convert",
                str(FIXTURES / "vq_kmeans.pt"),
                str(tmp_path / "vq"),
                "--from",
                "fairseq",
                "--to",
                "speechvq",
            ]
        )
        == 0
    )
    vq = load_pretrained(tmp_path / "vq")
    assert isinstance(vq, VqWav2VecModel) and vq.cfg.quantizer_type == "kmeans"
    assert (
        main(
            [
                "convert",
                str(FIXTURES / "w2v2_base.pt"),
                str(tmp_path / "sv"),
                "--from",
                "fairseq",
                "--to",
                "speechvq",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "convert",
                str(tmp_path / "sv"),
                str(tmp_path / "back.pt"),
                "--from",
                "speechvq",
                "--to",
                "fairseq",
            ]
        )
        == 0
    )
    back = import_fairseq(tmp_path / "back.pt")
    original = import_fairseq(FIXTURES / "w2v2_base.pt")
    for key, value in original.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    hf_args = [
        "convert",
        str(FIXTURES / "w2v2_base.pt"),
        str(tmp_path / "hf"),
        "--from",
        "fairseq",
        "--to",
        "hf",
    ]
    assert main(hf_args) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    # vq-wav2vec back to fairseq: the same weights as the checkpoint it came from
    argv = ["convert", str(tmp_path / "vq"), str(tmp_path / "vq.pt"), "--from", "speechvq", "--to", "fairseq"]
    assert main(argv) == 0
    exported = load_fairseq_checkpoint(tmp_path / "vq.pt")["model"]
    original = load_fairseq_checkpoint(FIXTURES / "vq_kmeans.pt")["model"]
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["vq_gumbel", "vq_kmeans"])
def test_vq_wav2vec_exports_fairseqs_own_weights_and_config(name: str, tmp_path: Path) -> None:
    # fairseq's checkpoint -> speechvq -> fairseq: every tensor of fairseq's state dict, under its
    # own name and layout, and the config fields fairseq's Wav2VecModel is built from
    ckpt = load_fairseq_checkpoint(FIXTURES / f"{name}.pt")
    model = import_fairseq(FIXTURES / f"{name}.pt")
    out = speechvq_to_fairseq(model)
    assert out["model"].keys() == ckpt["model"].keys()
    for key, value in ckpt["model"].items():
        assert torch.equal(out["model"][key], value), key
    args = vars(ckpt["args"])
    section = out["cfg"]["model"]
    assert section["_name"] == "wav2vec" and out["cfg"]["criterion"]["infonce"] is False
    for field in ("vq_type", "vq_vars", "vq_groups", "vq_depth", "combine_groups", "activation", "prediction_steps",
                  "num_negatives", "skip_connections_agg", "skip_connections_feat", "log_compression",
                  "agg_zero_pad", "residual_scale", "offset"):  # fmt: skip
        assert section[field] == args[field], field
    for field in ("conv_feature_layers", "conv_aggregator_layers"):
        assert _eval_layers(section[field], field) == _eval_layers(args[field], field)
    # and back: the same model, outputs included
    path = save_fairseq_checkpoint(model, tmp_path / "vq.pt")
    again = import_fairseq(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    ref = load_file(str(FIXTURES / f"{name}.safetensors"))
    for key, value in _outputs(again, ref["input"]).items():
        assert torch.equal(value, _outputs(model, ref["input"])[key]), key
