"""The Gauss-Newton output Hessians of ``_backend/hvp_gauss_newton.py`` where autograd cannot batch them."""

import pytest
import torch

from captum_influence._backend.hvp_gauss_newton import output_hessians


class _Twice(torch.autograd.Function):
    """2 x g, whose own backward reads a number: the loss's second derivative has no batching rule."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 2 * x * g

    @staticmethod
    def backward(ctx, h):
        x, g = ctx.saved_tensors
        scale = float(h.abs().sum() >= 0)
        return 2 * g * h * scale, 2 * x * h * scale


class _Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        return _Twice.apply(ctx.saved_tensors[0], g)


def test_output_hessians_without_batched_gradients_warn_and_agree():
    """sum_c o_c^2 has the output Hessian 2 I; computed row by row, with a warning saying so."""
    out = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="one backward per output dimension"):
        lam = output_hessians(out, lambda o: _Square.apply(o).sum(1))
    assert torch.equal(lam, 2 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4))
