"""Export to transformers' Wav2Vec2ForCTC: logits within 1e-4, same text through the pipeline."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
from ctc_toy import SAMPLE_RATE, synthesize, tiny_ctc_config

from speechvq.decoding import greedy_decode
from speechvq.models.ctc import build_ctc_model, normalize_waveforms
from speechvq.text import Vocabulary

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _layer_norm_config(vocab_size: int):
    """LARGE-style: layer-norm conv encoder with bias, pre-LN Transformer, normalised input."""
    cfg = tiny_ctc_config(vocab_size, normalize_waveform=True)
    cfg.encoder = dataclasses.replace(cfg.encoder, norm_mode="layer_norm", conv_bias=True)
    cfg.context = dataclasses.replace(cfg.context, layer_norm_first=True)
    return cfg


@pytest.mark.parametrize("style", ["group_norm", "layer_norm"])
def test_exported_wav2vec2_for_ctc_logits_match_speechvq(tmp_path, style):
    from transformers import Wav2Vec2ForCTC

    from speechvq.interop.hf_ctc import save_hf_ctc

    vocab = Vocabulary.letters(["HELLO WORLD"])
    cfg = tiny_ctc_config(len(vocab)) if style == "group_norm" else _layer_norm_config(len(vocab))
    torch.manual_seed(3)
    model = build_ctc_model(cfg).eval()
    save_hf_ctc(model, vocab, tmp_path / "hf")
    hf = Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf").eval()

    g = torch.Generator().manual_seed(0)
    x = 0.3 * torch.randn(2, 12000, generator=g)
    if style == "layer_norm":  # transformers supports padded batches for layer-norm encoders
        lengths = torch.tensor([12000, 9000])
        x[1, 9000:] = 0.0
    else:
        lengths = torch.tensor([12000, 12000])
    attention = (torch.arange(12000)[None, :] < lengths[:, None]).long()
    inputs = normalize_waveforms(x, lengths) if cfg.normalize_waveform else x
    with torch.no_grad():
        ours = model(x, lengths)
        theirs = hf(inputs, attention_mask=attention).logits
    for i, n in enumerate(ours.lengths.tolist()):
        torch.testing.assert_close(ours.logits[i, :n], theirs[i, :n], atol=ATOL, rtol=0)


def test_pipeline_transcribes_like_speechvq_greedy_decoding(tmp_path, trained, corpus):
    from transformers import pipeline

    from speechvq.interop.hf_ctc import save_hf_ctc

    model, *_ = trained
    save_hf_ctc(model, corpus.vocab, tmp_path / "hf")
    asr = pipeline("automatic-speech-recognition", model=str(tmp_path / "hf"), device="cpu")
    for text in corpus.transcripts:
        sf.write(tmp_path / "a.wav", synthesize(text).numpy(), SAMPLE_RATE, subtype="FLOAT")
        audio, rate = sf.read(tmp_path / "a.wav", dtype="float32")
        with torch.no_grad():
            out = model(torch.from_numpy(audio)[None])
        ours = greedy_decode(out.logits, out.lengths, corpus.vocab)[0]
        theirs = asr({"raw": audio, "sampling_rate": rate})["text"]
        assert ours == text  # the model is overfit: the text is non-empty and right
        assert theirs == ours


def test_exported_tokenizer_decodes_like_the_vocabulary(tmp_path):
    from transformers import Wav2Vec2Processor

    from speechvq.interop.hf_ctc import save_hf_ctc

    vocab = Vocabulary.letters(["THE CAT'S HAT, ISN'T IT? YES. N'T"])
    save_hf_ctc(build_ctc_model(tiny_ctc_config(len(vocab))), vocab, tmp_path / "hf")
    tokenizer = Wav2Vec2Processor.from_pretrained(tmp_path / "hf").tokenizer
    rng = np.random.default_rng(0)
    for _ in range(200):
        path = rng.choice(len(vocab), size=int(rng.integers(0, 30)), p=None).tolist()
        path += [vocab.word_delimiter_id] * int(rng.integers(0, 2))
        assert tokenizer.decode(path) == vocab.decode(path), path


def test_exported_tokenizer_decodes_sentencepiece_vocabularies_like_speechvq(tmp_path):
    from transformers import Wav2Vec2Processor

    from speechvq.interop.hf_ctc import save_hf_ctc

    texts = ["THE CAT SAT ON THE MAT", "A DOG SAT ON A LOG", "THE DOG AND THE CAT"] * 5
    vocab = Vocabulary.train_sentencepiece(texts, vocab_size=30, model_type="bpe")
    save_hf_ctc(build_ctc_model(tiny_ctc_config(len(vocab))), vocab, tmp_path / "hf")
    tokenizer = Wav2Vec2Processor.from_pretrained(tmp_path / "hf").tokenizer
    for text in texts[:3]:
        ids = vocab.encode(text)
        assert tokenizer.decode(ids, group_tokens=False) == vocab.decode(ids, group=False) == text


def test_load_hf_ctc_reads_an_export_back(tmp_path, waves):
    from speechvq.interop.hf_ctc import load_hf_ctc, save_hf_ctc

    x, lengths = waves
    vocab = Vocabulary.letters(["AB"])
    model = build_ctc_model(tiny_ctc_config(len(vocab), normalize_waveform=True)).eval()
    save_hf_ctc(model, vocab, tmp_path / "hf")
    loaded, loaded_vocab = load_hf_ctc(tmp_path / "hf")
    assert loaded.cfg == model.cfg and loaded_vocab.tokens == vocab.tokens
    torch.testing.assert_close(loaded(x, lengths).logits, model(x, lengths).logits)


def test_export_raises_when_the_vocabulary_does_not_fit_the_model(tmp_path):
    from speechvq.interop.hf_ctc import save_hf_ctc

    vocab = Vocabulary.letters(["ABC"])
    with pytest.raises(ValueError, match="`vocab` must have 9 tokens"):
        save_hf_ctc(build_ctc_model(tiny_ctc_config(9)), vocab, tmp_path / "hf")
