"""Integrated Gradients (Sundararajan et al., 2017) whose completeness is measured, and reached on request.

    IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x')) / dx_i da  ~  (x_i - x'_i) * sum_k w_k g_i(a_k)

with quadrature nodes a_k and weights w_k (Captum's rules). Completeness says sum_i IG_i(x) =
F(x) - F(x'); the residual ``delta`` is the quadrature error. Every path gradient comes from the
shared backend's ``input_grads``, one autograd call per chunk of ``internal_batch_size`` points.
``n_steps="auto"`` cuts each path where a ReLU, max-pool, clamp or abs switches and integrates
every smooth piece by Gauss-Legendre, refining the pieces (from F at their ends, in forward mode)
until |delta| <= ``completeness_rtol * |F(x) - F(x')|`` for every example (``_path_quadrature``).
``LayerIntegratedGradients`` integrates along the straight path between a layer's values at x'
and at x, with the same quadrature and check.

Example::

    ig = ci.IntegratedGradients(ci.select_output(model, "logits"))
    attr = ig.attribute(x, target=y, n_steps="auto")
    ig.convergence.not_converged        # [] when every example meets the tolerance
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Callable, Optional, Union

import torch
from captum.attr import GradientAttribution, LayerAttribution
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS, approximation_parameters
from captum.log import log_usage
from torch import nn

from ._attr_args import check_finite, format_args, format_baselines, format_inputs, select_targets, take, target_index
from ._backend import input_grads
from ._path_quadrature import Path, Quadrature, column, integrate_pieces
from .completeness import CompletenessWarning, _relative_error, _within

Tensors = tuple[torch.Tensor, ...]
Steps = Union[int, str]

_DEFAULT_RTOL = 1e-3


@dataclass(frozen=True)
class Convergence:
    """Completeness of the last ``attribute`` call, per example: ``delta = sum(attr) - output_change``,
    with ``output_change = F(x) - F(x')``.

    ``n_steps`` is the number of gradient evaluations (quadrature nodes) each example got; ``converged`` is
    |delta| <= rtol * |F(x) - F(x')| + atol (rtol is ``completeness_rtol``, 1e-3 when not given). With
    ``n_steps="auto"``, ``pieces`` counts the smooth pieces each path was cut into, ``forward_evaluations``
    the forward-mode evaluations that placed the nodes, and ``causes`` maps each example that missed the
    tolerance to the reason found.

    Args:
        n_steps (Tensor): gradient evaluations (quadrature nodes) per example, (n,).
        delta (Tensor): sum(attributions) - output_change per example, (n,), float64.
        output_change (Tensor): F(x) - F(x') per example, (n,).
        relative_error (Tensor): |delta| / |output_change| per example, (n,): 0 where both are
            0, inf where only the output change is.
        converged (Tensor): bool per example, (n,): |delta| <= rtol * |output_change| + atol.
        rtol (float): the relative tolerance used.
        atol (float): the absolute tolerance used.
        pieces (Tensor, optional): with ``n_steps="auto"``, the smooth pieces per example, (n,).
            Default: None.
        forward_evaluations (Tensor, optional): with ``n_steps="auto"``, the forward-mode
            evaluations that placed the nodes. Default: None.
        causes (dict, optional): example index -> the reason it missed the tolerance.
            Default: {}.
    """

    n_steps: torch.Tensor
    delta: torch.Tensor
    output_change: torch.Tensor
    relative_error: torch.Tensor
    converged: torch.Tensor
    rtol: float
    atol: float
    pieces: Optional[torch.Tensor] = None
    forward_evaluations: Optional[torch.Tensor] = None
    causes: dict[int, str] = field(default_factory=dict)

    @property
    def not_converged(self) -> list[int]:
        """Indices of the examples that miss the tolerance.

        Returns:
            list of int: the indices where ``converged`` is False, in increasing order.
        """
        return (~self.converged).nonzero().flatten().tolist()


@lru_cache(maxsize=None)
def _rule(method: str, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captum's quadrature nodes a_k in [0, 1] and weights w_k for ``method`` with ``n_steps`` nodes
    (cached: Gauss-Legendre nodes cost an eigendecomposition, and refinement asks for the same rules again)."""
    step_sizes, alphas = approximation_parameters(method)
    return torch.tensor(alphas(n_steps), dtype=torch.float64), torch.tensor(step_sizes(n_steps), dtype=torch.float64)


def _weighted_grad_sum(
    path: Path, examples: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor, chunk_size: Optional[int]
) -> Tensors:
    """sum_k w_k dF/dz(z_k) per example over the nodes (examples[k], alphas[k], weights[k]),
    z_k = start + a_k (end - start); ``chunk_size`` points per ``input_grads`` call (all at once when None)."""
    sums = tuple(torch.zeros(e.shape, dtype=e.dtype, device=e.device) for e in path.end)
    step = chunk_size or max(1, len(examples))
    for lo in range(0, len(examples), step):
        example, alpha, weight = examples[lo : lo + step], alphas[lo : lo + step], weights[lo : lo + step]
        grads = input_grads(lambda *z: path.output(example, z), path.points(example, alpha))
        rows, slot = example.unique(return_inverse=True)
        # A one-hot product sums the nodes of each example (index_add_ with repeated indices is slow on CPU).
        gather = torch.nn.functional.one_hot(slot, len(rows)).T
        for acc, g in zip(sums, grads):
            weighted = (g * column(weight, g)).reshape(len(g), -1)
            acc[rows] += (gather.to(g.dtype) @ weighted).reshape(len(rows), *g.shape[1:])
    return sums


def _outputs_at(path: Path, points: Tensors, chunk_size: Optional[int]) -> torch.Tensor:
    """The attributed output at ``points`` (one row per example), without gradients."""
    rows = torch.arange(points[0].shape[0])
    with torch.no_grad():
        return torch.cat([path.output(r, tuple(p[r] for p in points)) for r in rows.split(chunk_size or len(rows))])


def _delta(diff: Tensors, sums: Tensors, change: torch.Tensor) -> torch.Tensor:
    """sum_i (x - x')_i * sums_i - (F(x) - F(x')), per example, accumulated in float64."""
    total = sum(
        (d * s).reshape(len(d), -1).sum(dim=1, dtype=torch.float64).to(change.device) for d, s in zip(diff, sums)
    )
    return total - change.to(torch.float64)


def _integrate(
    path: Path, n_steps: Steps, method: str, chunk_size: Optional[int], rtol: float, atol: float, max_steps: int
) -> tuple[Tensors, Convergence]:
    """The path integrals sum_k w_k grad F(z_k) per example, with fixed or adaptive steps, and their completeness."""
    n = path.end[0].shape[0]
    change = _outputs_at(path, path.end, chunk_size) - _outputs_at(path, path.start, chunk_size)
    if not torch.isfinite(change).all():
        bad = (~torch.isfinite(change)).nonzero().flatten().tolist()
        raise ValueError(f"forward_func: the output is not finite at the inputs or baselines of examples {bad}.")
    quadrature = None
    if n_steps == "auto":
        quadrature = integrate_pieces(path, rtol, atol, max_steps, chunk_size)
        examples, alphas, weights = quadrature.nodes()
        steps = quadrature.node_counts().cpu()
    else:
        assert not isinstance(n_steps, str)  # _check_settings lets "auto" be the only string
        alphas, weights = _rule(method, n_steps)
        examples, alphas, weights = (
            torch.arange(n).repeat(n_steps),
            alphas.repeat_interleave(n),
            weights.repeat_interleave(n),
        )
        steps = torch.full((n,), n_steps)
    device = path.end[0].device
    sums = _weighted_grad_sum(path, examples.to(device), alphas.to(device), weights.to(device), chunk_size)
    finite = torch.stack([torch.isfinite(s.reshape(n, -1)).all(dim=1) for s in sums]).all(dim=0).cpu()
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"forward_func: its gradient along the path is not finite for examples {bad}.")
    delta = _delta(tuple(e - s for s, e in zip(path.start, path.end)), sums, change)
    change = change.to(delta.dtype)
    convergence = Convergence(
        n_steps=steps,
        delta=delta,
        output_change=change,
        relative_error=_relative_error(delta, change),
        converged=_within(delta, change, rtol, atol).cpu(),
        rtol=rtol,
        atol=atol,
    )
    if quadrature is not None:
        pieces = torch.bincount(quadrature.pieces.example.cpu(), minlength=n)
        convergence = replace(convergence, pieces=pieces, forward_evaluations=quadrature.forward_evaluations.cpu())
    if convergence.not_converged:
        convergence = replace(convergence, causes=_causes(path, convergence, quadrature, n_steps, max_steps))
    return sums, convergence


def _causes(
    path: Path, convergence: Convergence, quadrature: Optional[Quadrature], n_steps: Steps, max_steps: int
) -> dict[int, str]:
    """Why each example missed the tolerance, the most fundamental cause first: outputs that change
    between identical calls, NaN or inf on the path, no forward-mode derivatives, an unresolved switch."""
    missed = torch.tensor(convergence.not_converged)
    again = tuple(e[missed] for e in path.end)
    with torch.no_grad():
        first, second = path.output(missed, again), path.output(missed, again)
    causes = {}
    for row, b in enumerate(missed.tolist()):
        if not torch.equal(first[row], second[row]):
            causes[b] = (
                "the outputs of two identical calls differ (a module in training mode, such as Dropout or "
                "BatchNorm, or another random module); call model.eval() first"
            )
        elif quadrature is None:
            causes[b] = f"n_steps={n_steps} is too few for this path; use n_steps='auto' or more steps"
        else:
            a, z = quadrature.worst_piece(b)
            mine = quadrature.pieces.example == b
            if not torch.isfinite(quadrature.pieces.error[mine]).all():
                causes[b] = f"the output or its slope is NaN or inf on the path between alpha={a:.6g} and {z:.6g}"
            elif quadrature.forward_mode_error is not None:
                causes[b] = (
                    "switches of the model could not be located, because an operation lacks forward-mode "
                    f"derivatives ({quadrature.forward_mode_error}), and max_steps={max_steps} was not enough"
                )
            else:
                causes[b] = (
                    f"a kink it could not resolve between alpha={a:.6g} and {z:.6g} within max_steps={max_steps} "
                    "(an operation that is not piecewise smooth or not recognised, such as torch.max over a dim, "
                    "sort, where or a step function); raise max_steps"
                )
    return causes


def _check_settings(n_steps: Any, method: Any, internal_batch_size: Any, rtol: Any, atol: Any, max_steps: Any) -> None:
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"method: expected one of {SUPPORTED_METHODS}; got {method!r}.")
    if n_steps == "auto" and method != "gausslegendre":
        raise ValueError(
            f"method: n_steps='auto' integrates each smooth piece of the path by Gauss-Legendre; got method "
            f"{method!r} (leave method at 'gausslegendre', or give an int n_steps)."
        )
    fewest = 2 if method.startswith("riemann") else 1
    if not _is_int(max_steps) or max_steps < fewest:
        raise ValueError(f"max_steps: expected an int >= {fewest} for method {method!r}; got {max_steps!r}.")
    if n_steps != "auto" and (not _is_int(n_steps) or n_steps < fewest):
        raise ValueError(f"n_steps: expected an int >= {fewest} for method {method!r}, or 'auto'; got {n_steps!r}.")
    if internal_batch_size is not None and (not _is_int(internal_batch_size) or internal_batch_size < 1):
        raise ValueError(f"internal_batch_size: expected a positive int or None; got {internal_batch_size!r}.")
    if rtol is not None and (not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not rtol > 0):
        raise ValueError(f"completeness_rtol: expected a positive float or None; got {rtol!r}.")
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
        raise ValueError(f"completeness_atol: expected a float >= 0; got {atol!r}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _report(convergence: Convergence, what: str) -> None:
    """One warning naming, per cause, the examples that missed the tolerance."""
    missed = convergence.not_converged
    if not missed:
        return
    by_cause: dict[str, list[int]] = {}
    for b in missed:
        by_cause.setdefault(convergence.causes.get(b, "unknown"), []).append(b)
    causes = "; ".join(f"examples {examples}: {cause}" for cause, examples in by_cause.items())
    worst = float(convergence.relative_error[missed].max())
    warnings.warn(
        f"{what}: attributions miss completeness for examples {missed} (relative error up to {worst:.3g} > rtol "
        f"{convergence.rtol:g} with up to {int(convergence.n_steps.max())} steps). Cause: {causes}.",
        CompletenessWarning,
        stacklevel=5,
    )


def _check_finite(tensors: Tensors, arg: str) -> None:
    """Refuse NaN or inf in ``inputs`` or ``baselines``: (x - x') * grad would be NaN there."""
    check_finite(tensors, arg, "expected finite values (the attributions would be NaN there)")


def _check_dtype(forward_func: Any, tensors: Tensors, arg: str) -> None:
    """Floating inputs of another dtype than a model's parameters fail inside its first layer
    with a raw error; name both dtypes instead."""
    if not isinstance(forward_func, nn.Module):
        return
    dtype = next((p.dtype for p in forward_func.parameters() if p.is_floating_point()), None)
    for i, t in enumerate(tensors):
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            raise ValueError(
                f"{arg if len(tensors) == 1 else f'{arg}[{i}]'}: dtype {t.dtype}, but the model's parameters are "
                f"{dtype}; convert one of them (for example inputs.to({dtype}) or model.to({t.dtype}))."
            )


def _check_forward(forward_func: Any) -> None:
    if not callable(forward_func):
        raise TypeError(
            f"forward_func: expected a callable (a model or a function); got {type(forward_func).__name__}."
        )


class _PathIntegral:
    """What both classes share: integrate along a path, check completeness, shape the result."""

    _multiply_by_inputs: bool
    convergence: Optional[Convergence]

    def _attribute_path(
        self,
        path: Path,
        n_steps: Steps,
        method: str,
        internal_batch_size: Optional[int],
        completeness_rtol: Optional[float],
        completeness_atol: float,
        max_steps: int,
        return_convergence_delta: bool,
        as_tuple: bool,
    ) -> Any:
        rtol = _DEFAULT_RTOL if completeness_rtol is None else float(completeness_rtol)
        sums, self.convergence = _integrate(
            path, n_steps, method, internal_batch_size, rtol, completeness_atol, max_steps
        )
        if n_steps == "auto" or completeness_rtol is not None:
            _report(self.convergence, type(self).__name__)
        if self._multiply_by_inputs:
            sums = tuple((e - s) * g for s, e, g in zip(path.start, path.end, sums))
        result = sums if as_tuple else sums[0]
        return (result, self.convergence.delta.to(path.end[0].dtype)) if return_convergence_delta else result

    def has_convergence_delta(self) -> bool:
        """Whether ``attribute`` can return a convergence delta, as in Captum.

        Returns:
            bool: True.
        """
        return True

    def attribute_future(self, *args: Any, **kwargs: Any) -> Any:
        """Not implemented, as in Captum: attributions are computed synchronously.

        Args:
            *args (Any): ignored.
            **kwargs (Any): ignored.

        Returns:
            Nothing: it always raises NotImplementedError; use ``attribute``.
        """
        raise NotImplementedError(f"{type(self).__name__}.attribute_future is not implemented; use attribute.")

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the path integrals are multiplied by (x - x') (global attributions), as in Captum.

        Returns:
            bool: the constructor's ``multiply_by_inputs``.
        """
        return self._multiply_by_inputs


class IntegratedGradients(_PathIntegral, GradientAttribution):
    """Integrated Gradients with Captum's interface, batched path gradients and a completeness guarantee.

    ``attribute`` returns IG(x) shaped like ``inputs`` (and delta per example with
    ``return_convergence_delta=True``); ``self.convergence`` holds the last call's per-example
    delta, relative error, steps and whether the tolerance was met.

    Args:
        forward_func (callable): the model or a function F whose output ``attribute`` explains;
            otherwise a TypeError.
        multiply_by_inputs (bool, optional): True: IG_i(x) = (x_i - x'_i) * int_0^1 dF/dx_i da
            (global attributions, which add up to F(x) - F(x')); False: the path integral alone,
            without the factor (x_i - x'_i) (local attributions). Default: True.
    """

    def __init__(self, forward_func: Callable[..., torch.Tensor], multiply_by_inputs: bool = True) -> None:
        _check_forward(forward_func)
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self.convergence = None

    @log_usage()
    def attribute(
        self,
        inputs: Union[torch.Tensor, Tensors],
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: Steps = 50,
        method: str = "gausslegendre",
        internal_batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
        completeness_rtol: Optional[float] = None,
        *,
        completeness_atol: float = 1e-6,
        max_steps: int = 4096,
    ) -> Union[torch.Tensor, Tensors, tuple[Union[torch.Tensor, Tensors], torch.Tensor]]:
        """IG of the output chosen by ``target`` with respect to ``inputs``.

        IG_i(x) = (x_i - x'_i) * int_0^1 dF(x' + a (x - x'))/dx_i da, by quadrature; completeness
        delta = sum_i IG_i(x) - (F(x) - F(x')) is measured for every example (``self.convergence``).

        Args:
            inputs: a tensor (B, ...) or a tuple of tensors, all with the batch first.
            baselines: x', Captum's forms: None (zeros), a number, a tensor shaped like the inputs or
                broadcastable to them (one per example or one for all), or a tuple of these.
            target: the output index per example, Captum's forms (an int, a tuple of indices, a list
                or tensor with one per example, or None for a scalar output per example).
            additional_forward_args: further arguments of ``forward_func``, after the inputs; tensors
                with the batch first are taken per example, anything else as is.
            n_steps: quadrature nodes per example, or "auto": the path is cut where a ReLU, max-pool,
                clamp or abs switches and each smooth piece refined until |delta| <=
                completeness_rtol * |F(x) - F(x')| + completeness_atol.
            method: Captum's quadrature for an int ``n_steps`` ("gausslegendre", "riemann_left", ...);
                "auto" needs "gausslegendre".
            internal_batch_size: path points per forward/backward call (all at once when None); bounds memory.
            return_convergence_delta: also return delta, one per example.
            completeness_rtol: tolerance of the completeness check (1e-3 when None). With an int
                ``n_steps`` it is checked only when given; examples missing it raise a
                ``CompletenessWarning`` that names the cause.
            completeness_atol: absolute part of the tolerance, for outputs that barely change.
            max_steps: most gradient evaluations per example under "auto".

        Returns:
            The attributions, shaped like ``inputs`` (a tuple when a tuple was given), and delta
            (B,) with ``return_convergence_delta=True``. Delta always measures the integral,
            sum((x - x') * mean grad), also when ``multiply_by_inputs=False``.

        Raises:
            ValueError: NaN or inf in ``inputs`` or ``baselines``, outputs or gradients that are not finite
                on the path, inputs of another dtype than the model's parameters, or bad settings.
        """
        _check_settings(n_steps, method, internal_batch_size, completeness_rtol, completeness_atol, max_steps)
        x, as_tuple = format_inputs(inputs)
        n = x[0].shape[0]
        args = format_args(additional_forward_args, n)
        index = target_index(target, n)

        def output(rows: torch.Tensor, points: Tensors) -> torch.Tensor:
            picked = None if index is None else index[rows]
            return select_targets(self.forward_func(*points, *take(args, rows)), picked)

        path = Path(start=format_baselines(baselines, x), end=x, output=output)
        _check_finite(x, "inputs")
        _check_finite(path.start, "baselines")
        _check_dtype(self.forward_func, x, "inputs")
        return self._attribute_path(
            path,
            n_steps,
            method,
            internal_batch_size,
            completeness_rtol,
            completeness_atol,
            max_steps,
            return_convergence_delta,
            as_tuple,
        )


class _Swap:
    """Hooks that capture, or replace, the value at ``layer`` (its output, or its input with ``at_input``)."""

    def __init__(
        self, layer: nn.Module, at_input: bool, replacement: Optional[Tensors] = None, as_tuple: bool = True
    ) -> None:
        self.layer, self.at_input, self.replacement, self.as_tuple = layer, at_input, replacement, as_tuple
        self.seen: list[Tensors] = []
        self.output_is_tuple = False

    def _pre(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        self.seen.append(tuple(args))
        return self.replacement

    def _post(self, module: nn.Module, args: tuple, out: Any) -> Any:
        self.output_is_tuple = isinstance(out, tuple)
        self.seen.append(out if self.output_is_tuple else (out,))
        if self.replacement is None:
            return None
        return self.replacement if self.as_tuple else self.replacement[0]

    def __enter__(self) -> "_Swap":
        if self.at_input:
            self.handle = self.layer.register_forward_pre_hook(self._pre)
        else:
            self.handle = self.layer.register_forward_hook(self._post)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


class LayerIntegratedGradients(_PathIntegral, LayerAttribution, GradientAttribution):
    """Integrated Gradients to a layer's output (or input), with the same completeness check.

    With a(x) the layer's value, LIG_j(x) = (a_j(x) - a_j(x')) * int_0^1 dF/da_j (a(x') + t (a(x) - a(x'))) dt,
    the layer's value replaced by a forward hook; sum_j LIG_j(x) = F(x) - F(x') when F depends on
    the inputs only through the layer.

    Args:
        forward_func (callable): the model or a function F whose output ``attribute`` explains;
            otherwise a TypeError.
        layer (nn.Module): the layer whose output (or, with ``attribute_to_layer_input``, input)
            is attributed; one module, run exactly once per forward pass, else a TypeError or
            ValueError.
        device_ids (list of int, optional): the device ids of a DataParallel model, passed to
            Captum's ``LayerAttribution`` as in Captum; not used by this class's path integral.
            Default: None.
        multiply_by_inputs (bool, optional): True: LIG_j(x) = (a_j(x) - a_j(x')) times the path
            integral (global attributions, which add up to F(x) - F(x')); False: the path
            integral alone. Default: True.
    """

    def __init__(
        self,
        forward_func: Callable[..., torch.Tensor],
        layer: nn.Module,
        device_ids: Optional[list[int]] = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        _check_forward(forward_func)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer: expected one torch.nn.Module; got {type(layer).__name__}.")
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        GradientAttribution.__init__(self, forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self.convergence = None

    def _layer_values(self, x: Tensors, args: tuple, at_input: bool, chunk_size: Optional[int]) -> tuple[Tensors, bool]:
        """The layer's value for each example (a tuple of tensors) and whether it is a tuple in the model."""
        rows, parts, as_tuple = torch.arange(x[0].shape[0]), [], False
        with torch.no_grad():
            for r in rows.split(chunk_size or len(rows)):
                with _Swap(self.layer, at_input) as swap:
                    self.forward_func(*(t[r] for t in x), *take(args, r))
                if len(swap.seen) != 1:
                    raise ValueError(
                        f"layer: {type(self.layer).__name__} ran {len(swap.seen)} times in one forward pass; layer "
                        "attribution needs a layer that runs exactly once."
                    )
                value = swap.seen[0]
                if not all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in value):
                    raise TypeError(f"layer: its {'input' if at_input else 'output'} must be floating-point tensors.")
                parts.append(value)
                as_tuple = swap.output_is_tuple
        return tuple(torch.cat(column) for column in zip(*parts)), as_tuple

    @log_usage()
    def attribute(
        self,
        inputs: Union[torch.Tensor, Tensors],
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: Steps = 50,
        method: str = "gausslegendre",
        internal_batch_size: Optional[int] = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        completeness_rtol: Optional[float] = None,
        *,
        completeness_atol: float = 1e-6,
        max_steps: int = 4096,
    ) -> Union[torch.Tensor, Tensors, tuple[Union[torch.Tensor, Tensors], torch.Tensor]]:
        """Layer IG of the output chosen by ``target``: LIG_j = (a_j(x) - a_j(x')) * int_0^1 dF/da_j da.

        Args:
            inputs, baselines, target, additional_forward_args, n_steps, method, internal_batch_size,
            return_convergence_delta, completeness_rtol, completeness_atol, max_steps: as in
                ``IntegratedGradients.attribute``; inputs may be integers (token ids), since the path
                runs through the layer's values.
            attribute_to_layer_input: attribute to the layer's input instead of its output.

        Returns:
            The attributions shaped like the layer's value (a tuple when the layer returns one), and
            delta (B,) with ``return_convergence_delta=True``.
        """
        _check_settings(n_steps, method, internal_batch_size, completeness_rtol, completeness_atol, max_steps)
        x, _ = format_inputs(inputs, floating=False)
        _check_finite(x, "inputs")
        n = x[0].shape[0]
        args = format_args(additional_forward_args, n)
        index = target_index(target, n)
        at_input = attribute_to_layer_input
        start, _ = self._layer_values(format_baselines(baselines, x), args, at_input, internal_batch_size)
        end, as_tuple = self._layer_values(x, args, at_input, internal_batch_size)

        def output(rows: torch.Tensor, points: Tensors) -> torch.Tensor:
            picked = None if index is None else index[rows]
            with _Swap(self.layer, attribute_to_layer_input, points, as_tuple):
                out = self.forward_func(*(t[rows] for t in x), *take(args, rows))
            return select_targets(out, picked)

        path = Path(start=start, end=end, output=output)
        return self._attribute_path(
            path,
            n_steps,
            method,
            internal_batch_size,
            completeness_rtol,
            completeness_atol,
            max_steps,
            return_convergence_delta,
            len(end) > 1,
        )
