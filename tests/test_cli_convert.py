"""`speechvq convert` on the command line: wav2vec 2.0 and CTC, both directions with transformers."""

from __future__ import annotations

import torch

from speechvq import build_wav2vec2, preset
from speechvq.cli import main
from speechvq.io import load_pretrained, save_pretrained
from speechvq.models.ctc import (
    build_ctc_model,
    ctc_config_from_wav2vec2,
    load_ctc_pretrained,
    save_ctc_pretrained,
)
from speechvq.text.vocab import Vocabulary


def test_convert_speechvq_to_hf_and_back_is_lossless(tmp_path):
    model = build_wav2vec2(preset("tiny"))
    model.set_num_updates_(77)
    save_pretrained(model, tmp_path / "sv")
    assert (
        main(["convert", str(tmp_path / "sv"), str(tmp_path / "hf"), "--from", "speechvq", "--to", "hf"]) == 0
    )
    assert (tmp_path / "hf" / "config.json").is_file() and (
        tmp_path / "hf" / "preprocessor_config.json"
    ).is_file()
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "hf", "--to", "speechvq"])
        == 0
    )
    back = load_pretrained(tmp_path / "back")
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_convert_ctc_model_round_trips_through_transformers(tmp_path):
    vocab = Vocabulary.letters(["HELLO WORLD", "A CAT"])
    model = build_ctc_model(ctc_config_from_wav2vec2(preset("tiny"), len(vocab))).eval()
    save_ctc_pretrained(model, vocab, tmp_path / "sv")
    assert (
        main(["convert", str(tmp_path / "sv"), str(tmp_path / "hf"), "--from", "speechvq", "--to", "hf"]) == 0
    )
    from transformers import Wav2Vec2ForCTC

    hf = Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    x = torch.randn(1, 8000)
    with torch.no_grad():
        ours = model(x).logits
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (
        main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--from", "hf", "--to", "speechvq"])
        == 0
    )
    back, back_vocab = load_ctc_pretrained(tmp_path / "back")
    assert back_vocab.hf_vocab() == vocab.hf_vocab()
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_convert_reports_a_bad_source_in_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(
        ["convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--from", "speechvq", "--to", "hf"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "not a speechvq model directory" in err and str(tmp_path / "empty") in err
