"""Speed-only kernels, and the one switch between them and plain PyTorch.

A model is built from plain modules (:mod:`speechvq.models.common`, ``context``, ``encoder``):
``nn.Linear`` / ``F.linear``, ``nn.Dropout``, ``nn.Conv1d``, ``F.scaled_dot_product_attention``
with a padding mask, a padded batch. Each module this package speeds up has a fast subclass here
that keeps its parameters and state dict and computes the same values (to rounding) in a form
measured faster on the CPU: oneDNN's fp32 matmul, a cheaper dropout sampler, window-block and
channels-last convolutions, a positional conv with a forward-form input gradient, Transformer
blocks over the valid frames only (packed). :func:`select_` switches a built model between the two
sets; the builders (``build_wav2vec2(cfg, fast=...)`` and the others) call it once.

The low-precision guard (:mod:`~speechvq.models.kernels.lowp_guard`) is not a speed kernel: it
catches wrong bf16 / fp16 oneDNN kernels, which plain PyTorch calls too, so both sets use it.
"""

from __future__ import annotations

import functools
from typing import TypeVar

from torch import nn

M = TypeVar("M", bound=nn.Module)


def select_(model: M, *, fast: bool) -> M:
    """Switch every submodule of ``model`` that has a fast form to it (``fast=True``) or back to
    its plain PyTorch form (``fast=False``), in place; returns ``model``.

    A fast module is a subclass of its plain module that adds no state, so the switch changes
    only its class (as ``torch.nn.utils.parametrize`` does): parameters, buffers, the state dict
    and the optimizer's references stay as they are, and switching back and forth is lossless.
    """
    table = _fast_forms() if fast else {f: p for p, f in _fast_forms().items()}
    for module in model.modules():
        form = table.get(type(module))
        if form is not None:
            module.__class__ = form
    return model


@functools.cache
def _fast_forms() -> dict[type[nn.Module], type[nn.Module]]:
    """Plain module class -> its fast subclass (imported on first use: the fast modules subclass
    the model modules, which import this package)."""
    from speechvq.models.kernels.context import (
        FastContextNetwork,
        FastConvPositionalEmbedding,
        FastSelfAttention,
    )
    from speechvq.models.kernels.dropout import FastDropout
    from speechvq.models.kernels.feature_encoder import FastConvFeatureEncoder, FastConvLayerBlock
    from speechvq.models.kernels.linear import FastLinear

    fast: list[type[nn.Module]] = [
        FastLinear,
        FastDropout,
        FastConvLayerBlock,
        FastConvFeatureEncoder,
        FastConvPositionalEmbedding,
        FastSelfAttention,
        FastContextNetwork,
    ]
    return {cls.__bases__[0]: cls for cls in fast}
