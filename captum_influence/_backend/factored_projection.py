"""Factored (Kronecker) projection of Linear and Conv gradients, as LoGra does.

A layer y_t = W a_t + c applied at positions t has the per-example gradient
G_b = sum_t d_{b,t} [a_{b,t}; 1]^T, shape (out, in'), with d = d f_b / d y. With seeded random
matrices P_out (out, k_out) and P_in (in', k_in), each scaled so that E[P P^T] = I,

    phi_b = vec(P_out^T G_b P_in) = sum_t vec((P_out^T d_{b,t}) (P_in^T [a_{b,t}; 1])^T),  (k_out k_in,)

the dense projection of vec(G_b) by the Kronecker matrix P_out (x) P_in, so that
E[<phi_i, phi_j>] = <G_i, G_j>. Its cost is T (out k_out + in' k_in + k_out k_in) per example instead
of out in' k, G_b is never formed and the matrices hold out k_out + in' k_in entries instead of
out in' k. For a convolution a_t is the input patch under output position t, and P_in^T a_t at every
t is one convolution of the input with P_in as its weights (nothing is unfolded).

The dimensions are shared out among the layers in proportion to their parameter counts; the
parameters of other layers (norms, embeddings, layers the hooks do not cover) take a dense
:class:`Projector` to their share. Every matrix is a pure function of (seed, layer), as for
:class:`Projector`: the same seed gives the same features on any device and for any batch size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .layer_rules import _conv_input
from .projector import Projector

_CONVS: dict[type[_ConvNd], Callable[..., torch.Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}


def derived_seed(seed: int, *path: object) -> int:
    """An independent 63-bit seed for ``path`` (a layer, a side) under ``seed``."""
    digest = hashlib.blake2b(":".join(map(str, (seed, *path))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def factorable(module: nn.Module) -> bool:
    """Linear, transformers' Conv1D, and convolutions without groups: the layers projected as factors."""
    name = f"{type(module).__module__}.{type(module).__qualname__}"
    if type(module) in _CONVS:
        return cast(_ConvNd, module).groups == 1
    return type(module) is nn.Linear or name == "transformers.pytorch_utils.Conv1D"


def _fan(module: nn.Module) -> tuple[int, int]:
    """(out, in') of a factorable layer's gradient matrix, in' counting the bias column."""
    bias = int(module.bias is not None)
    weight = cast(torch.Tensor, module.weight)
    if type(module) in _CONVS:
        return weight.shape[0], math.prod(weight.shape[1:]) + bias
    if type(module) is nn.Linear:
        return weight.shape[0], weight.shape[1] + bias
    return weight.shape[1], weight.shape[0] + bias  # Conv1D stores W as (in, out)


def _allocate(sizes: Sequence[int], k: int) -> list[int]:
    """k split in proportion to ``sizes``, at least 1 each, largest remainders first."""
    if k < len(sizes):
        raise ValueError(
            f"projection_dim: {k} is fewer than one dimension for each of the {len(sizes)} groups of "
            "parameters the factored projection keeps apart (each factored layer and the rest); pass a "
            "larger projection_dim or projection='dense'."
        )
    total = sum(sizes)
    shares = [max(1.0, k * s / total) for s in sizes]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])[: max(0, k - sum(counts))]:
        counts[i] += 1
    return counts


def _split(k: int, out: int, fan_in: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out k_in <= k, as balanced as the layer's dimensions allow."""
    k_out = min(out, math.ceil(math.sqrt(k)))
    k_in = min(fan_in, max(1, k // k_out))
    return min(out, max(1, k // k_in)), k_in


@dataclass
class _Layer:
    path: str
    module: nn.Module
    k_out: int
    k_in: int
    offset: int
    seed: int

    @property
    def width(self) -> int:
        return self.k_out * self.k_in


class FactoredProjector:
    """Per-example gradients to ``projection_dim`` features, factored layer by layer (module docstring).

    Args:
        layers: ``{path: module}`` of the factorable layers to project as factors (their every
            parameter selected and computed by the hooks alone).
        dense_shapes: ``{name: shape}`` of the other selected parameters, projected densely.
        projection_dim: the number of features k asked for; ``projection_dim`` afterwards is the
            number made, at most k (a layer's k_out k_in is rounded down to a product).
        seed, dtype, device: as for :class:`Projector`.

    Features are laid out layer by layer in the order of ``layers``, then the dense part.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        dense_shapes: Mapping[str, Sequence[int]],
        projection_dim: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
    ):
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0:
            raise ValueError(f"projection_dim: expected a positive int; got {projection_dim!r}.")
        bad = [path for path, m in layers.items() if not factorable(m)]
        if bad:
            raise ValueError(f"layers: {bad} are not Linear, Conv1D or ungrouped convolution layers.")
        self.seed, self.dtype = seed, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        fans = [_fan(m) for m in layers.values()]
        dense_size = sum(math.prod(s) for s in dense_shapes.values())
        sizes = [o * i for o, i in fans] + ([dense_size] if dense_size else [])
        budget = _allocate(sizes, projection_dim)
        self.layers: list[_Layer] = []
        offset, spare = 0, 0
        for j, ((path, module), (out, fan_in), k) in enumerate(zip(layers.items(), fans, budget)):
            k_out, k_in = _split(k, out, fan_in)
            self.layers.append(_Layer(path, module, k_out, k_in, offset, derived_seed(seed, "layer", j)))
            offset += k_out * k_in
            spare += k - k_out * k_in
        self.dense: Optional[Projector] = None
        if dense_size:
            self.dense = Projector(
                dict(dense_shapes),
                budget[-1] + spare,
                seed=derived_seed(seed, "dense"),
                dtype=dtype,
                device=self.device,
            )
            offset += self.dense.projection_dim
        self.dense_offset = offset - (self.dense.projection_dim if self.dense else 0)
        self.projection_dim = offset
        self.names = [n for n in dense_shapes]
        self._by_module = {id(layer.module): layer for layer in self.layers}
        self._matrices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        dims = ", ".join(f"{layer.path}: {layer.k_out}x{layer.k_in}" for layer in self.layers)
        rest = self.dense.projection_dim if self.dense else 0
        return (
            f"FactoredProjector(projection_dim={self.projection_dim}, layers={{{dims}}}, dense={rest}, "
            f"seed={self.seed})"
        )

    @property
    def modules(self) -> list[nn.Module]:
        return [layer.module for layer in self.layers]

    def matrices(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``path``'s scaled ``(P_out (out, k_out), P_in (in', k_in))``, bias row last in P_in."""
        layer = next((layer for layer in self.layers if layer.path == path), None)
        if layer is None:
            raise ValueError(f"path: expected one of {[layer.path for layer in self.layers]}; got {path!r}.")
        return self._pair(layer)

    def _pair(self, layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
        if id(layer.module) not in self._matrices:
            out, fan_in = _fan(layer.module)
            self._matrices[id(layer.module)] = tuple(  # type: ignore[assignment]
                Projector(rows, k, seed=derived_seed(layer.seed, side), dtype=self.dtype, device=self.device).matrix()
                for side, rows, k in (("out", out, layer.k_out), ("in", fan_in, layer.k_in))
            )
        return self._matrices[id(layer.module)]

    def project_call(self, module: nn.Module, a: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add one call's ``phi`` (module docstring) of the layer ``module``, with input ``a`` and
        output gradient ``d`` (batch first), to its columns of ``out`` (B, projection_dim)."""
        layer = self._by_module[id(module)]
        p_out, p_in = self._pair(layer)
        a, d = a.to(self.device, self.dtype), d.to(self.device, self.dtype)
        batch, bias = a.shape[0], module.bias is not None
        if type(module) in _CONVS:
            conv = cast(_ConvNd, module)
            x, padding = _conv_input(conv, a)
            fan = p_in.shape[0] - bias
            weight = p_in[:fan].T.reshape(layer.k_in, *conv.weight.shape[1:])
            pa = _CONVS[type(conv)](x, weight, p_in[fan] if bias else None, conv.stride, padding, conv.dilation)
            pa = pa.reshape(batch, layer.k_in, -1).transpose(1, 2)  # (B, L, k_in)
            pd = d.reshape(batch, d.shape[1], -1).transpose(1, 2) @ p_out  # (B, L, k_out)
        else:
            width = a.shape[-1]
            pa = a.reshape(batch, -1, width) @ p_in[:width]
            if bias:
                pa = pa + p_in[width]
            pd = d.reshape(batch, -1, d.shape[-1]) @ p_out
        columns = out[:, layer.offset : layer.offset + layer.width]
        if pd.shape[1] == 1 and columns.dtype == pd.dtype:
            # one position: the outer product added in place, one elementwise pass with no temporary
            columns.view(batch, layer.k_out, layer.k_in).addcmul_(pd.transpose(1, 2), pa)
        else:
            columns += torch.bmm(pd.transpose(1, 2), pa).reshape(batch, -1).to(out.dtype)
        return out

    def project_param(self, name: str, grads: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add the dense share of parameter ``name``'s gradients (B, *shape) to ``out``."""
        if self.dense is None:
            raise ValueError(f"name: {name!r} is not among the densely projected parameters (there are none).")
        self.dense.project_param(name, grads, out[:, self.dense_offset :])
        return out
