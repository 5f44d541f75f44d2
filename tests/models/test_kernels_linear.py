"""The fp32 linear layers on oneDNN's matmul (models/kernels/linear.py: linear, matmul_nt)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from speechvq.models.kernels import linear as common
from speechvq.models.kernels.linear import FastLinear as Linear
from speechvq.models.kernels.linear import linear, matmul_nt

needs_onednn = pytest.mark.skipif(not common.ONEDNN_FP32_LINEAR, reason="needs oneDNN on an x86 CPU")


def _ops_run(fn) -> set[str]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op) for op in counter.get_flop_counts()["Global"]}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (3, 29, 48)])
def test_linear_equals_f_linear_in_output_and_every_gradient(shape, bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(40, 48, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    params = [t for t in (x, weight, b) if t is not None]
    upstream = torch.randn(*shape[:-1], 40)
    got = linear(x, weight, b)
    want = F.linear(x, weight, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(torch.autograd.grad(got, params, upstream), torch.autograd.grad(want, params, upstream)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_fp32_linear_runs_every_product_on_onednn_and_counts_its_flops():
    x = torch.randn(50, 64, requires_grad=True)
    weight = torch.randn(32, 64, requires_grad=True)

    def step():
        linear(x, weight).sum().backward()

    ops = _ops_run(step)
    assert ops == {"mkldnn._linear_pointwise"}  # forward, input and weight gradients: no mm
    with FlopCounterMode(display=False) as counter:
        step()
    assert counter.get_total_flops() == 3 * 2 * 50 * 64 * 32


def test_linear_leaves_autocast_and_other_dtypes_to_f_linear():
    x = torch.randn(20, 16)
    weight = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, weight)
    assert y.dtype == torch.bfloat16
    assert "mkldnn._linear_pointwise" not in _ops_run(lambda: linear(x.double(), weight.double()))
    torch.testing.assert_close(linear(x.double(), weight.double()), F.linear(x.double(), weight.double()))


def test_linear_module_keeps_nn_linear_state_dict():
    torch.manual_seed(0)
    ours, ref = Linear(12, 7), torch.nn.Linear(12, 7)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    assert isinstance(ours, torch.nn.Linear)


@pytest.mark.parametrize("use_onednn", [True, False])
def test_matmul_nt_reads_strided_views_and_copies_only_a_strided_weight(monkeypatch, use_onednn):
    # oneDNN takes a non-dense weight to its reference kernel (~1000x slower): matmul_nt must
    # copy it, and still read strided x in place; the results are the same on either backend
    monkeypatch.setattr(common, "ONEDNN_FP32_LINEAR", use_onednn and common.ONEDNN_FP32_LINEAR)
    torch.manual_seed(0)
    x = torch.randn(41, 24)
    rows = x.as_strided((10, 6), (24, 1), 6)  # every 4th row's second quarter
    wide = torch.randn(5, 18)
    weight = wide[:, 6:12]  # row stride 18: not dense
    add = torch.randn(10, 5)
    bias = torch.randn(5)
    want = rows @ weight.t() + bias + add
    torch.testing.assert_close(matmul_nt(rows, weight, bias, add), want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(10, 5)
    torch.testing.assert_close(matmul_nt(rows.t(), grad.t()), rows.t() @ grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matmul_nt(grad.t(), rows.t()), grad.t() @ rows, rtol=1e-5, atol=1e-5)
