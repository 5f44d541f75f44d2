"""``speechvq transcribe``: hypotheses for a manifest or files, WER/CER against references."""

from __future__ import annotations

import soundfile as sf
from ctc_toy import SAMPLE_RATE, synthesize

from speechvq.cli import main
from speechvq.models.ctc import save_ctc_pretrained
from speechvq.text import train_ngram


def _write_corpus(tmp_path, transcripts):
    audio = tmp_path / "audio"
    audio.mkdir()
    lines = [str(audio)]
    for i, text in enumerate(transcripts):
        wave = synthesize(text).numpy()
        sf.write(audio / f"u{i}.wav", wave, SAMPLE_RATE, subtype="FLOAT")
        lines.append(f"u{i}.wav\t{len(wave)}")
    (tmp_path / "test.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.wrd").write_text("".join(t + "\n" for t in transcripts))
    (tmp_path / "test.ltr").write_text(
        "".join(" ".join(" ".join(w) + " |" for w in t.split()) + "\n" for t in transcripts)
    )


def test_transcribe_writes_hypotheses_and_reports_wer_and_cer(tmp_path, trained, corpus, capsys):
    model, *_ = trained
    save_ctc_pretrained(model, corpus.vocab, tmp_path / "model")
    _write_corpus(tmp_path, corpus.transcripts)
    args = ["transcribe", str(tmp_path / "model"), str(tmp_path / "test.tsv"), "--labels"]
    assert main([*args, str(tmp_path / "test.wrd"), "--out", str(tmp_path / "hyp.wrd")]) == 0
    assert (tmp_path / "hyp.wrd").read_text().splitlines() == corpus.transcripts
    assert "WER 0.00%" in capsys.readouterr().out

    assert main([*args, str(tmp_path / "test.ltr"), "--beam", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"u{i}.wav\t{t}" for i, t in enumerate(corpus.transcripts)]
    assert "WER 0.00%" in captured.err and "CER 0.00%" in captured.err


def test_transcribe_reads_audio_files_an_lm_and_a_transformers_export(tmp_path, trained, corpus, capsys):
    from speechvq.interop.hf_ctc import save_hf_ctc

    model, *_ = trained
    save_hf_ctc(model, corpus.vocab, tmp_path / "hf")
    _write_corpus(tmp_path, corpus.transcripts)
    train_ngram([t.split() for t in corpus.transcripts], order=2).save(tmp_path / "lm.arpa")
    wavs = [str(tmp_path / "audio" / f"u{i}.wav") for i in range(2)]
    assert main(["transcribe", str(tmp_path / "hf"), *wavs, "--lm", str(tmp_path / "lm.arpa")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{w}\t{t}" for w, t in zip(wavs, corpus.transcripts)]


def test_transcribe_tunes_the_lm_weights_over_a_grid_with_a_lexicon(tmp_path, trained, corpus, capsys):
    model, *_ = trained
    save_ctc_pretrained(model, corpus.vocab, tmp_path / "model")
    _write_corpus(tmp_path, corpus.transcripts)
    train_ngram([t.split() for t in corpus.transcripts], order=2).save(tmp_path / "lm.arpa")
    args = [
        "transcribe",
        str(tmp_path / "model"),
        str(tmp_path / "test.tsv"),
        "--lm",
        str(tmp_path / "lm.arpa"),
    ]
    grid = ["--lexicon-from-lm", "--lm-weight", "8,0.5", "--word-bonus", "0,1,40"]
    out = tmp_path / "hyp.wrd"
    assert main([*args, *grid, "--labels", str(tmp_path / "test.wrd"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "lm_weight\tword_bonus\tWER\tCER"
    rows = {(a, b): (wer, cer) for a, b, wer, cer in (line.split("\t") for line in lines[1:7])}
    assert list(rows) == [(a, b) for a in ("8", "0.5") for b in ("0", "1", "40")]
    # an overweighted LM or word bonus breaks the overfit model; the moderate weights do not
    assert rows["8", "0"] != ("0.00%", "0.00%") and rows["8", "40"] != ("0.00%", "0.00%")
    assert rows["0.5", "0"] == ("0.00%", "0.00%")
    assert lines[7] == "best: --lm-weight 0.5 --word-bonus=0"  # the first of the best
    assert out.read_text().splitlines() == corpus.transcripts

    assert main([*args, *grid]) == 2  # several values need references to choose between
    assert "needs --labels" in capsys.readouterr().err
    (tmp_path / "words.txt").write_text("NOTHING\n")
    assert main([*args, "--lexicon", str(tmp_path / "words.txt"), "--lexicon-from-lm"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*args, "--lm-weight", "0.5,x"]) == 2
    assert "--lm-weight: expected numbers" in capsys.readouterr().err


def test_transcribe_exits_2_when_labels_do_not_match_the_inputs(tmp_path, trained, corpus, capsys):
    model, *_ = trained
    save_ctc_pretrained(model, corpus.vocab, tmp_path / "model")
    _write_corpus(tmp_path, corpus.transcripts)
    (tmp_path / "short.wrd").write_text("AB\n")
    code = main(
        [
            "transcribe",
            str(tmp_path / "model"),
            str(tmp_path / "test.tsv"),
            "--labels",
            str(tmp_path / "short.wrd"),
        ]
    )
    assert code == 2
    assert "short.wrd: has 1 lines" in capsys.readouterr().err


def test_transcribe_exits_2_for_a_pretraining_checkpoint(tmp_path, capsys):
    from speechvq.config import wav2vec2_tiny
    from speechvq.io import save_pretrained
    from speechvq.models.wav2vec2 import build_wav2vec2

    save_pretrained(build_wav2vec2(wav2vec2_tiny()), tmp_path / "w2v")
    assert main(["transcribe", str(tmp_path / "w2v"), "x.wav"]) == 2
    assert "not a CTC model" in capsys.readouterr().err


def test_transcribe_shows_progress_bars_with_rates(tmp_path, corpus, capsys):
    from ctc_toy import tiny_ctc_config

    from speechvq.models.ctc import build_ctc_model

    save_ctc_pretrained(
        build_ctc_model(tiny_ctc_config(len(corpus.vocab))).eval(), corpus.vocab, tmp_path / "m"
    )
    _write_corpus(tmp_path, corpus.transcripts)
    assert main(["--progress", "always", "transcribe", str(tmp_path / "m"), str(tmp_path / "test.tsv")]) == 0
    err = capsys.readouterr().err
    n = len(corpus.transcripts)
    assert "transcribe: load: 100%" in err and f"| {n}/{n} [" in err
    assert "transcribe: 100%" in err and "utt/s" in err and "x real time" in err
