"""Adaptive quadrature of a path integral, split where the integrand is not smooth.

For z(a) = z' + a (z - z') and a scalar output F, completeness integrates the directional derivative

    F(z) - F(z') = int_0^1 dF(z(a))/da da,    dF/da = grad F(z(a)) . (z - z').

A ReLU or max-pool network makes dF/da piecewise smooth: it jumps where a unit switches, and
Gauss-Legendre over [0, 1] then converges only like 1/n. So [0, 1] starts as a few equal pieces,
each with its own Gauss-Legendre rule, and each piece's error is known exactly, because F is
evaluated at its ends (in forward mode, which also gives dF/da at the nodes):

    r = (b - a) sum_k w_k dF/da(a + (b - a) x_k) - (F(b) - F(a)).

Pieces are refined until sum |r| <= tol / 2 for every example, tol = rtol |F(z) - F(z')| + atol,
largest errors first, as many as leave at most tol / 2 in the others: a piece with a switch inside
(``KinkFinder`` predicts the first one ahead of its left end) is halved, and also cut at that switch
when it lies in the first half, so the piece before it is smooth; a smooth piece gets twice the
nodes, up to eight, and is halved after that. Switches whose jumps are too small to matter are
never visited. The gradients that form the attributions are taken once, at the final nodes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from ._kinks import MIN_STEP, KinkFinder

Tensors = tuple[torch.Tensor, ...]

_MOST_NODES = 8  # nodes per piece before it is bisected instead
_FIRST_PIECES = 16
_SAFETY = 0.5  # the error sum targets half the tolerance, so the final gradients' rounding fits


@dataclass(frozen=True)
class Path:
    """Straight paths start[b] -> end[b], and ``output(rows, points) -> Tensor[len(rows)]``, the attributed scalar
    of examples ``rows`` at ``points``."""

    start: Tensors
    end: Tensors
    output: Callable[[torch.Tensor, Tensors], torch.Tensor]

    def points(self, examples: torch.Tensor, alphas: torch.Tensor) -> Tensors:
        """z'[e] + a (z[e] - z'[e]) for each (example e, alpha a) pair."""
        return tuple(
            s[examples] + column(alphas, s) * (e[examples] - s[examples]) for s, e in zip(self.start, self.end)
        )


def column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (one per row) shaped to broadcast over the rows of ``like``."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


@lru_cache(maxsize=None)
def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on [0, 1], float64."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.tensor((x + 1) / 2), torch.tensor(w / 2)


@dataclass
class Slopes:
    """F, dF/da and the distance to the next predicted switch at a set of path points (float64)."""

    value: torch.Tensor
    slope: torch.Tensor
    next_switch: torch.Tensor


@dataclass
class _Evaluator:
    """Evaluates ``Slopes`` in forward mode, ``chunk_size`` points at a time; falls back to reverse mode (and no
    switch prediction) for a model whose operations lack forward-mode derivatives."""

    path: Path
    chunk_size: Optional[int]
    calls: torch.Tensor
    forward_mode_error: Optional[str] = None

    def __call__(self, examples: torch.Tensor, alphas: torch.Tensor, switches: bool = True) -> Slopes:
        """Slopes at the points (examples[k], alphas[k]); ``switches=False`` skips the switch prediction."""
        step = max(1, self.chunk_size or len(examples))
        parts = [self._chunk(e, a, switches) for e, a in zip(examples.split(step), alphas.split(step))]
        self.calls += torch.bincount(examples, minlength=len(self.calls))
        return Slopes(*(torch.cat(column) for column in zip(*parts)))

    def _chunk(self, examples: torch.Tensor, alphas: torch.Tensor, switches: bool) -> tuple[torch.Tensor, ...]:
        points = self.path.points(examples, alphas)
        tangents = tuple(e[examples] - s[examples] for s, e in zip(self.path.start, self.path.end))
        if self.forward_mode_error is None:
            try:
                return self._forward_mode(examples, points, tangents, switches)
            except (RuntimeError, NotImplementedError) as error:
                self.forward_mode_error = str(error).split("\n")[0]
        return self._reverse_mode(examples, points, tangents)

    def _forward_mode(
        self, examples: torch.Tensor, points: Tensors, tangents: Tensors, switches: bool
    ) -> tuple[torch.Tensor, ...]:
        finder = KinkFinder(len(examples), examples.device)
        with torch.no_grad(), fwAD.dual_level():
            duals = tuple(fwAD.make_dual(p, t) for p, t in zip(points, tangents))
            with finder if switches else contextlib.nullcontext():
                out = self.path.output(examples, duals)
            value, slope = fwAD.unpack_dual(out)
        if slope is None:  # the output does not depend on the path
            slope = torch.zeros_like(value)
        return value.double(), slope.double(), finder.next_step

    def _reverse_mode(self, examples: torch.Tensor, points: Tensors, tangents: Tensors) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in points)
            out = self.path.output(examples, leaves)
            grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        slope = sum(
            (g * t).reshape(len(t), -1).sum(dim=1, dtype=torch.float64)
            for g, t in zip(grads, tangents)
            if g is not None
        )
        slope = slope if isinstance(slope, torch.Tensor) else torch.zeros(len(examples), dtype=torch.float64)
        inf = torch.full((len(examples),), float("inf"), dtype=torch.float64)
        return out.detach().double(), slope.to(out.device), inf.to(out.device)


@dataclass
class Pieces:
    """The pieces [a, b] of every example's path, with F at both ends, their Gauss-Legendre node count,
    the distance from a to the first switch predicted ahead, and their error r (NaN until measured)."""

    example: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    f_a: torch.Tensor
    f_b: torch.Tensor
    nodes: torch.Tensor
    next_switch: torch.Tensor
    error: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.error = torch.full_like(self.a, float("nan"))

    def select(self, keep: torch.Tensor) -> "Pieces":
        kept = Pieces(*(getattr(self, name)[keep] for name in _FIELDS))
        kept.error = self.error[keep]
        return kept

    @staticmethod
    def join(parts: list["Pieces"]) -> "Pieces":
        joined = Pieces(*(torch.cat([getattr(p, name) for p in parts]) for name in _FIELDS))
        joined.error = torch.cat([p.error for p in parts])
        return joined

    def rule(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(piece index, example, alpha, weight) of every node of every piece."""
        pieces, alphas, weights = [], [], []
        for n in self.nodes.unique().tolist():
            which = (self.nodes == n).nonzero().flatten()
            x, w = gauss_legendre(int(n))
            width = (self.b[which] - self.a[which])[:, None]
            pieces.append(which[:, None].expand(-1, n).reshape(-1))
            alphas.append((self.a[which][:, None] + width * x).reshape(-1))
            weights.append((width * w).reshape(-1))
        which = torch.cat(pieces)
        return which, self.example[which], torch.cat(alphas), torch.cat(weights)


_FIELDS = ("example", "a", "b", "f_a", "f_b", "nodes", "next_switch")


@dataclass
class Quadrature:
    """Each example's final pieces and nodes, forward-mode evaluation counts, and what stopped refinement early."""

    pieces: Pieces
    forward_evaluations: torch.Tensor
    stopped: torch.Tensor
    forward_mode_error: Optional[str]

    def nodes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(example, alpha, weight) of every node, for the gradient pass."""
        _, examples, alphas, weights = self.pieces.rule()
        return examples, alphas, weights

    def node_counts(self) -> torch.Tensor:
        return _per_example_sum(self.pieces.nodes, self.pieces.example, len(self.forward_evaluations))

    def worst_piece(self, example: int) -> tuple[float, float]:
        """The piece of ``example`` with the largest error: where an unresolved switch sits."""
        mine = (self.pieces.example == example).nonzero().flatten()
        worst = mine[self.pieces.error[mine].abs().argmax()]
        return float(self.pieces.a[worst]), float(self.pieces.b[worst])


def _first_pieces(evaluate: _Evaluator, n: int, count: int, device: torch.device) -> tuple[Pieces, torch.Tensor]:
    """``count`` equal pieces of [0, 1] per example, one node each, and F(z) - F(z')."""
    grid = torch.linspace(0, 1, count + 1, dtype=torch.float64, device=device)
    examples = torch.arange(n, device=device).repeat_interleave(count + 1)
    at = evaluate(examples, grid.repeat(n))
    value, ahead = at.value.reshape(n, count + 1), at.next_switch.reshape(n, count + 1)
    pieces = Pieces(
        torch.arange(n, device=device).repeat_interleave(count),
        grid[:-1].repeat(n),
        grid[1:].repeat(n),
        value[:, :-1].reshape(-1),
        value[:, 1:].reshape(-1),
        torch.ones(n * count, dtype=torch.long, device=device),
        ahead[:, :-1].reshape(-1),
    )
    return pieces, value[:, -1] - value[:, 0]


def _measure(evaluate: _Evaluator, pieces: Pieces, stale: torch.Tensor) -> None:
    """The error r of the pieces in ``stale``, from forward-mode slopes at their nodes."""
    if not stale.any():
        return
    which = stale.nonzero().flatten()
    part = pieces.select(which)
    index, examples, alphas, weights = part.rule()
    slopes = evaluate(examples, alphas, switches=False).slope
    integral = torch.zeros(len(which), dtype=torch.float64, device=slopes.device).index_add_(0, index, weights * slopes)
    pieces.error[which] = integral - (part.f_b - part.f_a)


def integrate_pieces(path: Path, rtol: float, atol: float, most_nodes: int, chunk_size: Optional[int]) -> Quadrature:
    """Split and refine every example's path until sum |r| <= (rtol |F(z) - F(z')| + atol) / 2 or the
    example's nodes would pass ``most_nodes``."""
    n, device = path.end[0].shape[0], path.end[0].device
    evaluate = _Evaluator(path, chunk_size, torch.zeros(n, dtype=torch.long, device=device))
    pieces, change = _first_pieces(evaluate, n, max(1, min(_FIRST_PIECES, most_nodes)), device)
    tolerance = _SAFETY * (rtol * change.abs() + atol)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    # F in the model's dtype carries rounding of about eps max|F| (the sums inside it cancel near F = 0).
    eps = torch.finfo(path.end[0].dtype).eps if path.end[0].is_floating_point() else 0.0
    while True:
        _measure(evaluate, pieces, pieces.error.isnan())
        stopped[pieces.example[~torch.isfinite(pieces.error)]] = True  # NaN or inf along the path
        error = pieces.error.nan_to_num(0.0, posinf=0.0, neginf=0.0)
        scale = _per_example_max(torch.maximum(pieces.f_a.abs(), pieces.f_b.abs()), pieces.example, n)
        size = (error.abs() - 16 * eps * scale[pieces.example]).clamp_min(0.0)
        # Converged: the pieces' errors add up to less than half the tolerance, as does their
        # sum (the completeness residual itself, in which the rounding of F cancels).
        open_ = (_per_example_sum(size, pieces.example, n) > tolerance) & ~stopped
        open_ |= (_per_example_sum(error, pieces.example, n).abs() > tolerance) & ~stopped
        if not open_.any():
            break
        # Refine the fewest largest-error pieces such that the rest add up to at most half the
        # tolerance: the next round can then converge, and few rounds are needed.
        chosen = open_[pieces.example] & ~_within_budget(size, pieces.example, 0.5 * tolerance)
        # A jump in F itself never shrinks with the piece: stop at pieces too short to split.
        stopped[pieces.example[chosen & (pieces.b - pieces.a < 4 * MIN_STEP)]] = True
        # Doubling adds a piece's nodes, bisecting adds none; counted as doubling, to bound the loop too.
        added = _per_example_sum(torch.where(chosen, pieces.nodes, torch.zeros_like(pieces.nodes)), pieces.example, n)
        nodes_now = _per_example_sum(pieces.nodes, pieces.example, n)
        stopped |= open_ & ((nodes_now + added > most_nodes) | (evaluate.calls > _MOST_NODES * most_nodes))
        stopped |= open_ & ~torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, pieces.example[chosen], True)
        chosen &= ~stopped[pieces.example]
        if not chosen.any():
            break
        pieces = _refine(evaluate, pieces, chosen)
    return Quadrature(pieces, evaluate.calls, stopped, evaluate.forward_mode_error)


def _within_budget(size: torch.Tensor, example: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """The smallest pieces of each example whose sizes add up to at most its ``budget``."""
    order = torch.argsort(size, stable=True)
    order = order[torch.argsort(example[order], stable=True)]  # by example, then by size ascending
    running = size[order].cumsum(0)
    counts = torch.bincount(example, minlength=len(budget))
    before = torch.cat([running.new_zeros(1), running])[(counts.cumsum(0) - counts)]  # sum of earlier examples
    within = torch.empty_like(size, dtype=torch.bool)
    within[order] = running - before[example[order]] <= budget[example[order]]
    return within


def _per_example_sum(values: torch.Tensor, example: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, example, values)


def _per_example_max(values: torch.Tensor, example: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).scatter_reduce_(
        0, example, values, "amax", include_self=False
    )


def _refine(evaluate: _Evaluator, pieces: Pieces, chosen: torch.Tensor) -> Pieces:
    """Halve the chosen pieces that have a switch inside, and also cut them at their first switch when it lies
    in their first half (the piece before it is smooth); double the nodes of chosen smooth pieces below
    ``_MOST_NODES``, and halve them after that."""
    width = pieces.b - pieces.a
    more = chosen & (pieces.next_switch >= width) & (pieces.nodes < _MOST_NODES)
    pieces.nodes[more] *= 2
    pieces.error[more] = float("nan")
    split = chosen & ~more
    if not split.any():
        return pieces
    halves = pieces.select(split)
    middle = (halves.a + halves.b) / 2
    nodes = (halves.nodes // 2).clamp_min(1)
    switch = halves.a + halves.next_switch
    early = switch < middle
    cuts = torch.cat([middle, switch[early]])
    owners = torch.cat([torch.arange(len(middle)), early.nonzero().flatten()])
    at = evaluate(halves.example[owners], cuts)
    k = len(middle)
    mid_value, mid_switch, first_value, first_switch = (
        at.value[:k],
        at.next_switch[:k],
        at.value[k:],
        at.next_switch[k:],
    )
    right = Pieces(halves.example, middle, halves.b, mid_value, halves.f_b, nodes, mid_switch)
    left_value = mid_value.clone()
    left_value[early] = first_value
    left = Pieces(
        halves.example,
        halves.a,
        torch.where(early, switch, middle),
        halves.f_a,
        left_value,
        nodes.clone(),
        halves.next_switch,
    )
    e = early.nonzero().flatten()
    between = Pieces(halves.example[e], switch[e], middle[e], first_value, mid_value[e], nodes[e].clone(), first_switch)
    return Pieces.join([pieces.select(~split), left, between, right])
