from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speechvq.cli import main
from speechvq.data import AudioDataset, collate_audio
from speechvq.errors import UserInputError
from speechvq.io import save_pretrained
from speechvq.models.wav2vec2 import Wav2Vec2Model
from speechvq.units.export import (
    TRANSFORMER_INPUT,
    codes_to_tokens,
    consecutive_batches,
    dump_features,
    export_units,
    layer_features,
    parse_layer,
)
from speechvq.units.io import read_units
from speechvq.units.kmeans import KMeansModel, iter_shard_utterances


def _reference_codes(model: Wav2Vec2Model, manifest: Path) -> list[torch.Tensor | None]:
    """Each utterance quantized alone: codes ``[T, G]`` (None for one too short for a frame)."""
    ds = AudioDataset(manifest, random_crop=False)
    out = []
    for i in range(len(ds)):
        b = collate_audio([ds[i]])
        if int(b.lengths[0]) < 400:
            out.append(None)
            continue
        q, n = model.quantize(b.waveforms, b.lengths)
        out.append(q.codes[0, : int(n[0])])
    return out


def test_consecutive_batches_respect_both_budgets() -> None:
    sizes = np.array([5, 5, 9, 1, 1, 1, 20])
    batches = consecutive_batches(sizes, max_tokens=18, max_items=3)
    assert [i for b in batches for i in b] == list(range(7))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * sizes[b].max() <= 18)


def test_codes_to_tokens_formats() -> None:
    codes = torch.tensor([[1, 2], [0, 15]])
    assert codes_to_tokens(codes, 16, joint=False) == ["1-2", "0-15"]
    assert codes_to_tokens(codes, 16, joint=True) == [1 * 16 + 2, 15]


@pytest.mark.parametrize("joint", [False, True])
def test_export_codes_equal_quantizer_argmax_codes(
    tiny_model: Wav2Vec2Model, manifest: Path, tmp_path: Path, joint: bool
) -> None:
    meta = export_units(tiny_model, manifest, tmp_path / "u", kind="codes", joint=joint, max_items=3)
    units = read_units(tmp_path / "u")
    refs = _reference_codes(tiny_model, manifest)
    assert len(units) == len(refs) == 7 and meta["num_utterances"] == 7
    v = tiny_model.quantizer.codebook_size
    for i, ref in enumerate(refs):
        if ref is None:
            assert units.frames(i) == []
        else:
            assert units.frames(i) == [str(t) for t in codes_to_tokens(ref, v, joint)]
    assert units.utterances[1] == "spk/utt001.wav"
    assert units.meta["frame_stride_s"] == pytest.approx(320 / 16000)
    # frame 0 sees the CNN's first 400 samples: its labels are read at their middle
    assert units.meta["frame_centre_s"] == pytest.approx(200 / 16000) == meta["frame_centre_s"]
    assert units.meta["vocab_size"] == (v * v if joint else None)


def test_export_dedup_expands_back_to_the_frame_sequence(
    tiny_model: Wav2Vec2Model, manifest: Path, tmp_path: Path
) -> None:
    export_units(tiny_model, manifest, tmp_path / "full", kind="codes", joint=True)
    export_units(tiny_model, manifest, tmp_path / "dd", kind="codes", joint=True, dedup=True)
    full, dd = read_units(tmp_path / "full"), read_units(tmp_path / "dd")
    assert dd.durations is not None
    assert [dd.frames(i) for i in range(7)] == [full.frames(i) for i in range(7)]
    assert sum(map(len, dd.tokens)) <= sum(map(len, full.tokens))


def test_export_batching_does_not_change_the_units(
    tiny_model: Wav2Vec2Model, manifest: Path, tmp_path: Path
) -> None:
    centroids = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32)
    km = KMeansModel(centroids=centroids, meta={})
    export_units(tiny_model, manifest, tmp_path / "a", kind="kmeans", layer=2, kmeans=km, max_items=1)
    export_units(tiny_model, manifest, tmp_path / "b", kind="kmeans", layer=2, kmeans=km, max_items=7)
    a, b = read_units(tmp_path / "a"), read_units(tmp_path / "b")
    assert a.tokens == b.tokens and sum(map(len, a.tokens)) > 0
    feats, n = layer_features(tiny_model, torch.randn(1, 4000), torch.tensor([4000]), 2)
    assert feats.shape == (1, int(n[0]), 32)
    # a block's features on a padded batch are the model's own extract_features at valid frames
    waves, lengths = torch.randn(2, 4000), torch.tensor([4000, 2600])
    with torch.no_grad():
        hidden, frames = tiny_model.extract_features(waves, lengths)
    for layer in (1, 2):
        feats, n = layer_features(tiny_model, waves, lengths, layer)
        assert torch.equal(n, frames)
        for b in range(2):
            torch.testing.assert_close(
                feats[b, : int(n[b])], hidden[layer - 1][b, : int(n[b])], atol=1e-6, rtol=0
            )


def test_dump_features_streams_all_frames_in_bounded_shards(
    tiny_model: Wav2Vec2Model, manifest: Path, tmp_path: Path
) -> None:
    writer = dump_features(tiny_model, manifest, 1, tmp_path / "f", shard_size=12, max_items=2)
    lengths = [len(u) for u in iter_shard_utterances(tmp_path / "f")]
    assert len(lengths) == 6  # the item shorter than a frame has no features
    longest = max(lengths)
    assert writer.num_rows == sum(lengths) > 2 * writer.shard_size
    assert writer.max_rows_held <= max(writer.shard_size, longest)
    assert tiny_model.frame_stride == 320


def test_cli_fit_kmeans_then_export_then_quality(
    tiny_model: Wav2Vec2Model, manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_pretrained(tiny_model, tmp_path / "model")
    km_dir, units_dir = tmp_path / "km", tmp_path / "units"
    argv = ["fit-kmeans", str(tmp_path / "model"), str(manifest), "--layer", "1", "--k", "4"]
    assert main([*argv, "--out", str(km_dir), "--shard-size", "20", "--n-init", "1", "--max-iter", "5"]) == 0
    assert KMeansModel.load(km_dir).meta["layer"] == 1
    argv = ["export-units", str(tmp_path / "model"), str(manifest), "--out", str(units_dir)]
    assert main([*argv, "--kind", "kmeans", "--layer", "1", "--km", str(km_dir), "--dedup"]) == 0
    units = read_units(units_dir)
    assert len(units) == 7 and {t for i in range(7) for t in units.frames(i)} <= {"0", "1", "2", "3"}
    # alignments: one phone per 0.1 s, beside the audio
    root = manifest.parent
    for rel in units.utterances:
        (root / rel).with_suffix(".phones").write_text(
            "".join(f"{k / 10} {(k + 1) / 10} p{k % 3}\n" for k in range(5))
        )
    capsys.readouterr()
    assert main(["unit-quality", str(units_dir), str(root), "--json", str(tmp_path / "q.json")]) == 0
    assert "PNMI" in capsys.readouterr().out
    assert (
        main(["export-units", str(tmp_path / "model"), str(manifest), "--out", "x", "--kind", "kmeans"]) == 2
    )
    # the named layer, through both commands
    argv = ["fit-kmeans", str(tmp_path / "model"), str(manifest), "--layer", "transformer_input", "--k", "3"]
    assert main([*argv, "--out", str(tmp_path / "km_in"), "--n-init", "1", "--max-iter", "5"]) == 0
    assert KMeansModel.load(tmp_path / "km_in").meta["layer"] == "transformer_input"
    argv = ["export-units", str(tmp_path / "model"), str(manifest), "--out", str(tmp_path / "u_in")]
    assert (
        main([*argv, "--kind", "kmeans", "--layer", "transformer_input", "--km", str(tmp_path / "km_in")])
        == 0
    )
    assert read_units(tmp_path / "u_in").meta["layer"] == "transformer_input"
    assert main([*argv, "--kind", "kmeans", "--layer", "top", "--km", str(tmp_path / "km_in")]) == 2


def _other_models() -> dict[str, torch.nn.Module]:
    from speechvq.config import (
        VQ_WAV2VEC_CONV_LAYERS,
        KMeansQuantizerConfig,
        QuantizerConfig,
        VqWav2VecConfig,
        wav2vec2_tiny,
    )
    from speechvq.models.ctc import build_ctc_model, ctc_config_from_wav2vec2
    from speechvq.models.vq_wav2vec import build_vq_wav2vec

    vq = VqWav2VecConfig(
        encoder_layers=tuple((32, k, s) for _, k, s in VQ_WAV2VEC_CONV_LAYERS),
        aggregator_layers=tuple((32, k, 1) for k in range(2, 6)),
        quantizer=QuantizerConfig(codebook_size=16, codevector_dim=32, combine_groups=True),
        kmeans=KMeansQuantizerConfig(codebook_size=16, codevector_dim=32),
    )
    return {
        "vq_wav2vec": build_vq_wav2vec(vq).eval(),
        "ctc": build_ctc_model(ctc_config_from_wav2vec2(wav2vec2_tiny(), 8)).eval(),
    }


@torch.no_grad()
def test_transformer_input_is_the_input_of_block_1(tiny_model: Wav2Vec2Model) -> None:
    # a padded batch: each utterance's frames equal those of the unmasked forward's hidden_states[0]
    # (transformers' hidden_states[0]: projection, positional conv, LayerNorm) run on it alone
    waves, lengths = torch.randn(2, 4000), torch.tensor([4000, 2600])
    feats, n = layer_features(tiny_model, waves, lengths, TRANSFORMER_INPUT)
    for b in range(2):
        alone = waves[b : b + 1, : int(lengths[b])]
        frames = tiny_model.encode(alone, None)[0].size(1)
        out = tiny_model(alone, mask=torch.zeros(1, frames, dtype=torch.bool))
        torch.testing.assert_close(feats[b, : int(n[b])], out.hidden_states[0][0], atol=1e-5, rtol=0)
        block1, _ = layer_features(tiny_model, alone, None, 1)
        assert not torch.allclose(block1[0], out.hidden_states[0][0])
    assert parse_layer("transformer_input") == TRANSFORMER_INPUT and parse_layer("3") == 3
    with pytest.raises(UserInputError, match="a layer number or 'transformer_input'"):
        parse_layer("top")


def test_export_supports_vq_wav2vec_codes_and_ctc_layers(manifest: Path, tmp_path: Path) -> None:
    models = _other_models()
    vq = models["vq_wav2vec"]
    export_units(vq, manifest, tmp_path / "vq", kind="codes")
    units = read_units(tmp_path / "vq")
    assert units.meta["frame_stride_s"] == pytest.approx(160 / 16000)
    refs = _reference_codes(vq, manifest)
    for i, ref in enumerate(refs):
        if ref is not None and int(AudioDataset(manifest)[i]["waveform"].numel()) >= 465:
            assert units.frames(i) == codes_to_tokens(ref, 16, joint=False)
    feats, n = layer_features(vq, torch.randn(2, 4000), torch.tensor([4000, 3000]), 1)
    assert feats.shape[:2] == (2, int(n.max())) and n.tolist()[1] < n.tolist()[0]
    ctc = models["ctc"]
    for layer in (0, 1, 2):
        feats, n = layer_features(ctc, torch.randn(2, 4000), torch.tensor([4000, 3000]), layer)
        assert feats.shape == (2, int(n[0]), 32 if layer else ctc.cfg.encoder.out_channels)
    with pytest.raises(Exception, match="--layer must be in"):
        layer_features(ctc, torch.randn(1, 4000), torch.tensor([4000]), 3)
    feats, n = layer_features(ctc, torch.randn(2, 4000), torch.tensor([4000, 3000]), TRANSFORMER_INPUT)
    assert feats.shape == (2, int(n[0]), 32)
    with pytest.raises(UserInputError, match="has no Transformer"):
        layer_features(vq, torch.randn(1, 4000), torch.tensor([4000]), TRANSFORMER_INPUT)


def test_export_codes_raises_for_a_model_without_quantizer(manifest: Path, tmp_path: Path) -> None:
    from speechvq.errors import UserInputError

    with pytest.raises(UserInputError, match="has no quantizer"):
        export_units(_other_models()["ctc"], manifest, tmp_path / "u", kind="codes")
