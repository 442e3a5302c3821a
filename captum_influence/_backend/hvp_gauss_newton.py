"""Gauss-Newton probes: vectors whose output gradients give the Gauss-Newton curvature.

For a loss l(y) of the model's output y (B, C) the Gauss-Newton matrix of example b is
G_b = J_b^T Lambda_b J_b, with J_b = dy_b / dtheta and Lambda_b = d^2 l_b / dy_b^2 (C x C). With
U_b U_b^T = Lambda_b (an eigendecomposition, negative eigenvalues set to zero: the nearest
positive semidefinite matrix), the gradient of the scalar u_{b,c} . y_b is J_b^T u_{b,c}, and

    G_b = sum_c (J_b^T u_{b,c}) (J_b^T u_{b,c})^T,

so the per-example gradients of the C "probe" outputs ``(y * U[..., c]).sum(-1)``, which the
layer engine computes like any other per-example function, carry the whole Gauss-Newton matrix:
its trace, the K-FAC factors and the eigenvalue corrections. For cross-entropy
Lambda = diag(p) - p p^T, of rank C - 1: the probe common to every example (the null direction
of the softmax) is dropped, so C - 1 probes remain. With more than ``max_probes`` columns a
Gaussian sketch U E / sqrt(s) (E a seeded (C, s) normal matrix) keeps the expectation exact.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .hvp import symmetric_eigh


def output_hessians(out: torch.Tensor, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Lambda (B, C, C): each example's Hessian of ``loss_of(o)[b]`` with respect to its output o_b,
    from one gradient with a graph and C second derivatives (examples must not interact)."""
    n, width = out.shape[0], out[0].numel()
    o = out.detach().reshape(n, width).clone().requires_grad_(True)
    with torch.enable_grad():
        losses = loss_of(o.reshape(out.shape))
        if not isinstance(losses, torch.Tensor) or losses.shape != (n,):
            got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"loss: must return one loss per example, shape ({n},); got {got}.")
        (first,) = torch.autograd.grad(losses.sum(), o, create_graph=True)
        hess = torch.zeros(n, width, width, dtype=o.dtype, device=o.device)
        if first.requires_grad:
            # Row c of every example's Hessian is d(sum_b first[b, c]) / do: all rows in one
            # backward vmapped over c, or one backward per row where vmap cannot run the loss.
            eye = torch.eye(width, dtype=o.dtype, device=o.device)[:, None, :].expand(width, n, width)
            try:
                (rows,) = torch.autograd.grad(
                    first, o, eye, retain_graph=True, is_grads_batched=True, allow_unused=True
                )
                if rows is not None:
                    hess = rows.transpose(0, 1)
            except RuntimeError as err:
                warnings.warn(
                    "Gauss-Newton output Hessians: the loss cannot be differentiated with batched gradients "
                    f"({str(err).splitlines()[0] if str(err) else 'RuntimeError'}); using one backward per output "
                    f"dimension ({width}), slower, the same Hessians."
                )
                for c in range(width):
                    (row,) = torch.autograd.grad(first[:, c].sum(), o, retain_graph=c < width - 1, allow_unused=True)
                    if row is not None:
                        hess[:, c] = row
    return (hess + hess.transpose(1, 2)) / 2


def softmax_cross_entropy_hessians(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Lambda = (diag(p) - p p^T) / T^2 of cross-entropy on logits / T, p = softmax(logits / T),
    in closed form (the same as :func:`output_hessians` of that loss)."""
    p = torch.softmax(logits.detach().to(torch.float64) / temperature, dim=-1)
    return (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) / temperature**2


def probe_columns(
    hessians: torch.Tensor,
    *,
    max_probes: int = 32,
    generator: Optional[torch.Generator] = None,
    rtol: float = 1e-10,
) -> torch.Tensor:
    """U (B, C, r) with U_b U_b^T = max(Lambda_b, 0): the columns of eigenvectors scaled by the
    square roots of the eigenvalues (in float64), dropping the columns that are zero for every
    example; sketched to ``max_probes`` Gaussian combinations when more remain."""
    values, vectors = symmetric_eigh(hessians.to(torch.float64))
    top = values.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    values = torch.where(values > rtol * top, values, torch.zeros_like(values))
    u = vectors * values.sqrt().unsqueeze(1)
    used = (values > 0).any(dim=0)
    u = u[:, :, used]
    if u.shape[2] > max_probes:
        mix = torch.randn(u.shape[2], max_probes, dtype=torch.float64, generator=generator) / max_probes**0.5
        u = u @ mix.to(u.device)
    return u.to(hessians.dtype)
