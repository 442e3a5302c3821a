"""Per-example gradients of Linear layers kept as factors, and inner products between them.

For y_t = W a_t + c at positions t (tokens, or repeated calls of the layer), example b's gradient
is dW_b = sum_t d_{b,t} a_{b,t}^T and dc_b = sum_t d_{b,t}, with d_{b,t} = d fn_b / d y_{b,t}.
Appending a constant 1 to every a_t makes the bias the last column of one (out, in + 1) matrix,
and two examples' gradients have the inner product

    <g_i, g_j> = sum_{t,s} (d_{i,t} . d_{j,s}) (a_{i,t} . a_{j,s}),

n_i n_j x T^2 x (in + out) operations instead of n_i n_j x out x (in + 1) on explicit gradients.
One forward with hooks and one backward of sum_b fn_b give every example's factors.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .grads import _as_tuple, batch_size_of
from .layer_calls import output_grads, record_calls

Factors = tuple[torch.Tensor, torch.Tensor]


def linear_factors(
    model: nn.Module, fn: Callable[..., torch.Tensor], inputs: Any, layers: Sequence[str]
) -> dict[str, Factors]:
    """``{layer: (a, d)}`` for the named ``nn.Linear`` modules of ``model``: a (B, T, in [+ 1 with a
    bias]) and d = d fn(model, *inputs)[b] / d y (B, T, out), T counting positions and calls.

    Examples must not interact (BatchNorm in eval mode), so that row b of d(sum_b fn_b)/dy is
    d fn_b / dy. The layer's parameters must be used only inside its own forward.
    """
    inputs = _as_tuple(inputs)
    n = batch_size_of(inputs)
    modules = {name: _linear(model, name) for name in layers}
    out, calls = record_calls(model, fn, inputs, n, modules.values())
    silent = [name for name in layers if not any(call.module is modules[name] for call in calls)]
    if silent:
        raise ValueError(f"layers: {silent} did not run in the forward pass.")
    grads = output_grads(out, calls)
    result = {}
    for name in layers:
        a_parts, d_parts = [], []
        for call, d in zip(calls, grads):
            if call.module is not modules[name]:
                continue
            a = call.value
            d = a.new_zeros(*a.shape[:-1], modules[name].out_features) if d is None else d
            if a.dim() < 2 or a.shape[0] != n:
                raise ValueError(
                    f"layers: {name!r} received an input of shape {tuple(a.shape)}; expected (batch={n}, ..., in_features)."
                )
            a_parts.append(a.reshape(n, -1, a.shape[-1]))
            d_parts.append(d.reshape(n, -1, d.shape[-1]))
        a, d = torch.cat(a_parts, 1), torch.cat(d_parts, 1)
        if modules[name].bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        result[name] = (a, d)
    return result


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise TypeError(f"layers: {name!r} is a {type(module).__name__}; expected an nn.Linear.")
    return module


def factor_gradients(a: torch.Tensor, d: torch.Tensor, in_features: int) -> dict[str, torch.Tensor]:
    """Explicit gradients from factors: ``{"weight": (B, out, in)}`` and, when ``a`` carries the
    appended 1, ``{"bias": (B, out)}``."""
    g = torch.einsum("bto,bti->boi", d, a)
    grads = {"weight": g[..., :in_features]}
    if a.shape[-1] == in_features + 1:
        grads["bias"] = g[..., in_features]
    return grads


def factorised_scores(qa: torch.Tensor, qd: torch.Tensor, ka: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
    """S[i, j] = sum_{t,s} (qd[i,t] . kd[j,s]) (qa[i,t] . ka[j,s]) for factors (n, T, width): (n_q, n_k)."""
    nq, t, _ = qa.shape
    nk, s, _ = ka.shape
    dd = qd.reshape(nq * t, -1) @ kd.reshape(nk * s, -1).T
    aa = qa.reshape(nq * t, -1) @ ka.reshape(nk * s, -1).T
    return (dd * aa).view(nq, t, nk, s).sum((1, 3))


def factorised_norms(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """||g_i||^2 = sum_{t,s} (d_{i,t} . d_{i,s}) (a_{i,t} . a_{i,s}) for each row: (n,)."""
    return (torch.einsum("ntk,nsk->nts", d, d) * torch.einsum("nti,nsi->nts", a, a)).sum((1, 2))
