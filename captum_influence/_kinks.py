"""Where a piecewise-linear operation switches along a straight path, from forward-mode tangents.

Along z(a) = z' + a (z - z'), an input u(a) of ReLU, LeakyReLU, ReLU6, Hardtanh, clamp, abs or a
max-pool is linear in ``a`` as long as nothing upstream switches, so with its value u and tangent
du = du/da (one forward-mode pass) the next switch ahead is at

    t = min over units of (c - u) / du  > 0      (c: the op's breakpoints, 0 for ReLU)

and, for a max-pool window with winner w, at (u_w - u_o) / (du_o - du_w) for every other entry o
with du_o > du_w. ``KinkFinder`` records min t per row (per path point) while a forward pass runs
on dual tensors; a network built from these ops and smooth ones is smooth on each piece between
switches, where Gauss-Legendre converges fast. Upstream smooth nonlinearities make the prediction
approximate; operations not listed here (``torch.max`` over a dim, ``sort``, ``where``) are not
seen. Both only cost the quadrature more refinement, which its error estimate drives.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Steps shorter than this (in units of the path parameter) are the switch the path is sitting on.
MIN_STEP = 1e-7

_AT_ZERO: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.relu,
        torch.relu_,
        torch.Tensor.relu,
        torch.Tensor.relu_,
        F.relu,
        F.relu_,
        F.leaky_relu,
        F.leaky_relu_,
        torch.abs,
        torch.Tensor.abs,
        torch.Tensor.abs_,
        torch.abs_,
        F.prelu,
        F.rrelu,
        F.elu,
        F.celu,
        F.selu,
    }
)
_CLAMPS: frozenset[Callable[..., Any]] = frozenset(
    {torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip, torch.Tensor.clamp_, torch.clamp_}
)
_HARDTANH: frozenset[Callable[..., Any]] = frozenset({F.hardtanh, F.hardtanh_})
_MAX_POOLS: frozenset[Callable[..., Any]] = frozenset(
    {F.max_pool1d, F.max_pool2d, F.max_pool1d_with_indices, F.max_pool2d_with_indices}
)


def _tangent(value: Any) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(primal, tangent) of a floating dual tensor, or None when it does not vary along the path."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return None
    primal, tangent = fwAD.unpack_dual(value)
    return None if tangent is None else (primal.detach(), tangent.detach())


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _crossings(u: torch.Tensor, du: torch.Tensor, level: Any) -> torch.Tensor:
    """Step t > 0 at which u + t du reaches ``level`` (inf where it does not ahead)."""
    if isinstance(level, torch.Tensor):
        level = level.detach().to(u.dtype)
    t = (level - u) / du
    return torch.where(t > MIN_STEP, t, torch.full_like(t, float("inf")))


def _window_switches(
    func: Callable[..., Any], u: torch.Tensor, du: torch.Tensor, args: tuple, kwargs: dict
) -> Optional[torch.Tensor]:
    """Steps at which the winner of a max-pool window changes, one per window entry (None for the
    forms not covered: unbatched inputs and ``ceil_mode``)."""
    one_d = func in (F.max_pool1d, F.max_pool1d_with_indices)
    if _arg(args, kwargs, 5, "ceil_mode", False) or u.dim() != (3 if one_d else 4):
        return None
    kernel = _arg(args, kwargs, 1, "kernel_size", None)
    stride = _arg(args, kwargs, 2, "stride", None) or kernel
    padding = _arg(args, kwargs, 3, "padding", 0)
    dilation = _arg(args, kwargs, 4, "dilation", 1)
    if one_d:  # (N, C, L) as (N, C, 1, L)
        u, du = u[:, :, None], du[:, :, None]
        kernel, stride, dilation = ((1, _pair_last(v)) for v in (kernel, stride, dilation))
        padding = (0, _pair_last(padding))
    n, c = u.shape[:2]
    unfold = lambda t: F.unfold(t, kernel, dilation=dilation, padding=padding, stride=stride)  # noqa: E731
    inside = unfold(torch.ones_like(u[:1, :1])).bool()[:, None]  # (1, 1, k, L): not a padding entry
    values = unfold(u.reshape(n * c, 1, *u.shape[2:])).reshape(n, c, -1, inside.shape[-1])
    slopes = unfold(du.reshape(n * c, 1, *du.shape[2:])).reshape(n, c, -1, inside.shape[-1])
    values = values.masked_fill(~inside, float("-inf"))
    top = values.max(dim=2, keepdim=True).values
    # Among tied maxima the one rising fastest wins just ahead of the current point.
    tied = values >= top - 1e-12 * top.abs().clamp_min(1.0)
    winner = slopes.masked_fill(~tied, float("-inf")).argmax(dim=2, keepdim=True)
    u_w, du_w = values.gather(2, winner), slopes.gather(2, winner)
    t = (u_w - values) / (slopes - du_w)
    ahead = inside & (slopes > du_w) & (t > MIN_STEP)
    return torch.where(ahead, t, torch.full_like(t, float("inf")))


def _pair_last(value: Any) -> int:
    return int(value[-1] if isinstance(value, (tuple, list)) else value)


class KinkFinder(TorchFunctionMode):
    """While active over a forward pass on dual tensors of ``rows`` path points (batch first),
    ``next_step[r]`` is the distance along the path to the next switch of a piecewise-linear op
    for point r (inf when none is ahead)."""

    def __init__(self, rows: int, device: torch.device) -> None:
        super().__init__()
        self.rows = rows
        self.next_step = torch.full((rows,), float("inf"), dtype=torch.float64, device=device)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _AT_ZERO or func in _CLAMPS or func in _HARDTANH or func in _MAX_POOLS:
            dual = _tangent(args[0] if args else kwargs.get("input"))
            if dual is not None:
                self._record(self._steps(func, *dual, args, kwargs))
        return func(*args, **kwargs)

    def _steps(
        self, func: Callable[..., Any], u: torch.Tensor, du: torch.Tensor, args: tuple, kwargs: dict
    ) -> Optional[torch.Tensor]:
        if func in _AT_ZERO:
            return _crossings(u, du, 0.0)
        if func in _MAX_POOLS:
            return _window_switches(func, u, du, args, kwargs)
        if func in _HARDTANH:
            low, high = _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
        else:
            low, high = _arg(args, kwargs, 1, "min", None), _arg(args, kwargs, 2, "max", None)
        levels = [level for level in (low, high) if level is not None]
        if not levels:
            return None
        return torch.stack([_crossings(u, du, level).expand_as(u) for level in levels]).amin(dim=0)

    def _record(self, steps: Optional[torch.Tensor]) -> None:
        if steps is None or steps.numel() == 0:
            return
        steps = steps.to(torch.float64)
        if steps.dim() > 0 and steps.shape[0] == self.rows:
            per_row = steps.reshape(self.rows, -1).amin(dim=1)
        else:  # not batch-first: the nearest switch anywhere bounds every row
            per_row = steps.min().expand(self.rows)
        self.next_step = torch.minimum(self.next_step, per_row.to(self.next_step.device))
