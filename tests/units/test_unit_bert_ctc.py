"""CTC on unit-BERT features (vq-wav2vec 5.2): shapes, the loop, overfitting, export, input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from speechvq.cli import main
from speechvq.data.manifest import ManifestItem, write_manifest
from speechvq.errors import UserInputError
from speechvq.train import checkpoint as ckpt
from speechvq.train.config import load_config
from speechvq.train.finetune import UnitCtcRunConfig
from speechvq.train.metrics import read_metrics
from speechvq.train.tasks.unit_ctc import UnitBertCtcTask
from speechvq.units.bert import UnitBertConfig, UnitMaskedLM, build_unit_bert, save_unit_bert
from speechvq.units.bert_data import UnitCorpus
from speechvq.units.ctc import load_unit_bert_ctc, save_unit_bert_ctc, transcribe_units
from speechvq.units.ctc_data import UnitTranscriptDataset, collate_unit_transcripts
from speechvq.units.io import UnitWriter, read_units

TRANSCRIPTS = ["ABC DE", "BAD", "CAB ED", "DEC A", "EBC DA", "ACE BD"]
"""No letter repeats inside a word: runs of equal units stay one letter after deduplication."""
LETTER_UNITS = {"A": "3", "B": "7", "C": "1", "D": "5", "E": "9", " ": "0"}
TINY_BERT = dict(dim=32, num_layers=2, num_heads=2, ffn_dim=64, dropout_p=0.0, attention_dropout_p=0.0,
                 max_positions=64)  # fmt: skip


def _frames(text: str, rng: np.random.Generator) -> list[str]:
    """Each character's unit for 2-4 frames: the units spell the transcript."""
    return [u for ch in text for u in [LETTER_UNITS[ch]] * int(rng.integers(2, 5))]


def _ltr(text: str) -> str:
    return " ".join(" ".join(word) + " |" for word in text.split())


def write_corpus(root: Path, texts: list[str], *, dedup: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """A manifest (no audio is read) with ``.ltr`` labels and its units directory."""
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    items = [ManifestItem(relpath=f"u{i}.wav", num_samples=16000, line=0) for i in range(len(texts))]
    write_manifest(root / "train.tsv", root / "audio", items)
    (root / "train.ltr").write_text("".join(_ltr(t) + "\n" for t in texts))
    with UnitWriter(root / "units", frame_stride_s=0.02, dedup=dedup, meta={"kind": "test"}) as w:
        for item, text in zip(items, texts):
            w.write(item.relpath, _frames(text, rng))
    return root / "train.tsv", root / "units"


def write_unit_bert(out: Path, units: Path, **cfg: object) -> Path:
    """A randomly initialised tiny unit BERT exported as pretrain-unit-bert does."""
    torch.manual_seed(0)
    corpus = UnitCorpus(
        UnitBertConfig(**{**TINY_BERT, **cfg}), units, work_dir=out.parent / f"{out.name}_work"
    )
    save_unit_bert(UnitMaskedLM(build_unit_bert(corpus.cfg, corpus.dictionary)), corpus, out)
    return out


def _config(tmp_path: Path, **sections: dict) -> Path:
    data = {
        "model": {"layer": 1, "freeze_updates": 0, "head": "conv", "head_dim": 32, "head_layers": 2,
                  "head_kernel": 3, "dropout_p": 0.0},
        "data": {"labels": "ltr", "vocab": "letters", "max_tokens": 400},
        "optim": {"lr": 3.0e-3, "eps": 1.0e-8, "weight_decay": 0.0, "clip_grad_norm": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": 6, "log_interval": 2, "valid_interval": 3, "save_interval": 3, "keep_last": 1,
                  "progress_bar": False, "tensorboard": False},
    }  # fmt: skip
    for name, values in sections.items():
        data[name].update(values)
    path = tmp_path / "ft_units.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _task(tmp_path: Path, manifest: Path, units: Path, bert: Path, **model: object) -> UnitBertCtcTask:
    overrides = [f"data.train={manifest}", f"data.train_units={units}"]
    cfg = load_config(_config(tmp_path, model=model), overrides, UnitCtcRunConfig)
    return UnitBertCtcTask(cfg, str(bert), tmp_path / "exp")


def _batch(task: UnitBertCtcTask, manifest: Path, indices: list[int] | None = None):
    ds, _, collate = task.open_data(str(manifest), train=True, num_replicas=1, rank=0)
    return collate([ds[i] for i in (indices if indices is not None else range(len(ds)))])


@pytest.mark.parametrize("bert_dedup", [True, False])
def test_frame_lengths_are_the_sum_of_the_durations(tmp_path: Path, bert_dedup: bool) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS, dedup=True)
    bert = write_unit_bert(tmp_path / "bert", units, dedup=bert_dedup)
    task = _task(tmp_path, manifest, units, bert)
    model = task.build_model().eval()
    batch = _batch(task, manifest)
    frames = [len(read_units(units).frames(i)) for i in range(len(TRANSCRIPTS))]
    durations = [sum(d) for d in read_units(units).durations or []]
    assert frames == durations
    if bert_dedup:  # one BERT token per run, repeated by its duration
        assert batch.lengths.tolist() == [len(t) for t in read_units(units).tokens]
        assert batch.repeats.max() > 1
    else:  # the BERT saw per-frame units: durations are expanded before it
        assert batch.lengths.tolist() == frames and batch.repeats.max() == 1
    with torch.no_grad():
        out = model(batch.ids, batch.lengths, batch.repeats)
    assert out.lengths.tolist() == frames == batch.frames.tolist()
    assert out.log_probs.shape == (len(TRANSCRIPTS), max(frames), len(task.vocab))
    assert out.log_probs.dtype == torch.float32
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(len(frames), max(frames)))


def test_finetune_ctc_command_trains_on_unit_bert_features(tmp_path: Path) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS)
    write_unit_bert(tmp_path / "bert_exp" / "best_model", units)  # --init takes the experiment dir
    exp = tmp_path / "exp"
    argv = ["finetune-ctc", "--config", str(_config(tmp_path, model={"freeze_updates": 2})),
            "--init", str(tmp_path / "bert_exp"), "--train", str(manifest), "--units", str(units),
            "--valid", str(manifest), "--valid-units", str(units), "--exp-dir", str(exp)]  # fmt: skip
    assert main(argv) == 0
    records = read_metrics(exp)
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in valid] == [3, 6]
    assert all(r["cer"] >= 0.0 and r["wer"] >= 0.0 and np.isfinite(r["loss"]) for r in valid)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    best = ckpt.read_best(exp / "checkpoints")
    assert best is not None and best["valid_loss"] == min(r["wer"] for r in valid)  # the best WER
    assert ckpt.latest_checkpoint(exp / "checkpoints").name == "step_00000006"
    saved = yaml.safe_load((exp / "config.yaml").read_text())
    assert saved["unit_ctc_model"]["layer"] == 1 and saved["init"].endswith("best_model")
    hyps = transcribe_units(exp / "best_model", units)
    assert len(hyps) == len(TRANSCRIPTS)


def test_unit_bert_ctc_overfits_two_utterances(tmp_path: Path) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS[:2], dedup=True)
    bert = write_unit_bert(tmp_path / "bert", units, dedup=True)
    task = _task(tmp_path, manifest, units, bert)
    torch.manual_seed(0)
    model = task.build_model()
    batch = _batch(task, manifest)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        task.on_update(model, step)
        loss, stats = task.batch_loss(
            model, model, batch, generator=torch.Generator(), update_generator=torch.Generator()
        )
        (loss / stats["targets"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item() / stats["targets"])
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    with torch.no_grad():
        rec = task.eval_record(task.eval_batch(model.eval(), batch))[0]
    assert rec["cer"] == 0.0 and rec["wer"] == 0.0
    # `speechvq transcribe` reads the saved model and a units directory: the same perfect transcripts
    save_unit_bert_ctc(model, task.vocab, task.tokenizer, tmp_path / "export")
    (tmp_path / "ref.wrd").write_text("".join(t + "\n" for t in TRANSCRIPTS[:2]))
    hyp = tmp_path / "hyp.wrd"
    argv = ["transcribe", str(tmp_path / "export"), str(units), "--labels", str(tmp_path / "ref.wrd")]
    assert main([*argv, "--out", str(hyp)]) == 0
    assert hyp.read_text().splitlines() == TRANSCRIPTS[:2] == transcribe_units(tmp_path / "export", units)
    assert main([*argv, "--out", str(tmp_path / "beam.wrd"), "--beam", "4"]) == 0  # the beam search path
    assert (tmp_path / "beam.wrd").read_text().splitlines() == TRANSCRIPTS[:2]


def test_transcribing_audio_with_a_unit_model_names_the_problem(tmp_path: Path, capsys) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS[:2])
    bert = write_unit_bert(tmp_path / "bert", units)
    task = _task(tmp_path, manifest, units, bert)
    save_unit_bert_ctc(task.build_model(), task.vocab, task.tokenizer, tmp_path / "export")
    assert main(["transcribe", str(tmp_path / "export"), str(manifest)]) == 2
    err = capsys.readouterr().err
    assert "transcribes units" in err and str(manifest) in err and "Traceback" not in err


def test_the_bert_trains_only_after_freeze_updates_and_never_with_freeze_bert(tmp_path: Path) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS[:2])
    bert = write_unit_bert(tmp_path / "bert", units, dropout_p=0.1)
    task = _task(tmp_path, manifest, units, bert, freeze_updates=2)
    model = task.build_model()
    batch = _batch(task, manifest)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in model.state_dict().items() if k != "num_updates"}

    def changed(before: dict[str, torch.Tensor], prefix: str) -> bool:
        after = model.state_dict()
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    start = snapshot()
    for step in range(3):
        if step == 2:
            frozen = snapshot()
        task.on_update(model, step)
        loss, _ = task.batch_loss(
            model, model, batch, generator=torch.Generator(), update_generator=torch.Generator()
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            assert not changed(start, "features.") and changed(start, "head.")
    assert changed(frozen, "features.")  # update 2: the BERT trains
    always = _task(tmp_path, manifest, units, bert, freeze_bert=True, freeze_updates=0).build_model().train()
    assert not any(p.requires_grad for p in always.features.parameters())
    assert not always.features.training and always.head.training and always.bert_frozen


def test_saved_unit_bert_ctc_gives_the_same_log_probs(tmp_path: Path) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS, dedup=True)
    bert = write_unit_bert(tmp_path / "bert", units, dedup=True, bpe_vocab_size=24)
    task = _task(tmp_path, manifest, units, bert, head="transformer", head_heads=2, head_ffn_dim=64)
    assert task.tokenizer.bpe is not None
    model = task.build_model().eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the initial weights
    batch = _batch(task, manifest)
    save_unit_bert_ctc(model, task.vocab, task.tokenizer, tmp_path / "export")
    loaded, vocab, tokenizer = load_unit_bert_ctc(tmp_path / "export")
    assert vocab.tokens == task.vocab.tokens and tokenizer.dedup and tokenizer.bpe is not None
    frames = read_units(units).frames(3)
    for got, want in zip(tokenizer.encode(frames), task.tokenizer.encode(frames)):
        assert np.array_equal(got, want)
    with torch.no_grad():
        a = model(batch.ids, batch.lengths, batch.repeats)
        b = loaded(batch.ids, batch.lengths, batch.repeats)
    assert a.lengths.tolist() == b.lengths.tolist() == [len(read_units(units).frames(i)) for i in range(6)]
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=0, atol=1e-6)
    meta = json.loads((tmp_path / "export" / "unit_bert_ctc.json").read_text())
    assert meta["config"]["head"] == "transformer"


def test_units_of_another_length_than_the_manifest_name_the_file(tmp_path: Path) -> None:
    manifest, _ = write_corpus(tmp_path, TRANSCRIPTS)
    _, short_units = write_corpus(tmp_path / "short", TRANSCRIPTS[:4])
    bert = write_unit_bert(tmp_path / "bert", short_units)
    task = _task(tmp_path, manifest, short_units, bert)
    with pytest.raises(
        UserInputError, match=r"short/units/units\.txt: has 4 lines, but the manifest .* has 6"
    ):
        UnitTranscriptDataset(str(manifest), short_units, task.tokenizer, "ltr")
    # and through the command: exit code 2 with the message
    argv = ["finetune-ctc", "--config", str(_config(tmp_path)), "--init", str(bert), "--train", str(manifest),
            "--units", str(short_units), "--exp-dir", str(tmp_path / "exp2")]  # fmt: skip
    assert main(argv) == 2
    # --units with a non-unit-BERT --init
    assert main([*argv[:4], "none", *argv[5:]]) == 2
    assert collate_unit_transcripts([], pad_id=1).ids.shape == (0, 0)


def test_unit_bert_ctc_resumes_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from speechvq.train.finetune import finetune_unit_bert_ctc

    manifest, units = write_corpus(tmp_path, TRANSCRIPTS, dedup=True)
    bert = write_unit_bert(tmp_path / "bert", units, dropout_p=0.1)
    path = _config(
        tmp_path, model={"freeze_updates": 1, "dropout_p": 0.1}, data={"max_tokens": 120},
        train={"max_steps": 4, "grad_accum": 2, "valid_interval": 1000},
    )  # fmt: skip
    cfg = load_config(path, [f"data.train={manifest}", f"data.train_units={units}"], UnitCtcRunConfig)
    finetune_unit_bert_ctc(cfg, str(bert), tmp_path / "straight")
    finetune_unit_bert_ctc(cfg, str(bert), tmp_path / "resumed", stop_at_step=2)
    finetune_unit_bert_ctc(cfg, str(bert), tmp_path / "resumed", require_resume=True)
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "straight" / "checkpoints") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "resumed" / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(tmp_path / "bert" / "model.safetensors"))
    assert not torch.equal(a["features.body.embeddings.word_embeddings.weight"],
                           first["bert.embeddings.word_embeddings.weight"])  # fmt: skip
    assert (tmp_path / "resumed" / "best_model" / "unit_bert_ctc.json").is_file()


def test_the_shipped_config_loads_and_asks_for_the_validation_units() -> None:
    conf = Path(__file__).resolve().parents[2] / "conf" / "finetune_units_small_cpu.yaml"
    cfg = load_config(conf, ["data.train_units=u/train", "data.valid_units=u/valid"], UnitCtcRunConfig)
    assert cfg.model.head == "conv" and cfg.data.valid == "data/valid.tsv"
    with pytest.raises(UserInputError, match=r"data\.valid_units"):
        load_config(conf, ["data.train_units=u/train"], UnitCtcRunConfig)
    with pytest.raises(UserInputError, match="head_kernel"):
        load_config(
            conf, ["data.train_units=u", "data.valid_units=v", "model.head_kernel=4"], UnitCtcRunConfig
        )


def test_layer_mix_is_the_chosen_layer_when_its_weight_dominates(tmp_path: Path) -> None:
    """``mix_layers``: a softmax-weighted sum of the LayerNorm-ed embeddings and blocks; with one
    weight far above the others it is that layer, normalised."""
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS[:3])
    bert = write_unit_bert(tmp_path / "bert", units)
    mixed = _task(tmp_path, manifest, units, bert, layer=2, mix_layers=True).build_model().eval()
    assert mixed.mix is not None and mixed.mix.logits.shape == (3,)  # embeddings + 2 blocks
    batch = _batch(_task(tmp_path, manifest, units, bert, layer=2, mix_layers=True), manifest)
    for layer in (0, 1, 2):
        single = _task(tmp_path, manifest, units, bert, layer=layer).build_model().eval()
        with torch.no_grad():
            mixed.mix.logits.copy_(torch.full((3,), -1e4).index_fill_(0, torch.tensor(layer), 0.0))
            stacked, lengths = mixed.features(batch.ids, batch.lengths, batch.repeats)
            want, want_lengths = single.features(batch.ids, batch.lengths, batch.repeats)
        assert stacked.shape == (*want.shape[:2], 3, want.shape[-1]) and torch.equal(lengths, want_lengths)
        valid = torch.arange(want.size(1))[None, :] < want_lengths[:, None]
        got = mixed.mix(stacked)[valid]
        torch.testing.assert_close(got, torch.nn.functional.layer_norm(want, want.shape[-1:])[valid])


def test_layer_mix_trains_while_the_bert_is_frozen(tmp_path: Path) -> None:
    manifest, units = write_corpus(tmp_path, TRANSCRIPTS[:2])
    bert = write_unit_bert(tmp_path / "bert", units)
    task = _task(tmp_path, manifest, units, bert, layer=2, mix_layers=True, freeze_updates=5)
    model = task.build_model()
    task.on_update(model, 0)
    assert model.bert_frozen
    loss, _ = task.batch_loss(model, model, _batch(task, manifest), generator=torch.Generator(),
                              update_generator=torch.Generator())  # fmt: skip
    loss.backward()
    assert model.mix is not None and model.mix.logits.grad is not None
    assert bool(model.mix.logits.grad.abs().sum() > 0)
    assert all(p.grad is None for p in model.features.parameters())
