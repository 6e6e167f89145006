"""RMSNorm's hand-written CPU path (components/layers.py) against the definition written here, and the cases
where torch's own RMSNorm must run instead."""

from __future__ import annotations

import pytest
import torch

from mimo_spec.components.layers import RMSNorm, _RMSNormRows, build_norm


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps) * weight.double()).to(x.dtype)


@pytest.mark.parametrize("shape", [(7, 32), (3, 5, 16), (2, 3, 4, 8)])
def test_values_and_gradients_match_the_definition(shape):
    torch.manual_seed(0)
    norm = build_norm("rmsnorm", shape[-1], eps=1e-6)
    assert isinstance(norm, RMSNorm)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(*shape) * 3).requires_grad_()
    g = torch.randn(*shape)
    y = norm(x)
    assert type(y.grad_fn).__name__ == "_RMSNormRowsBackward"  # the hand-written path ran
    dx, dw = torch.autograd.grad(y, (x, norm.weight), g)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    y_ref = reference(x_ref, w_ref, 1e-6)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x_ref, w_ref), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    theirs = torch.nn.RMSNorm(shape[-1], eps=1e-6)
    theirs.load_state_dict(norm.state_dict())
    assert torch.equal(y, theirs(x))  # the forward runs torch's (and transformers') ops: the same bits
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_expanded_gradient():
    torch.manual_seed(1)
    norm = RMSNorm(16, eps=1e-5)
    x = torch.randn(16, 6, 4).movedim(0, -1).requires_grad_()  # (6, 4, 16), last dim strided
    (dx,) = torch.autograd.grad(norm(x).sum(), x)  # sum's gradient is an expand (stride 0)
    x_ref = x.detach().clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference(x_ref, norm.weight.detach(), 1e-5).sum(), x_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_float64():
    torch.manual_seed(2)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: _RMSNormRows.apply(a, b, 1e-6), (x, w))


def test_torch_runs_where_the_fast_path_does_not_apply():
    torch.manual_seed(3)
    norm = RMSNorm(8)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: torch's policy decides the dtype
        assert type(norm(x).grad_fn).__name__ != "_RMSNormRowsBackward"
    xb = x.detach().bfloat16()
    assert torch.equal(norm.bfloat16()(xb), torch.nn.RMSNorm(8).bfloat16()(xb))
    plain = RMSNorm(8, elementwise_affine=False)  # no weight: torch's
    torch.testing.assert_close(plain(x), reference(x, torch.ones(8), torch.finfo(torch.float32).eps))
