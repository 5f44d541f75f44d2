"""Dropout, the training-mode attention path, the packed CPU layout, and the contrastive logits."""

from __future__ import annotations

import pytest
import torch

import speechvq.models.kernels.context as context_module
import speechvq.models.kernels.dropout as common_module
from speechvq.config import ContextConfig
from speechvq.models.context import build_context_network
from speechvq.models.kernels.context import FastSelfAttention as SelfAttention
from speechvq.models.kernels.context import Packed, pack, unpack
from speechvq.models.kernels.dropout import dropout
from speechvq.models.kernels.grouped_conv import GroupedConvFlippedBackward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keeps_one_minus_p_and_scales_like_f_dropout(dtype):
    torch.manual_seed(0)
    x = torch.ones(400_000, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.1, True)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(float(kept.float().mean()) - 0.9) < 3e-3  # ~7 standard deviations
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.9))  # F.dropout's scale, exactly
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    assert torch.equal(grad, y.detach())  # d(x * mask / 0.9) / dx = mask / 0.9
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    assert not dropout(x, 1.0, True).any()


def test_dropout_draws_fill_the_31_bits_of_each_half_its_threshold_assumes():
    # the keep threshold round(p * 2^31) assumes that an int64 random_() draw, bit 31 cleared,
    # holds two int32 halves each uniform over [0, 2^31)
    torch.manual_seed(0)
    draws = torch.empty(1_000_000, dtype=torch.int64).random_()
    halves = draws.bitwise_and_(common_module._HALVES_31_BITS).view(torch.int32).view(-1, 2)
    for half in halves.unbind(dim=1):
        assert int(half.min()) >= 0 and int(half.max()) > common_module._DRAWS - 2**22
        bits = torch.stack([(half >> i) & 1 for i in range(31)]).float().mean(dim=1)
        assert float((bits - 0.5).abs().max()) < 3e-3  # each bit a fair coin


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_both_halves_of_a_draw_at_one_minus_p(p):
    # even and odd elements come from the two halves of one draw
    torch.manual_seed(0)
    y = dropout(torch.ones(3, 100_001), p, True)  # an odd count: the last draw's second half unused
    kept = (y != 0).float().view(-1)[:-1].view(-1, 2).mean(dim=0)
    assert float((kept - (1 - p)).abs().max()) < 4e-3  # ~5 standard deviations


def test_training_attention_path_is_sdpa_when_its_dropout_keeps_everything(monkeypatch):
    # in training with attention dropout the CPU path computes attention itself (to use the
    # faster dropout); with the dropout made the identity it must equal SDPA, padding included
    torch.manual_seed(0)
    attention = SelfAttention(32, 4, dropout_p=0.1)
    x = torch.randn(3, 17, 32)
    padding = torch.arange(17)[None, :] >= torch.tensor([17, 11, 5])[:, None]
    attention.eval()
    want = attention(x, padding)
    monkeypatch.setattr(context_module, "dropout", lambda t, p, training: t)
    attention.train()
    got = attention(x, padding)
    valid = ~padding
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_bf16 = attention(x, padding)
    torch.testing.assert_close(got_bf16.float()[valid], want[valid], atol=5e-2, rtol=5e-2)


def test_training_attention_drops_probabilities():
    torch.manual_seed(0)
    attention = SelfAttention(32, 4, dropout_p=0.5).train()
    x = torch.randn(2, 9, 32)
    assert not torch.allclose(attention(x, None), attention(x, None))  # fresh masks each call


@pytest.mark.parametrize("train", [False, True])
def test_packed_attention_equals_the_padded_layout_at_valid_frames(monkeypatch, train):
    # the CPU runs the blocks on the packed valid frames; attention there must equal the padded
    # layout's key-padding-masked attention (SDPA in eval, the CPU dropout path in training)
    torch.manual_seed(0)
    monkeypatch.setattr(context_module, "dropout", lambda t, p, training: t)
    attention = SelfAttention(32, 4, dropout_p=0.1).train(train)
    lens = [17, 11, 5]
    x = torch.randn(3, 17, 32, requires_grad=True)
    padding = torch.arange(17)[None, :] >= torch.tensor(lens)[:, None]
    want = attention(x, padding)
    got = unpack(attention(pack(x, lens), Packed(lens)), lens, 17)
    valid = ~padding
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert not got[padding].any()  # zeros at padding
    (g_want,) = torch.autograd.grad(want[valid].square().sum(), x)
    (g_got,) = torch.autograd.grad(got[valid].square().sum(), x)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)
    assert not g_got[padding].any()


def _training_net(monkeypatch, layer_norm_first: bool, checkpointed: bool):
    """A 3-block context network in training mode whose only dropout, the attention's, is made the
    identity (so the CPU training attention path runs and results are deterministic)."""
    torch.manual_seed(0)
    monkeypatch.setattr(context_module, "dropout", lambda t, p, training: t)
    cfg = ContextConfig(
        dim=32, num_layers=3, num_heads=4, ffn_dim=64, pos_conv_kernel=16, pos_conv_groups=4,
        layer_norm_first=layer_norm_first, layer_drop_p=0.0, checkpoint_activations=checkpointed,
        dropout_p=0.0, activation_dropout_p=0.0, attention_dropout_p=0.1,
    )  # fmt: skip
    return build_context_network(cfg).train()


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_context_network_on_a_padded_batch_equals_each_utterance_alone(
    monkeypatch, layer_norm_first, checkpointed
):
    # the packed CPU path, in training (no residual dropout; the attention dropout made the
    # identity) with gradients: each utterance's outputs, every hidden state, and the weight
    # gradients equal running it alone
    net = _training_net(monkeypatch, layer_norm_first, checkpointed)
    lens = [23, 9, 16]
    x = torch.randn(3, 23, 32)
    padding = torch.arange(23)[None, :] >= torch.tensor(lens)[:, None]
    x[padding] = 99.0  # must not leak into valid frames
    out = net(x, padding)
    assert len(out.hidden_states) == 4 and len(out.hidden_states[1:]) == 3
    out.last_hidden_state[~padding].square().sum().backward()
    got_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    alone_loss = 0.0
    for b, n in enumerate(lens):
        alone = net(x[b : b + 1, :n])
        torch.testing.assert_close(
            out.last_hidden_state[b, :n], alone.last_hidden_state[0], atol=1e-5, rtol=1e-5
        )
        assert not out.last_hidden_state[b, n:].any()
        for ours, theirs in zip(out.hidden_states, alone.hidden_states, strict=True):
            torch.testing.assert_close(ours[b, :n], theirs[0], atol=1e-5, rtol=1e-5)
        alone_loss = alone_loss + alone.last_hidden_state.square().sum()
    alone_loss.backward()
    for got, param in zip(got_grads, net.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contrastive_logits_equal_cosine_similarity_over_gathered_candidates(dtype, autocast):
    # the [N, M] matmul + gather against the plain definition on an [N, K+1, F] tensor, including
    # the -inf of a distractor whose vector equals its target's (here rows 5 and 7 are equal);
    # fp32 under bf16 autocast too, which would otherwise run the matmul in bf16
    from speechvq.losses import contrastive_logits

    g = torch.Generator().manual_seed(0)
    predictions = torch.randn(50, 16, generator=g).to(dtype)
    candidates = torch.randn(60, 16, generator=g).to(dtype)
    candidates[7] = candidates[5]
    target_pos = torch.randint(0, 60, (50,), generator=g)
    distractor_pos = torch.randint(0, 60, (50, 20), generator=g)
    target_pos[0], distractor_pos[0, 3] = 5, 7
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = contrastive_logits(predictions, candidates, target_pos, distractor_pos, 0.1)

    stacked = candidates[torch.cat([target_pos[:, None], distractor_pos], dim=1)].float()  # (N, K+1, F)
    want = torch.cosine_similarity(predictions.float()[:, None, :], stacked, dim=-1) / 0.1
    same = (candidates[distractor_pos] == candidates[target_pos][:, None, :]).all(dim=-1)
    want[:, 1:] = want[:, 1:].masked_fill(same, float("-inf"))
    assert got.dtype == torch.float32 and bool(same[0, 3])
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)


def test_contrastive_accuracy_counts_only_targets_ranked_strictly_first():
    from speechvq.losses import contrastive_accuracy

    inf = float("-inf")
    logits = torch.tensor(
        [
            [2.0, 1.0, 0.5, inf],  # strictly first: right
            [1.0, 1.0, 0.5, 0.0],  # tied with the best distractor, lower ones elsewhere: wrong
            [1.0, 1.0, 1.0, inf],  # all finite equal, a -inf distractor: wrong (fairseq: right)
            [0.0, 0.0, 0.0, 0.0],  # all equal: wrong
            [0.0, 1.0, -1.0, 0.5],  # a distractor above the target: wrong
            [0.0, inf, inf, inf],  # every distractor masked to -inf (equal to the target): right
        ]
    )
    correct, counted = contrastive_accuracy(logits)
    assert (int(correct), counted) == (2, 6)
    assert int(contrastive_accuracy(torch.zeros(3, 1))[0]) == 0  # no distractors: nothing to rank
    assert contrastive_accuracy(torch.zeros(0, 5))[1] == 0


def test_context_network_rejects_padding_that_is_not_a_suffix():
    # the packed CPU path takes each row's valid frames as a prefix; a left-padded mask must fail
    # loudly rather than pack the wrong frames
    cfg = ContextConfig(dim=16, num_layers=1, num_heads=2, ffn_dim=32, pos_conv_kernel=8, pos_conv_groups=2)
    net = build_context_network(cfg).eval()
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, :3] = True
    with pytest.raises(ValueError, match="suffix"):
        net(torch.randn(2, 10, 16), padding)


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_output_frames_equal_the_full_run_at_those_frames_with_gradients(
    monkeypatch, layer_norm_first, padded, checkpointed
):
    # the last block computed at the selected frames only (the packed CPU layout with padding,
    # the padded layout without): outputs and every gradient equal the full run's
    net = _training_net(monkeypatch, layer_norm_first, checkpointed)
    lens = [23, 9, 16] if padded else [23, 23, 23]
    x = torch.randn(3, 23, 32, requires_grad=True)
    padding = torch.arange(23)[None, :] >= torch.tensor(lens)[:, None]
    selected = (torch.rand(3, 23) < 0.4) & ~padding
    selected[1] = False  # an utterance with no selected frame
    weight = torch.randn(int(selected.sum()), 32)

    full = net(x, padding if padded else None)
    (full.last_hidden_state[selected] * weight).sum().backward()
    want_grads = [p.grad.clone() for p in (x, *net.parameters())]
    x.grad = None
    net.zero_grad()
    part = net(x, padding if padded else None, output_frames=selected)
    assert part.last_hidden_state.shape == (int(selected.sum()), 32)
    torch.testing.assert_close(part.last_hidden_state, full.last_hidden_state[selected], atol=1e-5, rtol=1e-5)
    assert len(part.hidden_states) == 3  # the input and blocks 1-2; block 3 only at the frames
    for ours, theirs in zip(part.hidden_states, full.hidden_states[:3], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    (part.last_hidden_state * weight).sum().backward()
    for got, want in zip((x.grad, *(p.grad for p in net.parameters())), want_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_output_frames_when_layer_drop_skips_the_last_block_and_on_padding():
    # a dropped last block leaves the selection to its input; padded frames cannot be selected
    cfg = ContextConfig(
        dim=16, num_layers=2, num_heads=2, ffn_dim=32, pos_conv_kernel=8, pos_conv_groups=2,
        layer_drop_p=0.5, dropout_p=0.0, attention_dropout_p=0.0, activation_dropout_p=0.0,
    )  # fmt: skip
    net = build_context_network(cfg).train()
    x = torch.randn(2, 12, 16)
    padding = torch.arange(12)[None, :] >= torch.tensor([12, 7])[:, None]
    selected = torch.zeros(2, 12, dtype=torch.bool)
    selected[0, 3:9] = selected[1, :4] = True
    runs = 0
    for seed in range(40):  # some draws drop block 2 and keep block 1, some keep both
        full = net(x, padding, layer_drop_generator=torch.Generator().manual_seed(seed))
        part = net(
            x, padding, layer_drop_generator=torch.Generator().manual_seed(seed), output_frames=selected
        )
        torch.testing.assert_close(
            part.last_hidden_state, full.last_hidden_state[selected], atol=1e-5, rtol=1e-5
        )
        runs += len(full.hidden_states) == 2 and len(part.hidden_states) == 2  # block 2 dropped
    assert runs > 0
    with pytest.raises(ValueError, match="padding"):
        net(x, padding, output_frames=~padding | padding)


@pytest.mark.parametrize("kernel", [8, 7])
def test_grouped_conv_with_flipped_kernel_backward_passes_gradcheck(kernel):
    # the positional conv's input gradient as a forward conv of the output gradient
    x = torch.randn(2, 12, 15, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 4, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    conv = GroupedConvFlippedBackward
    assert torch.autograd.gradcheck(lambda *a: conv.apply(*a, kernel // 2, 3), (x, weight, bias))


@pytest.mark.parametrize("autocast", [False, True])
def test_positional_conv_on_the_cpu_equals_its_conv1d(autocast):
    # the module's CPU path (custom backward, autocast's casts done up front, the low-precision
    # guard) against its own weight-normed nn.Conv1d in fp32, outputs and gradients, in fp32 and
    # under bf16 autocast. The reference stays fp32: on AMX CPUs oneDNN's bf16 kernel for this
    # shape (8 channels per group) is wrong, and the module must not be (lowp_guard).
    torch.manual_seed(0)
    pos = context_module.FastConvPositionalEmbedding(32, 16, 4)
    x = torch.randn(3, 21, 32, requires_grad=True)
    upstream = torch.randn(3, 21, 32)
    params = [x, *pos.parameters()]

    def reference(t):
        y = pos.conv(t.transpose(1, 2))[:, :, :-1]  # the even kernel's extra frame
        return torch.nn.functional.gelu(y).transpose(1, 2)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = pos(x)
    want = reference(x)
    assert got.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.float(), want, **tol)
    got_grads = torch.autograd.grad(got.float(), params, upstream)
    want_grads = torch.autograd.grad(want.float(), params, upstream)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert float((g - w).norm() / w.norm()) < (1e-2 if autocast else 1e-5)
