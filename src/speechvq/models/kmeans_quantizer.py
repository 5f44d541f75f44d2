"""k-means (VQ-VAE style) product quantizer (vq-wav2vec paper section 3.2; van den Oord et al., 2017).

Each of G groups picks the nearest of V codewords by Euclidean distance; gradients pass straight
through the selection. The codewords learn either through the codebook loss (fairseq's
``KmeansVectorQuantizer``) or, as an option beyond fairseq, through exponential moving averages of
the inputs assigned to them (VQ-VAE-2), with optional reset of unused ("dead") codewords.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechvq.config import KMeansQuantizerConfig
from speechvq.models.quantizer import QuantizerOutput, VectorQuantizer, perplexity
from speechvq.models.randomness import Draws


def _broadcast_from_first_(tensor: Tensor) -> None:
    """Copy rank 0's ``tensor`` to every rank in place (no-op without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(tensor, src=0)


def squared_distances(x: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distance of every vector to every codeword, per group.

    Args:
        x: ``[N, G, d]`` vectors.
        codebook: ``[G, V, d]`` codewords.

    Returns:
        ``[N, G, V]`` distances (fp32).
    """
    x = x.float()
    codebook = codebook.float()
    # |x|^2 - 2 x.e + |e|^2; (N, G, d) x (G, V, d) -> (N, G, V)
    cross = torch.einsum("ngd,gvd->ngv", x, codebook)
    return x.pow(2).sum(-1, keepdim=True) - 2.0 * cross + codebook.pow(2).sum(-1)[None]


def masked_mse(a: Tensor, b: Tensor, frame_mask: Tensor | None) -> Tensor:
    """Mean of (a - b)^2 over the valid frames and all channels of ``[N, D]`` inputs."""
    squares = (a - b).pow(2)
    if frame_mask is None:
        return squares.mean()
    weights = frame_mask.to(squares.dtype)[:, None]
    return (squares * weights).sum() / (weights.sum() * squares.size(-1)).clamp(min=1.0)


class KMeansVectorQuantizer(VectorQuantizer):
    """G groups of V codewords picked by nearest neighbour, with straight-through gradients.

    The input is first projected by a grouped 1x1 conv and a GroupNorm with G groups (fairseq
    ``projection``), giving z_e; the output is the nearest codewords z_q, whose gradient is copied
    to z_e. ``loss`` of the output is ``||sg(z_e) - z_q||^2 + gamma ||z_e - sg(z_q)||^2``
    (mean over elements); in EMA mode the codebook term is dropped and the codewords are updated
    in place on every training call.

    Args:
        input_dim: C, dimension of the input features.
        num_codebooks: G (fairseq ``groups``).
        codebook_size: V (fairseq ``num_vars``).
        codevector_dim: dimension of the concatenated output (``G * d``).
        combine_groups: one codebook shared by all groups.
        gamma: weight of the commitment loss.
        ema_decay: decay of the moving averages, or None for the codebook loss.
        dead_code_threshold: reset codewords whose moving-average usage falls below this.
    """

    cluster_size: Tensor
    embed_avg: Tensor

    def __init__(
        self,
        *,
        input_dim: int,
        num_codebooks: int,
        codebook_size: int,
        codevector_dim: int,
        combine_groups: bool = False,
        gamma: float = 0.25,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("input_dim", input_dim), ("codevector_dim", codevector_dim)):
            if value % num_codebooks != 0:
                raise ValueError(
                    f"`{name}` must be a multiple of `num_codebooks` ({num_codebooks}), but is {value} instead."
                )
        self.num_codebooks = num_codebooks
        self.codebook_size = codebook_size
        self.combine_groups = combine_groups
        self.gamma = gamma
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        num_books = 1 if combine_groups else num_codebooks
        self.input_proj = nn.Conv1d(input_dim, codevector_dim, 1, groups=num_codebooks, bias=False)
        self.input_norm = nn.GroupNorm(num_codebooks, codevector_dim)
        self.codebook = nn.Parameter(torch.empty(num_books, codebook_size, codevector_dim // num_codebooks))
        # Moving-average usage (assignments per call) of every codeword: reported, and drives the
        # dead-code reset; with EMA it is also the denominator of the codeword means.
        self.register_buffer("cluster_size", torch.ones(num_books, codebook_size))
        self.register_buffer(
            "embed_avg", torch.empty(num_books, codebook_size, codevector_dim // num_codebooks)
        )
        self.reset_parameters()
        if ema_decay is not None:
            self.codebook.requires_grad_(False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.codebook, mean=0.0, std=0.01)
        nn.init.kaiming_uniform_(self.input_proj.weight, a=5**0.5)
        nn.init.ones_(self.input_norm.weight)
        nn.init.zeros_(self.input_norm.bias)
        with torch.no_grad():
            self.cluster_size.fill_(1.0)
            self.embed_avg.copy_(self.codebook)

    def expanded_codebook(self) -> Tensor:
        """``[G, V, d]`` codewords of every group (the shared book repeated if ``combine_groups``)."""
        if self.combine_groups:
            return self.codebook.expand(self.num_codebooks, -1, -1)
        return self.codebook

    def num_dead_codes(self) -> int:
        """Codewords whose moving-average usage is below the reset threshold (or 1e-3 if unset)."""
        threshold = self.dead_code_threshold if self.dead_code_threshold > 0 else 1e-3
        return int((self.cluster_size < threshold).sum())

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """``[..., G]`` codes -> ``[..., codevector_dim]`` codewords."""
        book = self.expanded_codebook()
        groups = torch.arange(self.num_codebooks, device=codes.device).expand_as(codes)
        return book[groups, codes].flatten(-2)  # (..., G, d) -> (..., G*d)

    def project(self, x: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """z_e: ``[B, T, C]`` -> ``[B, T, codevector_dim]``, in fp32.

        A grouped 1x1 conv, then a GroupNorm with G groups whose statistics run over each group's
        channels and the utterance's time axis (fairseq ``Fp32GroupNorm(G, D)``); with
        ``frame_mask`` (``[B, T]``, True = valid) padded frames are left out of the statistics.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 on bf16/fp16 input too
            return self._project(x.float(), frame_mask)

    def _project(self, x: Tensor, frame_mask: Tensor | None) -> Tensor:
        weight_proj = self.input_proj.weight.float()
        h = F.conv1d(
            x.transpose(1, 2), weight_proj, None, groups=self.num_codebooks
        )  # (B, T, C) -> (B, D, T)
        weight, bias = self.input_norm.weight.float(), self.input_norm.bias.float()
        eps = self.input_norm.eps
        if frame_mask is None or bool(frame_mask.all()):
            return F.group_norm(h, self.num_codebooks, weight, bias, eps).transpose(1, 2)
        batch, dim, frames = h.shape
        grouped = h.view(batch, self.num_codebooks, -1, frames)  # (B, D, T) -> (B, G, D/G, T)
        valid = frame_mask.to(h.dtype)[:, None, None, :]  # (B, 1, 1, T)
        count = (valid.sum(-1, keepdim=True) * grouped.size(2)).clamp(min=1.0)
        mean = (grouped * valid).sum((-2, -1), keepdim=True) / count
        var = (((grouped - mean) * valid) ** 2).sum((-2, -1), keepdim=True) / count
        normed = ((grouped - mean) * torch.rsqrt(var + eps)).view(batch, dim, frames)
        normed = normed * weight[None, :, None] + bias[None, :, None]
        return normed.transpose(1, 2)  # (B, D, T) -> (B, T, D)

    def forward(
        self,
        x: Tensor,
        frame_mask: Tensor | None = None,
        *,
        draws: Draws | None = None,
        counted: Tensor | None = None,
    ) -> QuantizerOutput:
        """Quantize ``x`` (``[B, T, C]``); ``frame_mask`` (``[B, T]`` bool, True = valid) selects
        the frames that count in the losses, the perplexity and the codebook updates. ``draws``
        and ``counted`` are the :class:`VectorQuantizer` interface's: nearest-codeword assignment
        draws no noise, and the losses and codebook statistics must cover every valid frame, so
        ``counted`` does not narrow them."""
        batch, frames, _ = x.shape
        g = self.num_codebooks
        with torch.autocast(device_type=x.device.type, enabled=False):
            ze = self.project(x, frame_mask)  # (B, T, D)
            flat = ze.reshape(batch * frames, g, -1)  # (B, T, D) -> (B*T, G, d)
            book = self.expanded_codebook().float()
            codes = squared_distances(flat.detach(), book).argmin(dim=-1)  # (B*T, G)
            zq = book[torch.arange(g, device=x.device)[None, :], codes]  # (B*T, G, d)
            zq = zq.reshape(batch, frames, -1)  # (B*T, G, d) -> (B, T, D)
            flat_mask = frame_mask.reshape(-1) if frame_mask is not None else None
            hard = F.one_hot(codes, self.codebook_size).float()  # (B*T, G, V)
            code_ppl = perplexity(hard, flat_mask)
            if self.training:
                self._update_codebook_(flat.detach(), hard, flat_mask)
            ze2, zq2 = ze.reshape(batch * frames, -1), zq.reshape(batch * frames, -1)
            commitment = masked_mse(ze2, zq2.detach(), flat_mask)
            loss = self.gamma * commitment
            if self.ema_decay is None:
                loss = loss + masked_mse(zq2, ze2.detach(), flat_mask)
            # Straight-through: the value of z_q, the gradient of z_e (fairseq ``_pass_grad``).
            quantized = zq.detach() + (ze - ze.detach())
        return QuantizerOutput(
            quantized=quantized,
            codes=codes.view(batch, frames, g),
            code_perplexity=code_ppl,
            prob_perplexity=code_ppl.detach(),
            temperature=0.0,
            num_codes=self.num_codes,
            loss=loss,
        )

    @torch.no_grad()
    def _update_codebook_(self, flat: Tensor, hard: Tensor, frame_mask: Tensor | None) -> None:
        """EMA of usage (always) and of assigned means (EMA mode), then the dead-code reset."""
        if frame_mask is not None:
            flat, hard = flat[frame_mask], hard[frame_mask]
        if flat.size(0) == 0:
            return
        if self.combine_groups:
            # every group's vectors feed the one shared book: (N, G, .) -> (N*G, 1, .)
            flat, hard = flat.reshape(-1, 1, flat.size(-1)), hard.reshape(-1, 1, hard.size(-1))
        counts = hard.sum(0)  # (G', V)
        sums = torch.einsum("ngv,ngd->gvd", hard, flat.float())  # (G', V, d)
        # Data-parallel ranks must see the same statistics, or their codebooks would drift apart.
        if self.cross_process_sum is not None:
            counts, sums = self.cross_process_sum(counts), self.cross_process_sum(sums)
        decay = 0.99 if self.ema_decay is None else self.ema_decay
        self.cluster_size.lerp_(counts, 1.0 - decay)
        if self.ema_decay is not None:
            self.embed_avg.lerp_(sums, 1.0 - self.ema_decay)
            # Laplace smoothing keeps the mean of a codeword that gets no inputs finite.
            total = self.cluster_size.sum(-1, keepdim=True)
            eps = 1e-5
            smoothed = (self.cluster_size + eps) / (total + self.codebook_size * eps) * total
            self.codebook.data.copy_(self.embed_avg / smoothed[..., None])
        if self.dead_code_threshold > 0:
            self._reset_dead_codes_(flat)

    @torch.no_grad()
    def _reset_dead_codes_(self, flat: Tensor) -> None:
        """Replace codewords used less than the threshold by random inputs of this batch."""
        dead = self.cluster_size < self.dead_code_threshold  # (G', V)
        if not bool(dead.any()):  # usage is all-reduced, so every rank takes the same branch
            return
        for book in range(dead.size(0)):
            index = dead[book].nonzero().squeeze(-1)
            if index.numel() == 0:
                continue
            pick = torch.randint(flat.size(0), (index.numel(),), device=flat.device)
            vectors = flat[pick, book].to(self.codebook.dtype)
            self.codebook.data[book, index] = vectors
            self.embed_avg[book, index] = vectors
            self.cluster_size[book, index] = 1.0
        # The random picks differ per rank: every rank takes rank 0's codebook.
        if self.cross_process_sum is not None:
            for tensor in (self.codebook.data, self.embed_avg, self.cluster_size):
                _broadcast_from_first_(tensor)


def build_kmeans_quantizer(cfg: KMeansQuantizerConfig, input_dim: int) -> KMeansVectorQuantizer:
    """Build the k-means quantizer of ``cfg`` over ``input_dim``-dimensional features."""
    return KMeansVectorQuantizer(
        input_dim=input_dim,
        num_codebooks=cfg.num_codebooks,
        codebook_size=cfg.codebook_size,
        codevector_dim=cfg.codevector_dim,
        combine_groups=cfg.combine_groups,
        gamma=cfg.gamma,
        ema_decay=cfg.ema_decay,
        dead_code_threshold=cfg.dead_code_threshold,
    )
