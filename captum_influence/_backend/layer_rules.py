"""One rule per layer type: a layer's per-example parameter gradients from its input and its
output gradient, and for matrix layers the same gradients kept as factors.

A layer y_t = W a_t + c applied at positions t (tokens, pixels, repeated calls) gives example b's
output f_b the gradient  dW_b = sum_t d_{b,t} a_{b,t}^T  and  dc_b = sum_t d_{b,t},  where a is
the layer's input and d_{b,t} = d f_b / d y_{b,t}. Norm layers use their normalised input x_hat in
place of a, embeddings scatter d into the rows that were looked up, convolutions fold the batch
into the groups of one weight-gradient convolution.

Matrix layers (Linear, transformers' Conv1D) also give factors: appending a constant 1 to every
a_t makes the bias the last column of one (out, in + 1) matrix, and two examples' gradients have
the inner product

    <g_i, g_j> = sum_{t,s} (d_{i,t} . d_{j,s}) (a_{i,t} . a_{j,s}),

n_i n_j x T^2 x (in + out) operations instead of n_i n_j x out x (in + 1) on explicit gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

Grads = dict[str, torch.Tensor]


def _cast(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


@dataclass(frozen=True)
class LayerRule:
    """How one layer type's parameters get per-example gradients.

    ``grads(module, a, d, dtype, wanted)`` returns ``{attr: Tensor[B, *param.shape]}`` for the
    parameter attributes in ``wanted`` from the layer's input a (B, ...) and output gradient d;
    ``dtype`` (or None: the operands') is the precision of the products. ``unsupported(module)``
    says why an instance cannot be handled (None when it can). Matrix layers also define
    ``factors(module, a, d) -> (A (B, T, in [+ 1]), D (B, T, out))`` and ``from_factors``.
    The module argument is typed ``Any``: each rule takes its own layer type (``nn.Linear``,
    ``_ConvNd``, ...), which a callable of ``nn.Module`` would not accept.
    """

    grads: Callable[[Any, torch.Tensor, torch.Tensor, Optional[torch.dtype], set], Grads]
    unsupported: Callable[[Any], Optional[str]] = lambda module: None
    factors: Optional[Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = None
    from_factors: Optional[Callable[[Any, torch.Tensor, torch.Tensor], Grads]] = None


# --- matrix layers ---------------------------------------------------------------------------


class _MatrixLayer(Protocol):
    """nn.Linear (weight (out, in)) or transformers' Conv1D (weight (in, out))."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]


def _matrix_factors(module: _MatrixLayer, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, D) = (a with a column of ones when there is a bias, d), positions flattened: (B, T, .)."""
    batch = a.shape[0]
    a3, d3 = a.reshape(batch, -1, a.shape[-1]), d.reshape(batch, -1, d.shape[-1])
    if module.bias is not None:
        a3 = torch.cat([a3, a3.new_ones(a3.shape[:-1] + (1,))], dim=-1)
    return a3, d3


def _outer(a: torch.Tensor, d: torch.Tensor, dtype: Optional[torch.dtype], weight_in_out: bool) -> torch.Tensor:
    """sum_t d_t a_t^T for every example, one batched product: (B, out, in), or (B, in, out) for a
    weight stored (in, out) (transformers' Conv1D, y = a W + c), made contiguous as it is."""
    a, d = _cast(a, dtype), _cast(d, dtype)
    return torch.bmm(a.transpose(1, 2), d) if weight_in_out else torch.bmm(d.transpose(1, 2), a)


def _matrix_from_factors(module: _MatrixLayer, a: torch.Tensor, d: torch.Tensor, weight_in_out: bool = False) -> Grads:
    g = _outer(a, d, None, weight_in_out)
    width_in = module.weight.shape[0 if weight_in_out else 1]
    grads = {"weight": g[:, :width_in] if weight_in_out else g[..., :width_in]}
    if module.bias is not None:
        grads["bias"] = g[:, width_in] if weight_in_out else g[..., width_in]
    return grads


def _matrix(
    module: _MatrixLayer,
    a: torch.Tensor,
    d: torch.Tensor,
    dtype: Optional[torch.dtype],
    wanted: set,
    weight_in_out: bool = False,
) -> Grads:
    """dW_b = sum_t d_{b,t} a_{b,t}^T; dc_b = sum_t d_{b,t}. Uses the weight's actual shape."""
    batch = a.shape[0]
    a3, d3 = a.reshape(batch, -1, a.shape[-1]), d.reshape(batch, -1, d.shape[-1])
    out = {}
    if "weight" in wanted:
        out["weight"] = _outer(a3, d3, dtype, weight_in_out)
    if "bias" in wanted:
        out["bias"] = d3.sum(1)
    return out


# --- convolutions ----------------------------------------------------------------------------

_CONV_WEIGHT_GRAD: dict[type[_ConvNd], Callable[..., torch.Tensor]] = {
    nn.Conv1d: conv1d_weight,
    nn.Conv2d: conv2d_weight,
    nn.Conv3d: conv3d_weight,
}


def _conv_input(module: _ConvNd, a: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The input as the convolution sees it and the zero padding still to apply: string padding
    ("same") may be uneven and other modes are not zeros, so those are padded here as forward does."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return a, module.padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(a, module._reversed_padding_repeated_twice, mode=mode), 0


def _conv(module: _ConvNd, a: torch.Tensor, d: torch.Tensor, dtype: Optional[torch.dtype], wanted: set) -> Grads:
    """dW_b = sum over output positions l of d_{b,l} (x) patch_{b,l} (per group), from one
    weight-gradient convolution with B x G groups: the batch folded into the channels, so example
    b's input only meets its own d_b. The bias gradient sums d over the positions."""
    out = {}
    if "weight" in wanted:
        x, padding = _conv_input(module, _cast(a, dtype))
        batch, groups = x.shape[0], module.groups
        weight_size = (batch * module.out_channels, *module.weight.shape[1:])
        grads = _CONV_WEIGHT_GRAD[type(module)](
            x.reshape(1, -1, *x.shape[2:]),
            weight_size,
            _cast(d, dtype).reshape(1, -1, *d.shape[2:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=batch * groups,
        )
        out["weight"] = grads.reshape(batch, *module.weight.shape)
    if "bias" in wanted:
        out["bias"] = d.reshape(d.shape[0], d.shape[1], -1).sum(2)
    return out


# --- normalisation ---------------------------------------------------------------------------


def _affine_norm(x_hat: torch.Tensor, d: torch.Tensor, channel_dims: int, wanted: set) -> Grads:
    """Per-example gradients of y = x_hat * weight + bias, weight spanning the last ``channel_dims`` dims."""
    batch = d.shape[0]

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum(tuple(range(1, t.dim() - channel_dims))) if t.dim() > channel_dims + 1 else t

    out = {}
    if "weight" in wanted:
        out["weight"] = total(d * x_hat).reshape(batch, *d.shape[d.dim() - channel_dims :])
    if "bias" in wanted:
        out["bias"] = total(d).reshape(batch, *d.shape[d.dim() - channel_dims :])
    return out


def _batch_norm(
    module: _BatchNorm, x: torch.Tensor, d: torch.Tensor, dtype: Optional[torch.dtype], wanted: set
) -> Grads:
    """Eval mode: x_hat = (x - running_mean) / sqrt(running_var + eps), channels on dim 1."""
    # _batch_norm_unsupported sends modules without running statistics elsewhere
    assert module.running_mean is not None and module.running_var is not None
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    return _affine_norm(x_hat.movedim(1, -1), d.movedim(1, -1), 1, wanted)


def _batch_norm_unsupported(module: _BatchNorm) -> Optional[str]:
    if module.running_mean is None:  # training mode raises before this, as on the vmap path
        return "BatchNorm without running statistics normalises with the batch's"
    return None


def _layer_norm(
    module: nn.LayerNorm, x: torch.Tensor, d: torch.Tensor, dtype: Optional[torch.dtype], wanted: set
) -> Grads:
    """x_hat = (x - mean) / sqrt(var + eps) over the last len(normalized_shape) dimensions (one
    fused layer_norm without affine parameters)."""
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    return _affine_norm(x_hat, d, len(module.normalized_shape), wanted)


def _group_norm(
    module: nn.GroupNorm, x: torch.Tensor, d: torch.Tensor, dtype: Optional[torch.dtype], wanted: set
) -> Grads:
    """x_hat normalised within each example's channel groups; weight and bias per channel."""
    x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
    return _affine_norm(x_hat.movedim(1, -1), d.movedim(1, -1), 1, wanted)


# --- embeddings ------------------------------------------------------------------------------


def _embedding(
    module: nn.Embedding, ids: torch.Tensor, d: torch.Tensor, dtype: Optional[torch.dtype], wanted: set
) -> Grads:
    """dW_b[v] = sum of d_{b,t} over the positions t where example b looked up row v."""
    batch, num, dim = ids.shape[0], module.num_embeddings, module.embedding_dim
    flat_ids = ids.reshape(batch, -1)
    rows = d.reshape(batch, -1, dim)
    if module.padding_idx is not None:  # the padding row receives no gradient
        rows = rows * (flat_ids != module.padding_idx).unsqueeze(-1).to(rows.dtype)
    index = (torch.arange(batch, device=ids.device).unsqueeze(1) * num + flat_ids).reshape(-1)
    grads = torch.zeros(batch * num, dim, dtype=d.dtype, device=d.device)
    grads.index_add_(0, index, rows.reshape(-1, dim))
    return {"weight": grads.reshape(batch, num, dim)}


def _embedding_unsupported(module: nn.Embedding) -> Optional[str]:
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq scales by counts over the whole batch"
    if module.max_norm is not None:
        return "max_norm renormalises the weight in place during forward"
    return None


# --- the registry ----------------------------------------------------------------------------

_LINEAR = LayerRule(_matrix, factors=_matrix_factors, from_factors=_matrix_from_factors)
_RULES: dict[type, LayerRule] = {
    nn.Linear: _LINEAR,
    nn.Conv1d: LayerRule(_conv),
    nn.Conv2d: LayerRule(_conv),
    nn.Conv3d: LayerRule(_conv),
    nn.LayerNorm: LayerRule(_layer_norm),
    nn.GroupNorm: LayerRule(_group_norm),
    nn.Embedding: LayerRule(_embedding, _embedding_unsupported),
    **{
        cls: LayerRule(_batch_norm, _batch_norm_unsupported) for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    },
}


# Layer types of other libraries, matched by qualified name so that the library stays optional.
# transformers' Conv1D (GPT-2) is y = a W + c with W stored (in, out).
_RULES_BY_NAME: dict[str, LayerRule] = {
    "transformers.pytorch_utils.Conv1D": LayerRule(
        partial(_matrix, weight_in_out=True),
        factors=_matrix_factors,
        from_factors=partial(_matrix_from_factors, weight_in_out=True),
    ),
}


def register_rule(layer_type: type, rule: LayerRule) -> None:
    """Use ``rule`` for modules of exactly ``layer_type`` (a subclass may compute something else)."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"layer_type: expected an nn.Module subclass; got {layer_type!r}.")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule: expected a LayerRule; got {type(rule).__name__}.")
    _RULES[layer_type] = rule


def rule_for(module: nn.Module) -> tuple[Optional[LayerRule], Optional[str]]:
    """``(rule, None)`` for a module the hooks handle exactly, else ``(None, why not)``.

    Types match exactly: a subclass may compute something else in its own forward."""
    cls = type(module)
    rule = _RULES.get(cls) or _RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    if rule is None:
        return None, f"no exact per-example rule for {cls.__name__}"
    why = rule.unsupported(module)
    return (None, why) if why else (rule, None)


# --- factorised products ---------------------------------------------------------------------


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
