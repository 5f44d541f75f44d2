from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from speechvq.data import BucketBatchSampler
from speechvq.errors import UserInputError
from speechvq.units.bert import (
    UnitBertConfig,
    UnitMaskedLM,
    bert_replace,
    build_unit_bert,
    compute_unit_span_mask,
    load_unit_bert,
    load_unit_bert_config,
    masked_lm_loss,
    masked_lm_objective,
    save_unit_bert,
)
from speechvq.units.bert_data import UnitCorpus
from speechvq.units.dictionary import UnitDictionary
from speechvq.units.io import UnitWriter

TINY = dict(
    dim=32, num_layers=2, num_heads=2, ffn_dim=64, dropout_p=0.0, attention_dropout_p=0.0, max_positions=64
)


def write_unit_corpus(directory: Path, num_utts: int = 40, seed: int = 0) -> None:
    """Each utterance alternates runs (2-4 frames) of two of 12 units: context tells which two."""
    rng = np.random.default_rng(seed)
    with UnitWriter(directory, frame_stride_s=0.02, meta={"kind": "test"}) as w:
        for i in range(num_utts):
            pair, seq = rng.choice(12, size=2, replace=False), []
            while len(seq) < int(rng.integers(30, 90)):
                seq += [str(pair[len(seq) % 2])] * int(rng.integers(2, 5))
            w.write(f"u{i}", seq)


def test_span_mask_matches_start_prob_and_span() -> None:
    g = torch.Generator().manual_seed(0)
    p, span, n = 0.05, 10, 300
    lengths = torch.full((400,), n)
    mask = compute_unit_span_mask(lengths, n + 2, start_prob=p, span=span, offset=1, generator=g)
    assert not mask[:, 0].any() and not mask[:, -1].any()  # never <s> or </s>
    content = mask[:, 1 : n + 1].float()
    # the first token is masked only by a span starting on it: rate p
    assert content[:, 0].mean().item() == pytest.approx(p, abs=0.02)
    # position k < span is masked unless none of the k + 1 possible starts fired
    assert content[:, 4].mean().item() == pytest.approx(1 - (1 - p) ** 5, abs=0.04)
    # in the interior, 1 - (1 - p) ** span
    assert content[:, span:].mean().item() == pytest.approx(1 - (1 - p) ** span, abs=0.01)
    # every masked run is at least one span long unless cut by the end
    for row in content[:50].long().tolist():
        runs, length = [], 0
        for x in [*row, 0]:
            if x:
                length += 1
            elif length:
                runs.append(length)
                length = 0
        assert all(r >= span for r in runs[:-1]) and (not runs or runs[-1] >= span or row[-1])


def test_span_mask_respects_lengths() -> None:
    lengths = torch.tensor([0, 3, 20])
    mask = compute_unit_span_mask(lengths, 22, start_prob=1.0, span=4, offset=1)
    assert mask.sum(1).tolist() == [0, 3, 20]
    assert not mask[1, 4:].any()


def test_bert_replace_uses_80_10_10() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 104, (200, 100), generator=g)
    mask = torch.rand(200, 100, generator=g) < 0.5
    inputs, targets = bert_replace(
        ids, mask, mask_id=104, random_low=4, random_high=104, mask_replace_prob=0.8,
        random_replace_prob=0.1, generator=g,
    )  # fmt: skip
    assert torch.equal(targets[mask], ids[mask]) and (targets[~mask] == -100).all()
    assert torch.equal(inputs[~mask], ids[~mask])
    m_in, m_id = inputs[mask], ids[mask]
    assert (m_in == 104).float().mean().item() == pytest.approx(0.8, abs=0.01)
    changed = ((m_in != 104) & (m_in != m_id)).float().mean().item()
    assert changed == pytest.approx(0.1 * 0.99, abs=0.01)
    assert ((m_in >= 4) & (m_in <= 104)).all()


def test_masked_lm_loss_sums_over_targets() -> None:
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = 10.0
    targets = torch.tensor([[2, -100, 4]])
    loss, n, correct = masked_lm_loss(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, [0, 2]], torch.tensor([2, 4]), reduction="sum")
    assert n == 2 and correct == 1 and loss.item() == pytest.approx(expected.item())
    zero, n0, _ = masked_lm_loss(logits, torch.full((1, 3), -100))
    assert n0 == 0 and zero.item() == 0.0


def test_dictionary_reads_and_writes_fairseq_dict_txt(tmp_path: Path) -> None:
    d = UnitDictionary.build([["3", "1", "3"], ["10", "3", "1"]])
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and d.symbols[-1] == "<mask>"
    d.save(tmp_path / "dict.txt")
    assert (tmp_path / "dict.txt").read_text() == "3 3\n1 2\n10 1\n"
    back = UnitDictionary.load(tmp_path / "dict.txt")
    assert back.symbols == d.symbols and back.encode(["1", "99"]).tolist() == [0, 5, 3, 2]
    (tmp_path / "bad.txt").write_text("3 3\n1\n")
    with pytest.raises(UserInputError, match=r"bad.txt:2: expected 'symbol count'"):
        UnitDictionary.load(tmp_path / "bad.txt")


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_unit_bert_loss_falls_in_a_short_run(tmp_path: Path, arch: str) -> None:
    write_unit_corpus(tmp_path / "units")
    cfg = UnitBertConfig(arch=arch, mask_start_prob=0.1, mask_span=3, **TINY)
    corpus = UnitCorpus(cfg, tmp_path / "units", tmp_path / "units", work_dir=tmp_path / "work")
    model = UnitMaskedLM(build_unit_bert(corpus.cfg, corpus.dictionary))
    data = corpus.train_dataset()
    sampler = BucketBatchSampler(corpus.batch_sizes(), max_tokens=800, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        data.set_epoch(epoch)
        for idx in sampler:
            out = masked_lm_objective(
                model, corpus.collate([data[i] for i in idx]), cfg, corpus.dictionary, g
            )
            n = max(out.num_targets, 1)
            opt.zero_grad()
            (out.loss / n).backward()
            opt.step()
            losses.append(out.loss.item() / n)
    assert len(losses) >= 50

    first, last = np.mean(losses[:4]), np.mean(losses[-6:])
    assert first > np.log(12) * 0.9 and last < 0.75 * first
    assert 0 <= out.correct <= out.num_targets and out.num_targets > 0


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_unit_masked_lm_scores_equal_transformers_logits_at_the_masked_positions(
    tmp_path: Path, arch: str
) -> None:
    write_unit_corpus(tmp_path / "units", num_utts=6)
    corpus = UnitCorpus(UnitBertConfig(arch=arch, **TINY), tmp_path / "units", work_dir=tmp_path / "work")
    model = UnitMaskedLM(build_unit_bert(corpus.cfg, corpus.dictionary)).eval()
    data = corpus.train_dataset()
    batch = corpus.collate([data[i] for i in range(4)])  # differing lengths: padded
    attention = (torch.arange(batch.ids.size(1))[None, :] < batch.lengths[:, None]).long()
    predict = torch.rand(batch.ids.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    predict &= attention.bool()
    with torch.no_grad():
        full = model.hf(input_ids=batch.ids, attention_mask=attention).logits
        scored = model(batch.ids, attention, predict)
    assert scored.shape == (int(predict.sum()), len(corpus.dictionary))
    torch.testing.assert_close(scored, full[predict], atol=1e-5, rtol=1e-5)
    targets = torch.where(predict, batch.ids, torch.full_like(batch.ids, -100))
    loss, n, correct = masked_lm_loss(scored, batch.ids[predict])
    ref_loss, ref_n, ref_correct = masked_lm_loss(full, targets)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5) and (n, correct) == (ref_n, ref_correct)


def test_unit_bert_export_loads_with_transformers(tmp_path: Path) -> None:
    write_unit_corpus(tmp_path / "units", num_utts=5)
    corpus = UnitCorpus(UnitBertConfig(**TINY), tmp_path / "units", work_dir=tmp_path / "work")
    model = UnitMaskedLM(build_unit_bert(corpus.cfg, corpus.dictionary)).eval()
    save_unit_bert(model, corpus, tmp_path / "export")
    back, dictionary, bpe = load_unit_bert(tmp_path / "export")
    assert bpe is None and dictionary.symbols == corpus.dictionary.symbols
    batch = corpus.collate([corpus.train_dataset()[0]])
    with torch.no_grad():
        assert torch.allclose(
            model.hf(input_ids=batch.ids).logits, back(input_ids=batch.ids).logits, atol=1e-6
        )
    assert corpus.valid_dataset() is None


def test_unit_bert_acoustic_bpe_merges_units(tmp_path: Path) -> None:
    write_unit_corpus(tmp_path / "units")
    cfg = UnitBertConfig(bpe_vocab_size=40, **TINY)
    corpus = UnitCorpus(cfg, tmp_path / "units", work_dir=tmp_path / "work")
    assert corpus.bpe is not None and (tmp_path / "work" / "bpe.model").is_file()
    units = ["3", "3", "3", "4", "4", "5", "5", "5"]
    pieces = corpus.tokenize(units)
    assert sum(len(p) for p in pieces) == len(units) and len(pieces) < len(units)
    assert len(corpus.dictionary) > len(corpus.base_dictionary)
    save_unit_bert(UnitMaskedLM(build_unit_bert(corpus.cfg, corpus.dictionary)), corpus, tmp_path / "export")
    _, _, bpe = load_unit_bert(tmp_path / "export")
    assert bpe is not None and bpe.encode(units) == pieces


def test_unit_bert_config_yaml_files_load() -> None:
    root = Path(__file__).parents[2] / "conf"
    paths = sorted(root.glob("unit_bert_*.yaml"))
    assert paths
    for path in paths:
        assert load_unit_bert_config(path).mask_start_prob == 0.05


def test_unit_bert_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="`mask_span` must be >= 1"):
        UnitBertConfig(mask_span=0)
    with pytest.raises(UserInputError, match="unknown field"):
        UnitBertConfig.from_dict({"dimm": 3})


def test_unit_dataset_crops_to_max_positions_and_reports_sizes(tmp_path: Path) -> None:
    write_unit_corpus(tmp_path / "units", num_utts=6)
    cfg = UnitBertConfig(**{**TINY, "max_positions": 16})
    corpus = UnitCorpus(cfg, tmp_path / "units", tmp_path / "units", work_dir=tmp_path / "work")
    data = corpus.train_dataset()
    d = corpus.dictionary
    assert [len(data[i]["ids"]) for i in range(len(data))] == corpus.batch_sizes().tolist() == [16] * 6
    item = data[0]["ids"]
    assert item[0] == d.bos_id and item[-1] == d.eos_id and (item[1:-1] >= d.first_unit_id).all()
    crops = set()
    for epoch in range(5):
        data.set_epoch(epoch)
        crops.add(tuple(data[0]["ids"].tolist()))
    assert len(crops) > 1  # random crops move with the epoch
    valid = corpus.valid_dataset()
    assert valid is not None and torch.equal(valid[0]["ids"], valid[0]["ids"])
    batch = corpus.collate([data[0], valid[1]])
    assert batch.ids.shape == (2, 16) and batch.lengths.tolist() == [16, 16]
