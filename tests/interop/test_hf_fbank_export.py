"""Log-mel models exported to transformers load outside speechvq (``trust_remote_code``, in a
process where speechvq cannot be imported) and, with speechvq, through the registered Auto
classes; their outputs equal speechvq's."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from speechvq import build_wav2vec2, preset
from speechvq.cli import main
from speechvq.io import save_pretrained
from speechvq.models.ctc import build_ctc_model, ctc_config_from_wav2vec2, save_ctc_pretrained
from speechvq.text.vocab import Vocabulary
from speechvq.units.export import layer_features

TOL = 2e-5
"""Largest |transformers - speechvq| / max |speechvq| per utterance and layer: float32 with another op
order (measured 2.0e-7 post-LN, 1.1e-7 pre-LN)."""


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _fbank_cfg(layer_norm_first: bool):  # type: ignore[no-untyped-def]
    cfg = preset("tiny")
    cfg.encoder = dataclasses.replace(cfg.encoder, kind="fbank")
    cfg.context = dataclasses.replace(cfg.context, layer_norm_first=layer_norm_first)
    return cfg


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its init (LayerNorms of ones, zero biases would hide mistakes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([24000, 17123, 9000])
    waves = torch.randn(3, 24000, generator=g) * 0.1
    for i, n in enumerate(lengths.tolist()):
        waves[i, n:] = 0.0
    return waves, lengths


def _mask(waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return (torch.arange(waves.size(1))[None, :] < lengths[:, None]).long()


def _speechvq_states(
    model: torch.nn.Module, waves: torch.Tensor, lengths: torch.Tensor
) -> list[torch.Tensor]:
    """Transformer input, then every block's output, ``[B, T, D]`` each."""
    with torch.no_grad():
        first, _ = layer_features(model, waves, lengths, "transformer_input")
        blocks, _ = model.extract_features(waves, lengths)
    return [first, *blocks]


def _close(hf: torch.Tensor, ref: torch.Tensor, frames: torch.Tensor) -> None:
    for b, n in enumerate(frames.tolist()):
        diff = float((hf[b, :n] - ref[b, :n]).abs().max() / ref[b, :n].abs().max())
        assert diff < TOL, (b, diff)


OUTSIDE = textwrap.dedent("""\
    import importlib.abc, json, sys
    import numpy as np, torch

    class NoSpeechvq(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "speechvq" or name.startswith("speechvq."):
                raise ImportError("speechvq is not importable here")
            return None

    sys.meta_path.insert(0, NoSpeechvq())
    from transformers import AutoModel

    export, data, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
    batch = np.load(data)
    with torch.no_grad():
        result = model(torch.from_numpy(batch["waves"]), attention_mask=torch.from_numpy(batch["mask"]),
                       output_hidden_states=True)
    np.savez(out, *[h.numpy() for h in result.hidden_states], last=result.last_hidden_state.numpy(),
             frames=result.frame_lengths.numpy())
    print(type(model).__module__, type(model).__name__)
    """)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_a_log_mel_model_exported_to_transformers_loads_without_speechvq_and_gives_its_outputs(
    tmp_path: Path, layer_norm_first: bool
) -> None:
    torch.manual_seed(0)
    model = _perturbed(build_wav2vec2(_fbank_cfg(layer_norm_first)))
    save_pretrained(model, tmp_path / "sv")
    assert (
        main(["convert", str(tmp_path / "sv"), str(tmp_path / "hf"), "--from", "speechvq", "--to", "hf"]) == 0
    )
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == "speechvq-fbank-wav2vec2" and "AutoModel" in config["auto_map"]
    waves, lengths = _batch()
    np.savez(tmp_path / "batch.npz", waves=waves.numpy(), mask=_mask(waves, lengths).numpy())
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    script = [
        sys.executable,
        "-c",
        OUTSIDE,
        str(tmp_path / "hf"),
        str(tmp_path / "batch.npz"),
        str(tmp_path / "out.npz"),
    ]
    done = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.split()[1] == "SpeechvqFbankModel"
        and "speechvq" not in done.stdout.split()[0].split(".")[0]
    )
    out = np.load(tmp_path / "out.npz")
    ref = _speechvq_states(model, waves, lengths)
    frames = torch.from_numpy(out["frames"])
    assert frames.tolist() == model.feature_encoder.output_lengths(lengths).tolist()
    for i, r in enumerate(ref):
        _close(torch.from_numpy(out[f"arr_{i}"]), r, frames)
    # with speechvq: the registered Auto classes, no remote code
    from transformers import AutoModel

    import speechvq.interop.hf_fbank  # noqa: F401

    local = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert type(local).__module__ == "speechvq.interop.modeling_speechvq_fbank"
    with torch.no_grad():
        hidden = local(waves, attention_mask=_mask(waves, lengths), output_hidden_states=True).hidden_states
    for h, r in zip(hidden, ref, strict=True):
        _close(h, r, frames)


def test_a_log_mel_ctc_model_exported_to_transformers_gives_its_logits_and_transcribes_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCTC

    import speechvq.interop.hf_fbank  # noqa: F401

    vocab = Vocabulary.letters(["ABC DEF"])
    cfg = ctc_config_from_wav2vec2(_fbank_cfg(False), len(vocab))
    torch.manual_seed(0)
    model = _perturbed(build_ctc_model(cfg))
    save_ctc_pretrained(model, vocab, tmp_path / "sv")
    assert (
        main(["convert", str(tmp_path / "sv"), str(tmp_path / "hf"), "--from", "speechvq", "--to", "hf"]) == 0
    )
    assert (tmp_path / "hf/modeling_speechvq_fbank.py").is_file() and (tmp_path / "hf/vocab.json").is_file()
    waves, lengths = _batch()
    hf = AutoModelForCTC.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ref = model(waves, lengths)
        got = hf(waves, attention_mask=_mask(waves, lengths))
    _close(got.logits, ref.logits, ref.lengths)
    # speechvq reads the export back (convert --from hf, transcribe) with the same weights
    import soundfile as sf

    sf.write(tmp_path / "a.wav", waves[1, : int(lengths[1])].numpy(), 16000, subtype="FLOAT")
    for directory in ("sv", "hf"):
        assert main(["transcribe", str(tmp_path / directory), str(tmp_path / "a.wav")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == printed[1]
