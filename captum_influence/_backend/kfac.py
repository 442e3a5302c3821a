"""K-FAC and EK-FAC blocks from the layer inputs and output gradients the engine records.

A matrix layer (Linear, transformers' Conv1D, or Conv2d seen through its unfolded input patches)
applied at positions t gives example b the gradient G_b = sum_t d_{b,t} a_{b,t}^T (out x in', a
with a 1 appended for the bias), and its block of the Gauss-Newton matrix is sum_b vec(G_b) vec(G_b)^T over the
Gauss-Newton probes (``hvp_gauss_newton``). K-FAC (Martens & Grosse 2015; Grosse & Martens
2016 for convolutions) approximates it by the Kronecker product of

    A = sum_{b,t} a a^T   (in' x in'),        S = sum_{b,t,probes} d d^T   (out x out)

divided by the number of positions, whose eigenbases are Q_A and Q_S; A and the count take only
the positions whose output gradient is nonzero for some probe (``EKFACInfluence`` selects them),
so that a layer applied at every token but read at one (a sequence classifier's head) gets the
input of that token, and its block is exact for one example. EK-FAC (George et al.
2018) keeps the Kronecker eigenbasis and replaces the eigenvalues by the exact diagonal of the
block in that basis,

    Lambda[i, j] = sum_{b,probes} (Q_S^T G_b Q_A)[i, j]^2,

the best diagonal in that basis in Frobenius norm (so never a worse fit than K-FAC's own
eigenvalues), with the same trace as the block. A damped inverse-Hessian product is then two
rotations and a division: M G = Q_S [(Q_S^T G Q_A) / (Lambda + lambda)] Q_A^T.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from .hvp import symmetric_eigh
from .layer_rules import _conv_input

KRONECKER_TYPES = (nn.Linear, nn.Conv2d)
# transformers' Conv1D (GPT-2's matrix layer), y = a W + c with W stored (in, out), matched by name
# so that transformers stays optional: a Linear with its weight transposed.
_WEIGHT_IN_OUT = "transformers.pytorch_utils.Conv1D"


def _weight_in_out(module: nn.Module) -> bool:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}" == _WEIGHT_IN_OUT


def kronecker_unsupported(module: nn.Module) -> Optional[str]:
    """Why ``module`` gets no Kronecker block (None when it does)."""
    if type(module) not in KRONECKER_TYPES and not _weight_in_out(module):
        return f"no Kronecker-factored rule for {type(module).__name__}"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"a grouped convolution (groups={module.groups})"
    return None


def widths(module: nn.Module) -> tuple[int, int]:
    """(in', out) of a block: the input width (patch size for Conv2d, + 1 with a bias) and the output width."""
    weight = cast(torch.Tensor, module.weight)
    if _weight_in_out(module):
        return weight.shape[0] + (module.bias is not None), weight.shape[1]
    return weight[0].numel() + (module.bias is not None), weight.shape[0]


def layer_factors(module: nn.Module, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, T, in') and D (B, T, out) of one call: the layer input (unfolded patches for Conv2d)
    with a column of ones for the bias, and the output gradient, positions flattened."""
    batch = a.shape[0]
    if isinstance(module, nn.Conv2d):
        x, padding = _conv_input(module, a)
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        a3 = patches.transpose(1, 2)
        d3 = d.reshape(batch, d.shape[1], -1).transpose(1, 2)
    else:
        a3, d3 = a.reshape(batch, -1, a.shape[-1]), d.reshape(batch, -1, d.shape[-1])
    if module.bias is not None:
        a3 = torch.cat([a3, a3.new_ones(a3.shape[:-1] + (1,))], dim=-1)
    return a3, d3


def grad_matrix(module: nn.Module, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example gradients ``{"weight": (B, out, ...), "bias": (B, out)}`` as G (B, out, in')."""
    weight = grads["weight"].transpose(1, 2) if _weight_in_out(module) else grads["weight"]
    g = weight.reshape(weight.shape[0], weight.shape[1], -1)
    if module.bias is not None:
        g = torch.cat([g, grads["bias"].reshape(g.shape[0], g.shape[1], 1)], dim=2)
    return g


def _empty() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.float64)


@dataclass
class KroneckerBlock:
    """One layer's factors, eigenbases and eigenvalues (float64, on the CPU)."""

    path: str
    module: nn.Module
    names: dict[str, str]  # attribute ("weight", "bias") -> parameter name
    positions: int = 0
    a_cov: torch.Tensor = field(default_factory=_empty)  # (in', in')
    s_cov: torch.Tensor = field(default_factory=_empty)  # (out, out)
    qa: torch.Tensor = field(default_factory=_empty)
    qs: torch.Tensor = field(default_factory=_empty)
    eigenvalues: torch.Tensor = field(default_factory=_empty)  # (out, in'): EK-FAC's corrected or K-FAC's
    damping: float = 0.0
    share: float = 0.0  # sum over examples and eigenbasis directions of (per-example curvature)^2

    def __post_init__(self) -> None:
        width_in, width_out = widths(self.module)
        if self.a_cov.numel() == 0:
            self.a_cov = torch.zeros(width_in, width_in, dtype=torch.float64)
            self.s_cov = torch.zeros(width_out, width_out, dtype=torch.float64)

    def accumulate(self, a: torch.Tensor, d: torch.Tensor, with_a: bool) -> None:
        """Add one probe's factors of a batch: A once per batch (``with_a``), S for every probe."""
        a2 = a.reshape(-1, a.shape[-1]).to(torch.float64)
        d2 = d.reshape(-1, d.shape[-1]).to(torch.float64)
        if with_a:
            self.a_cov += (a2.T @ a2).cpu()
            self.positions += a2.shape[0]
        self.s_cov += (d2.T @ d2).cpu()

    def decompose(self) -> None:
        """Eigenbases of A and S and K-FAC's eigenvalues outer(eig S, eig A) / positions."""
        eig_a, self.qa = symmetric_eigh(self.a_cov)
        eig_s, self.qs = symmetric_eigh(self.s_cov)
        self.eigenvalues = torch.outer(eig_s.clamp(min=0), eig_a.clamp(min=0)) / max(self.positions, 1)

    def rotate(self, g: torch.Tensor) -> torch.Tensor:
        """Q_S^T G Q_A for G (B, out, in'), in float64."""
        g = g.to(torch.float64)
        return self.qs.to(g.device).T @ g @ self.qa.to(g.device)


@dataclass
class DiagonalBlock:
    """The fallback for parameters without a Kronecker rule: the diagonal of their Gauss-Newton
    block (EK-FAC with the identity as eigenbasis), one block per module."""

    path: str
    names: list[str]
    size: int  # the parameters' number of entries
    diagonal: torch.Tensor = field(default_factory=_empty)  # (size,)
    damping: float = 0.0
    share: float = 0.0

    def __post_init__(self) -> None:
        if self.diagonal.numel() == 0:
            self.diagonal = torch.zeros(self.size, dtype=torch.float64)

    def accumulate(self, curvature: torch.Tensor) -> None:
        """Add per-example curvatures (B, size): each example's squared probe gradients, summed
        over its probes (its Gauss-Newton diagonal)."""
        curvature = curvature.to(torch.float64)
        self.diagonal += curvature.sum(0).cpu()
        self.share += float(curvature.pow(2).sum())
