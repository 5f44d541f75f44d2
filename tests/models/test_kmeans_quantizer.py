"""The k-means (VQ-VAE) quantizer: nearest codeword, straight-through gradients, losses, EMA."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from speechvq.config import KMeansQuantizerConfig, wav2vec2_tiny
from speechvq.models.kmeans_quantizer import KMeansVectorQuantizer, build_kmeans_quantizer, squared_distances
from speechvq.models.wav2vec2 import build_wav2vec2


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: intra-op threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantizer(**kwargs: object) -> KMeansVectorQuantizer:
    settings: dict[str, object] = {
        "input_dim": 8,
        "num_codebooks": 2,
        "codebook_size": 5,
        "codevector_dim": 8,
    }
    settings.update(kwargs)
    return KMeansVectorQuantizer(**settings)  # type: ignore[arg-type]


def test_codes_are_the_nearest_codewords() -> None:
    q = _quantizer().eval()
    x = torch.randn(2, 7, 8)
    out = q(x)
    ze = q.project(x).reshape(14, 2, 4)
    brute = torch.cdist(ze.transpose(0, 1), q.codebook).argmin(-1).T  # (G, N, V) -> (N, G)
    assert torch.equal(out.codes.reshape(14, 2), brute)
    assert torch.allclose(
        squared_distances(ze, q.codebook),
        torch.cdist(ze.transpose(0, 1), q.codebook).pow(2).permute(1, 0, 2),
        atol=1e-5,
    )


def test_eval_output_equals_codes_to_vectors() -> None:
    q = _quantizer().eval()
    out = q(torch.randn(3, 4, 8))
    assert torch.equal(out.quantized, q.codes_to_vectors(out.codes))
    shared = _quantizer(combine_groups=True).eval()
    out = shared(torch.randn(3, 4, 8))
    assert shared.codebook.shape == (1, 5, 4)
    assert torch.equal(out.quantized, shared.codes_to_vectors(out.codes))


def test_straight_through_gradient_reaches_the_input() -> None:
    q = _quantizer()
    x = torch.randn(2, 6, 8, requires_grad=True)
    weights = torch.randn(2, 6, 8)
    (q(x).quantized * weights).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the gradient is exactly that of sum(z_e * weights): the codeword selection is skipped
    x2 = x.detach().clone().requires_grad_(True)
    (q.project(x2) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_codebook_and_commitment_losses_have_hand_computed_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # One group of two 2-D codewords; z_e given directly (the projection is bypassed).
    q = KMeansVectorQuantizer(input_dim=2, num_codebooks=1, codebook_size=2, codevector_dim=2, gamma=0.25)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]))
    ze = torch.tensor([[[0.2, -0.1], [0.9, 1.3], [0.6, 0.7]]], requires_grad=True)  # (B=1, T=3, D=2)
    monkeypatch.setattr(q, "project", lambda x, frame_mask=None: ze)
    out = q(torch.zeros(1, 3, 2))
    assert out.codes.flatten().tolist() == [0, 1, 1]
    zq = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    diff = ze.detach()[0] - zq  # (3, 2)
    n = diff.numel()
    expected_loss = (1 + 0.25) * diff.pow(2).sum() / n
    torch.testing.assert_close(out.loss, expected_loss)
    out.loss.backward()
    # commitment: d/dz_e [gamma * mean((z_e - sg(z_q))^2)] = 2 gamma (z_e - z_q) / n
    torch.testing.assert_close(ze.grad[0], 2 * 0.25 * diff / n)
    # codebook: d/de_k [mean((e_k - sg(z_e))^2)] = 2 sum over frames assigned to k of (e_k - z_e) / n
    expected_book = torch.stack([-2 * diff[0] / n, -2 * (diff[1] + diff[2]) / n])
    torch.testing.assert_close(q.codebook.grad[0], expected_book)


def test_ema_moves_codewords_toward_assigned_means(monkeypatch: pytest.MonkeyPatch) -> None:
    q = KMeansVectorQuantizer(input_dim=2, num_codebooks=1, codebook_size=2, codevector_dim=2, ema_decay=0.5)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[[0.0, 0.0], [4.0, 4.0]]]))
        q.embed_avg.copy_(q.codebook)
    ze = torch.tensor([[[1.0, 1.0], [1.0, 0.0], [5.0, 5.0]]])
    monkeypatch.setattr(q, "project", lambda x, frame_mask=None: ze)
    before = q.codebook.detach().clone()
    out = q.train()(torch.zeros(1, 3, 2))
    assert not q.codebook.requires_grad
    assert out.codes.flatten().tolist() == [0, 0, 1]
    means = torch.tensor([[1.0, 0.5], [5.0, 5.0]])
    for k in range(2):
        assert torch.dist(q.codebook[0, k], means[k]) < torch.dist(before[0, k], means[k])
    # EMA mode has no codebook term: only the commitment loss remains
    diff = ze[0] - before[0, out.codes.flatten()]
    torch.testing.assert_close(out.loss, 0.25 * diff.pow(2).mean())


def test_dead_codes_are_reset_to_batch_inputs() -> None:
    torch.manual_seed(0)
    q = _quantizer(num_codebooks=1, codebook_size=6, codevector_dim=8, dead_code_threshold=0.5)
    with torch.no_grad():
        q.codebook.mul_(0).add_(100.0)  # far from every input: dead after one update
        q.codebook[0, 0] = 0.0
        q.cluster_size.fill_(0.5)  # usage decays below the threshold unless the code is picked
    q.train()(torch.randn(4, 10, 8))
    assert int((q.codebook[0, 1:] == 100.0).all(-1).sum()) == 0
    assert q.num_dead_codes() == 0


def test_padding_changes_neither_codes_nor_losses() -> None:
    q = _quantizer().eval()
    x = torch.randn(1, 6, 8)
    padded = torch.cat([x, torch.randn(1, 4, 8) * 10], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4])
    a, b = q(x), q(padded, mask)
    assert torch.equal(a.codes, b.codes[:, :6])
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.code_perplexity, b.code_perplexity)


def test_usage_is_reported_as_perplexity() -> None:
    q = _quantizer(codebook_size=16).eval()
    out = q(torch.randn(4, 50, 8))
    assert 1.0 <= float(out.code_perplexity) <= 2 * 16
    assert out.num_codes == 32 and out.temperature == 0.0
    assert q.num_dead_codes() == 0


def test_quantizer_rejects_indivisible_dims() -> None:
    with pytest.raises(ValueError, match="`codevector_dim` must be a multiple of `num_codebooks`"):
        build_kmeans_quantizer(KMeansQuantizerConfig(num_codebooks=3, codevector_dim=8), input_dim=9)
    with pytest.raises(ValueError, match="`input_dim` must be a multiple of `num_codebooks`"):
        KMeansVectorQuantizer(input_dim=8, num_codebooks=3, codebook_size=4, codevector_dim=9)
    with pytest.raises(ValueError, match="ema_decay"):
        KMeansQuantizerConfig(ema_decay=1.5)


def test_wav2vec2_trains_with_the_kmeans_quantizer() -> None:
    cfg = wav2vec2_tiny()
    cfg.quantizer_type = "kmeans"
    cfg.kmeans = KMeansQuantizerConfig(codebook_size=16, codevector_dim=16)
    model = build_wav2vec2(cfg)
    assert isinstance(model.quantizer, KMeansVectorQuantizer)
    out = model(torch.randn(2, 8000), generator=torch.Generator().manual_seed(0))
    loss = model.compute_loss(out)
    assert torch.isfinite(loss.total)
    torch.testing.assert_close(loss.diversity, out.num_targets * out.quantizer.loss)
    loss.total.backward()
    assert model.quantizer.codebook.grad is not None and model.quantizer.codebook.grad.abs().sum() > 0
    assert model.feature_encoder.layers[0].conv.weight.grad.abs().sum() > 0


def test_kmeans_quantizer_runs_in_fp32_under_bf16_autocast() -> None:
    # The encoder hands the quantizer bf16 activations under autocast; its projection, distances
    # and losses must still run in fp32 (this crashed before: bf16 input, fp32 conv weight).
    cfg = wav2vec2_tiny()
    cfg.quantizer_type = "kmeans"
    cfg.kmeans = KMeansQuantizerConfig(codebook_size=16, codevector_dim=16)
    torch.manual_seed(0)
    model = build_wav2vec2(cfg)
    waves = torch.randn(2, 8000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(waves, generator=torch.Generator().manual_seed(0))
        loss = model.compute_loss(out)
    assert out.quantizer.quantized.dtype == torch.float32 and out.quantizer.loss.dtype == torch.float32
    loss.total.backward()
    assert model.quantizer.input_proj.weight.grad is not None
    assert torch.isfinite(model.quantizer.input_proj.weight.grad).all()
    # the same frames, quantized without autocast, mostly pick the same codes (bf16 encoder noise)
    with torch.no_grad():
        features = model.encode(waves, None)[0]
        _, normed = model.feature_projection(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ze_bf16 = model.quantizer.project(normed.bfloat16())
        ze = model.quantizer.project(normed)
    assert ze_bf16.dtype == torch.float32
    torch.testing.assert_close(ze_bf16, ze, rtol=0.05, atol=0.05)
