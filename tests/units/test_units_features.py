from __future__ import annotations

import torch

from speechvq.units.bert import UnitBertConfig, build_unit_bert
from speechvq.units.dictionary import UnitDictionary
from speechvq.units.features import UnitBertFeatures


def _front_end(layer: int = 1, max_positions: int = 64) -> tuple[UnitBertFeatures, UnitDictionary]:
    d = UnitDictionary([str(i) for i in range(10)])
    cfg = UnitBertConfig(dim=16, num_layers=2, num_heads=2, ffn_dim=32, max_positions=max_positions)
    model = build_unit_bert(cfg, d).eval()
    return UnitBertFeatures(model, d, layer=layer, max_positions=max_positions), d


def test_unit_bert_features_train_a_ctc_head() -> None:
    front, d = _front_end(layer=1)
    front.train()
    head = torch.nn.Linear(front.dim, 6)
    ids = torch.randint(d.first_unit_id, d.mask_id, (2, 12))
    lengths = torch.tensor([12, 8])
    feats, frames = front(ids, lengths)
    assert feats.shape == (2, 12, 16) and frames.tolist() == [12, 8]
    log_probs = head(feats).log_softmax(-1).transpose(0, 1)  # (B, T, V) -> (T, B, V)
    targets = torch.tensor([[1, 2, 3], [4, 5, 0]])
    loss = torch.nn.functional.ctc_loss(log_probs, targets, frames, torch.tensor([3, 2]), blank=0)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    layer_grad = front.body.encoder.layer[0].attention.self.query.weight.grad
    assert layer_grad is not None and layer_grad.abs().sum() > 0
    assert len(front.body.encoder.layer) == 1  # blocks after the chosen layer are dropped


def test_unit_bert_features_ignore_padding_and_expand_repeats() -> None:
    front, d = _front_end(layer=2)
    ids = torch.randint(d.first_unit_id, d.mask_id, (2, 6))
    lengths = torch.tensor([6, 4])
    with torch.no_grad():
        batched, _ = front(ids, lengths)
        alone, _ = front(ids[1:, :4], lengths[1:])
        assert torch.allclose(batched[1, :4], alone[0], atol=1e-5)
        assert (batched[1, 4:] == 0).all()
        repeats = torch.tensor([[1, 2, 1, 1, 1, 3], [2, 2, 2, 2, 9, 9]])
        frames, frame_lengths = front(ids, lengths, repeats)
    assert frame_lengths.tolist() == [9, 8] and frames.shape == (2, 9, 16)
    assert torch.equal(frames[0, 1], frames[0, 2]) and torch.equal(frames[1, 6], batched[1, 3])


def test_unit_bert_features_window_long_inputs() -> None:
    front, d = _front_end(layer=1, max_positions=8)
    ids = torch.randint(d.first_unit_id, d.mask_id, (1, 20))
    with torch.no_grad():
        feats, n = front(ids, torch.tensor([20]))
        first, _ = front(ids[:, :6], torch.tensor([6]))
    assert feats.shape == (1, 20, 16) and int(n[0]) == 20
    assert torch.allclose(feats[0, :6], first[0], atol=1e-5)


def test_unit_bert_features_layer_0_are_the_embeddings() -> None:
    # layer 0 (the raw-unit baseline of CTC on BERT features) keeps no block; transformers then
    # returns no hidden states, so the front end must take the embeddings' output itself.
    d = UnitDictionary([str(i) for i in range(10)])
    cfg = UnitBertConfig(dim=16, num_layers=2, num_heads=2, ffn_dim=32, max_positions=64)
    full = build_unit_bert(cfg, d).eval()
    ids = torch.randint(d.first_unit_id, d.mask_id, (2, 7))
    lengths = torch.tensor([7, 5])
    framed = torch.cat([torch.full((2, 1), d.bos_id), ids, torch.full((2, 1), d.eos_id)], 1)
    with torch.no_grad():
        expected = full.base_model(input_ids=framed, output_hidden_states=True).hidden_states[0][:, 1:8]
        front = UnitBertFeatures(full, d, layer=0, max_positions=64).eval()
        feats, frames = front(ids, lengths)
    assert len(front.body.encoder.layer) == 0 and frames.tolist() == [7, 5]
    assert torch.allclose(feats[0], expected[0], atol=1e-6)
    assert torch.allclose(feats[1, :5], expected[1, :5], atol=1e-6) and (feats[1, 5:] == 0).all()
