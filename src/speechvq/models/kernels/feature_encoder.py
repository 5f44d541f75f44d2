"""The convolutional feature encoder's fast CPU forms (:mod:`speechvq.models.encoder` is the
plain one): each layer's convolution as whichever form measured fastest on its shape and precision,
and a padded batch convolved one utterance at a time. Forward and backward compute what the plain
encoder computes, to rounding; the numbers behind each choice are in docs/performance.md."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from speechvq.models.encoder import ConvFeatureEncoder, ConvLayerBlock, MaskedGroupNorm, conv_output_lengths
from speechvq.models.kernels import lowp_guard
from speechvq.models.kernels.conv import (
    KernelMajorColumns,
    WindowBlocksConv,
    bf16_on_cpu,
    conv_time_major,
    fp32_on_cpu,
)
from speechvq.models.kernels.linear import linear

_FEW_COLUMNS = 64
"""A conv layer with at most this many input columns (k * C_in; the first layer has 10 x 1) runs as
a batched matmul, and its GroupNorm statistics come from the moments of its input columns."""


def linear_output_moments(
    cols: Tensor, weight: Tensor, bias: Tensor | None, lengths: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-utterance, per-channel variance and mean over time of ``cols @ weight.T + bias``,
    computed from the input's moments, without the output.

    For ``y_t = W x_t + b``: ``mean(y) = W mean(x) + b`` and ``var(y_c) = w_c^T Cov(x) w_c``.
    The first conv layer maps 10 samples to 512 (BASE) channels, so the 10 x 10 covariance of the
    windows is ~50x cheaper than the statistics of the output and its backward (8% of a SMALL
    step), and exact in fp32 whatever precision the layer's matmul ran in.

    Args:
        cols: ``[B, T, J]`` layer input columns.
        weight: ``[C, J]``; bias: ``[C]`` or None.
        lengths: ``[B]`` valid frames, or None for all T.

    Returns:
        (var, mean), fp32, each ``[B, 1, C]`` (biased variance, as GroupNorm).
    """
    with torch.autocast(device_type=cols.device.type, enabled=False):
        rows = (
            [cols] if lengths is None else [cols[b : b + 1, : int(lengths[b])] for b in range(cols.size(0))]
        )
        means, covs = [], []
        for r in rows:  # (b, n, J), b = B without padding, 1 per utterance with it
            r = r.float()
            mu = r.mean(dim=1, keepdim=True)  # (b, 1, J)
            centred = r - mu
            covs.append(centred.transpose(1, 2) @ centred / r.size(1))  # (b, J, J)
            means.append(mu)
        mu, cov = torch.cat(means), torch.cat(covs)
        w = weight.float().t()  # (J, C)
        mean = mu @ w  # (B, 1, J) @ (J, C) -> (B, 1, C)
        if bias is not None:
            mean = mean + bias.float()
        var = ((cov @ w) * w).sum(dim=1, keepdim=True).clamp(min=0.0)  # (B, J, C) -> (B, 1, C)
    return var, mean


class FastConvLayerBlock(ConvLayerBlock):
    """:class:`~speechvq.models.encoder.ConvLayerBlock` (the same parameters and state dict) whose
    convolution runs as whichever form measured fastest on this layer's shape and precision: a
    matrix product over unfolded frames (im2col, one matmul with fp32 accumulation, whose backward
    is also a matmul) for the first layer and off the CPU; for the other layers on the CPU,
    oneDNN's channels-last convolution in bf16 and, in fp32, matmuls over strided views of one
    utterance (:class:`WindowBlocksConv`, no im2col copy). The first layer's GroupNorm statistics
    come from the moments of its input windows (:func:`linear_output_moments`).
    """

    @property
    def few_columns(self) -> bool:
        """At most :data:`_FEW_COLUMNS` input columns (the first layer): a batched matmul, its
        GroupNorm folded in."""
        return self.kernel * self.conv.in_channels <= _FEW_COLUMNS

    def forward(
        self, x: Tensor, lengths: Tensor | None, kernel: tuple[Tensor, Tensor | None] | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x: ``[B, S, C_in]`` -> ``[B, S', C_out]``; lengths in and out in steps of this layer.
        ``kernel``: this layer's weight prepared once by a caller that convolves several
        utterances one at a time on the CPU: :meth:`precast_kernel` in bf16,
        :meth:`window_weights` in fp32."""
        if lengths is not None:
            lengths = conv_output_lengths(lengths, ((0, self.kernel, self.stride),))
        if not self.few_columns and bf16_on_cpu(x):
            how = self.low_precision_mode("conv_time_major")
            if how == lowp_guard.NATIVE:
                x = conv_time_major(x, self.conv.weight, self.conv.bias, self.stride, kernel)
            else:
                x = lowp_guard.island(
                    how, torch.bfloat16, self._time_major, [x, self.conv.weight, self.conv.bias]
                )
            return F.gelu(self.norm(x, lengths) if self.norm is not None else x), lengths
        if x.size(0) == 1 and fp32_on_cpu(x) and self.runs_window_blocks():
            # one utterance on the CPU (ConvFeatureEncoder's CPU path), fp32: no im2col copy
            blocks = kernel if kernel is not None else self.window_weights()
            x = WindowBlocksConv.apply(x.squeeze(0), *blocks, self.conv.bias, self.kernel, self.stride)[None]
            return F.gelu(self.norm(x, lengths) if self.norm is not None else x), lengths
        # (C_out, C_in, k) -> (C_out, k, C_in) -> (C_out, k*C_in), the columns' kernel-major order
        weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)
        cols = KernelMajorColumns.apply(x, self.kernel, self.stride)  # (B, S, C) -> (B, S', k*C)
        if self.few_columns and isinstance(self.norm, MaskedGroupNorm):
            # GroupNorm folded into the matmul: y = (W x + b) * scale + shift = (W * scale) x +
            # (b * scale + shift), with the statistics from the window moments. No pass over the
            # layer's output (the largest activation of the encoder) but the GELU; forward +
            # backward of one 4 s utterance: 19.4 -> 13.6 ms SMALL, 41 -> 18 ms BASE in bf16,
            # 65 -> 38 ms BASE in fp32 (docs/performance.md). In bf16 it is also nearer fp32:
            # the norm's scale is applied in fp32 before the one rounding to bf16.
            var, mean = linear_output_moments(cols, weight, self.conv.bias, lengths)
            scale, shift = self.norm.scale_shift(var, mean)  # fp32 (B, 1, C)
            if self.conv.bias is not None:
                shift = shift + self.conv.bias.float() * scale
            folded = weight.float().t()[None] * scale  # (B, k*C_in, C_out): one weight per utterance
            inputs = [shift.to(cols.dtype), cols, folded.to(cols.dtype)]
            x = self._guarded_matmul("baddbmm", torch.baddbmm, inputs, [(2, 1), (2, 64), (2, cols.size(-1))])
            return F.gelu(x), lengths
        if self.few_columns:
            # [B, S', k] @ [k, C] per utterance: autograd's weight gradient is then a bmm + sum,
            # 2.5-3x faster than the [C, B*S'] @ [B*S', k] mm it derives from F.linear (bench in
            # docs/performance.md)
            inputs = [cols, weight.t().expand(cols.size(0), -1, -1)]
            x = self._guarded_matmul("bmm", torch.bmm, inputs, [(2, 64), (2, cols.size(-1))])
            if self.conv.bias is not None:
                x = x + self.conv.bias.to(x.dtype)
        else:
            x = linear(cols, weight, self.conv.bias)
        if self.norm is not None:
            x = self.norm(x, lengths)
        return F.gelu(x), lengths

    def low_precision_mode(self, op: str) -> str:
        """How this layer's bf16 time-major conv runs on this CPU (:mod:`lowp_guard`)."""
        conv = self.conv
        shape = f"in {conv.in_channels}, out {conv.out_channels}, kernel {self.kernel}, stride {self.stride}"
        samples = self.kernel + self.stride * 63  # 64 output frames
        probe = [(1, samples, conv.in_channels), tuple(conv.weight.shape)]
        probe += [(conv.out_channels,)] if conv.bias is not None else []
        return lowp_guard.mode(op, shape, torch.bfloat16, self._time_major, lowp_guard.randn_inputs(*probe))

    def _time_major(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """:func:`conv_time_major` of ``[B, S, C_in]``, in the inputs' dtype."""
        return conv_time_major(x, weight, bias, self.stride)

    def _guarded_matmul(self, op: str, fn: Any, inputs: list[Tensor], rows: list[tuple[int, int]]) -> Tensor:
        """The first layer's batched matmul ``fn(*inputs)``, checked by :mod:`lowp_guard` in
        bf16 / fp16 on the CPU; ``rows``: the probe's leading dims of each input."""
        if lowp_guard.low_precision_dtype(inputs[0]) is None:
            return fn(*inputs)
        columns, channels = inputs[-1].shape[-2:]
        probe = [
            (*lead, size) for lead, size in zip(rows, [channels] * (len(inputs) - 2) + [columns, channels])
        ]
        shape = f"[T, {columns}] @ [{columns}, {channels}]"
        return lowp_guard.call(op, shape, fn, inputs, lowp_guard.randn_inputs(*probe))

    def runs_window_blocks(self) -> bool:
        """Whether an fp32 utterance on the CPU runs through :class:`WindowBlocksConv` (every layer
        but the first, whose windows span at most two strides)."""
        return not self.few_columns and self.kernel <= 2 * self.stride

    def window_weights(self) -> tuple[Tensor, Tensor | None]:
        """:class:`WindowBlocksConv`'s two weight blocks, differentiable: the kernel-major
        ``[C_out, k*C_in]`` weight's first ``min(k, s) * C_in`` columns and the rest (None when
        ``k <= s``), each contiguous. oneDNN copies a weight that is not dense for every product,
        so a caller that convolves several utterances makes these once for all of them."""
        # (C_out, C_in, k) -> (C_out, k, C_in) -> (C_out, k*C_in), the columns' kernel-major order
        weight = self.conv.weight.permute(0, 2, 1).reshape(self.conv.out_channels, -1)
        if self.kernel <= self.stride:
            return weight, None
        split = self.stride * self.conv.in_channels  # min(k, s) = s here
        return weight[:, :split].contiguous(), weight[:, split:].contiguous()

    def precast_kernel(self) -> tuple[Tensor, Tensor] | None:
        """The weight as the channels-last ``[C_out, C_in, 1, k]`` kernel that oneDNN convolves
        with on the CPU, for :class:`PrecastKernelConv`: in the weight's dtype (differentiable:
        the utterances' gradients are summed in this layout, then transposed back once) and in
        bf16 (detached). None for a layer that runs as a matmul (the first)."""
        if self.few_columns:
            return None
        kernel = self.conv.weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        return kernel, kernel.detach().to(torch.bfloat16)


class FastConvFeatureEncoder(ConvFeatureEncoder):
    """:class:`~speechvq.models.encoder.ConvFeatureEncoder` of :class:`FastConvLayerBlock`, which
    on the CPU convolves a padded batch one utterance at a time."""

    def _encode(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        batch, samples = waveforms.shape
        if not (waveforms.device.type == "cpu" and batch > 1):
            return self._layers(waveforms[:, :, None], lengths)  # (B, S) -> (B, S, 1)
        # One utterance at a time: no padding is convolved (11% of the conv FLOPs on the
        # benchmark's batch), and batch-1 convolutions run faster here even without
        # padding (+10% bf16, +17% fp32 per SMALL step on 4 x 4 s). The valid frames are
        # the batched call's (each depends on valid samples only, and the norms are per
        # utterance); padded frames are zeros. Off the CPU the batched call stays (one
        # launch per layer; no GPU has been available to time the per-utterance form).
        frames = int(self.output_lengths(torch.tensor([samples]))[0])
        # each layer's weight laid out once for all utterances: bf16 cast (PrecastKernelConv)
        # or fp32 window blocks (WindowBlocksConv)
        kernels = None
        if bf16_on_cpu(waveforms):
            kernels = [layer.precast_kernel() for layer in self.layers]
        elif fp32_on_cpu(waveforms):
            kernels = [
                layer.window_weights() if layer.runs_window_blocks() else None for layer in self.layers
            ]
        parts = [
            self._layers(waveforms[b : b + 1, :n, None], None, kernels)[0][0]
            for b, n in enumerate(lengths.tolist())
        ]
        x = torch.nn.utils.rnn.pad_sequence(parts, batch_first=True)  # (B, max n, C)
        x = F.pad(x, (0, 0, 0, frames - x.size(1)))  # (B, T, C)
        frame_lengths = self.output_lengths(lengths)
        return x, frame_lengths

    def _layers(
        self,
        x: Tensor,
        lengths: Tensor | None,
        kernels: list[tuple[Tensor, Tensor | None] | None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the conv layers on ``[B, S, 1]``; lengths in samples -> frames (None: all valid);
        ``kernels``: each layer's weight prepared for the batch (:meth:`FastConvLayerBlock.forward`'s
        ``kernel``), or None."""
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        frame_lengths = lengths
        for i, layer in enumerate(self.layers):
            kernel = kernels[i] if kernels is not None else None
            if recompute:  # keep only the layer's input; recompute the rest in the backward
                x, frame_lengths = checkpoint(layer, x, frame_lengths, kernel, use_reentrant=False)
            else:
                x, frame_lengths = layer(x, frame_lengths, kernel)
        if frame_lengths is None:
            frame_lengths = torch.full((x.size(0),), x.size(1), dtype=torch.long, device=x.device)
        return x, frame_lengths
