"""Completeness checks: do the attributions add up to F(x) - F(x'), and if not, why not.

For attributions A(x) from a baseline x', completeness is sum_i A_i(x) = F(x) - F(x'); its
residual ``delta = sum_i A_i(x) - (F(x) - F(x'))`` is zero for exact Integrated Gradients, DeepLift
on a network its rules cover, and (in expectation) GradientShap. With a baseline distribution
(DeepLiftShap, GradientShap) F(x') is the mean over the baselines. ``check_completeness`` measures
delta per example against the model's own outputs and, when it is too large, names the likely
causes with a fix for each: nonlinearities DeepLift's hooks cannot see (functional softmax,
``torch.max``), a softmax module its rescale rule cannot conserve through, training mode, too few
integration steps, sampling (GradientShap).

Example::

    report = ci.check_completeness(DeepLift(model), x, target=y)
    if not report.passed:
        for suspect in report.suspects:
            print(suspect)
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Optional, cast

import torch
from captum.attr import Attribution, DeepLift, DeepLiftShap, GradientShap, LayerDeepLiftShap, LayerGradientShap
from captum.attr._core.deep_lift import SUPPORTED_NON_LINEAR
from torch import nn
from torch.autograd.graph import Node
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._attr_args import format_args, format_baselines, format_inputs, select_targets, take, target_index
from .output_selection import Finding, find_output_nonlinearities


class CompletenessWarning(UserWarning):
    """Attributions that do not add up to F(x) - F(x') within the requested tolerance."""


@dataclass(frozen=True)
class Suspect:
    """A likely cause of a completeness failure: ``kind`` (a short code), ``reason`` and a suggested ``fix``.

    Args:
        kind (str): the cause's code: "training_mode", "nondeterministic", "max_in_forward",
            "functional_nonlinearity", "nonelementwise_module", "unsupported_module",
            "too_few_steps", "not_integrable", "sampling" or "unexplained".
        reason (str): what was found, in a sentence.
        fix (str): what to change to remove it.
    """

    kind: str
    reason: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.reason} Fix: {self.fix}"


@dataclass(frozen=True)
class CompletenessReport:
    """Completeness per example: ``delta = sum(attributions) - output_change``, ``output_change = F(x) - F(x')``.

    ``relative_error = |delta| / |output_change|``; ``passed`` when |delta| <= rtol * |output_change| + atol
    for every example; ``suspects`` lists the likely causes of a failure (empty when passed).

    Args:
        delta (Tensor): sum(attributions) - output_change per example, (n,), float64.
        relative_error (Tensor): |delta| / |output_change| per example, (n,): 0 where both are
            0, inf where only the output change is.
        passed (bool): |delta| <= rtol * |output_change| + atol for every example.
        suspects (list of Suspect): the likely causes of a failure; empty when passed.
        output_change (Tensor): F(x) - F(x') per example, (n,), float64 (F(x') the mean over
            the baselines for a Shap method).
        rtol (float): the relative tolerance used.
        atol (float): the absolute tolerance used.
        failing (list of int, optional): the indices of the examples outside the tolerance.
            Default: [].
    """

    delta: torch.Tensor
    relative_error: torch.Tensor
    passed: bool
    suspects: list[Suspect]
    output_change: torch.Tensor
    rtol: float
    atol: float
    failing: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            f"completeness {'passed' if self.passed else 'FAILED'}: max relative error "
            f"{float(self.relative_error.max()):.3g} (rtol {self.rtol:g}, atol {self.atol:g})"
        )
        if self.passed:
            return head
        lines = [f"{head}; failing examples {self.failing}"] + [f"  - {s}" for s in self.suspects]
        return "\n".join(lines)


def _relative_error(delta: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """|delta| / |F(x) - F(x')|: 0 where both vanish, inf where only the change does."""
    size = change.abs()
    ratio = delta.abs() / size.clamp_min(torch.finfo(size.dtype).tiny)
    undefined = torch.where(delta == 0, torch.zeros_like(ratio), torch.full_like(ratio, float("inf")))
    return torch.where(size > 0, ratio, undefined)


def _within(delta: torch.Tensor, change: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """|delta| <= rtol * |F(x) - F(x')| + atol, per example."""
    return delta.abs() <= rtol * change.abs() + atol


def _check_method(method: Any) -> None:
    if not isinstance(method, Attribution):
        raise TypeError(
            f"method: expected a Captum attribution object (e.g. DeepLift(model)); got {type(method).__name__}."
        )
    if not method.has_convergence_delta():
        raise ValueError(
            f"method: {type(method).__name__} has no convergence delta, so completeness does not apply; expected "
            "IntegratedGradients, DeepLift, DeepLiftShap, GradientShap, LayerIntegratedGradients or similar."
        )
    if not getattr(method, "multiplies_by_inputs", True):
        raise ValueError(
            f"method: {type(method).__name__} was built with multiply_by_inputs=False; its local attributions "
            "are not meant to add up to F(x) - F(x'). Build it with multiply_by_inputs=True."
        )


def _draws_baselines(method: Attribution) -> bool:
    """Whether ``baselines`` is a distribution averaged over (the Shap methods)."""
    return isinstance(method, (DeepLiftShap, LayerDeepLiftShap, GradientShap, LayerGradientShap))


def _baseline_distribution(baselines: Any, x: tuple, *, arg: str = "baselines") -> tuple[torch.Tensor, ...]:
    """A Shap method's baselines: one tensor (m, *example shape) per input, the same m for all."""
    given = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(given) != len(x) or not all(isinstance(b, torch.Tensor) for b in given):
        raise ValueError(
            f"{arg}: expected {len(x)} tensor(s) of baseline examples, one per input; got {type(baselines).__name__}."
        )
    shapes = [tuple(b.shape) for b in given]
    if any(b.shape[1:] != t.shape[1:] for b, t in zip(given, x)) or len({s[0] for s in shapes}) != 1:
        wanted = [tuple(t.shape[1:]) for t in x]
        raise ValueError(f"{arg}: expected shapes (m, *example shape) matching {wanted} with one m; got {shapes}.")
    return tuple(b.detach() for b in given)


def _materialize(baselines: Any, inputs: Any) -> Any:
    """A callable baseline is called once (with the inputs when it takes arguments), as Captum does."""
    if callable(baselines):
        return baselines(inputs) if inspect.signature(baselines).parameters else baselines()
    return baselines


def _output_change(
    method: Attribution, x: tuple, baselines: Any, args: tuple, index: Optional[torch.Tensor]
) -> torch.Tensor:
    """F(x) - F(x') per example in float64; F(x') is the mean over a Shap method's baselines."""
    forward = method.forward_func
    with torch.no_grad():
        at_inputs = select_targets(forward(*x, *args), index)
        if _draws_baselines(method):
            dist = _baseline_distribution(baselines, x)
            n, m = x[0].shape[0], dist[0].shape[0]
            rows, cols = torch.arange(n).repeat_interleave(m), torch.arange(m).repeat(n)
            picked = None if index is None else index[rows]
            pairs = select_targets(forward(*(b[cols] for b in dist), *take(args, rows)), picked)
            at_baselines = pairs.reshape(n, m).mean(dim=1)
        else:
            at_baselines = select_targets(forward(*format_baselines(baselines, x), *args), index)
    return at_inputs.double() - at_baselines.double()


def _attribution_sums(attributions: Any, n: int) -> torch.Tensor:
    """sum_i A_i per example over every tensor the method returned (a layer's tuple, several layers)."""
    leaves = [a for a in tree_flatten(attributions)[0] if isinstance(a, torch.Tensor)]
    if not leaves or any(a.dim() == 0 or a.shape[0] != n for a in leaves):
        shapes = [tuple(a.shape) for a in leaves]
        raise ValueError(f"method: expected attributions with {n} rows, one per example; got shapes {shapes}.")
    # leaves is not empty, so the sum is a tensor, never the start value 0.
    return cast(torch.Tensor, sum(a.detach().reshape(n, -1).sum(dim=1, dtype=torch.float64) for a in leaves))


# Calls with no DeepLift rule when made outside a module that has one: they get the plain gradient.
_NONLINEAR_CALLS = frozenset(
    {
        "relu",
        "relu_",
        "relu6",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "gelu",
        "silu",
        "mish",
        "softplus",
        "softsign",
        "tanh",
        "sigmoid",
        "hardtanh",
        "hardsigmoid",
        "hardswish",
        "logsigmoid",
        "softmax",
        "log_softmax",
        "softmin",
        "exp",
        "log",
        "logsumexp",
        "max",
        "amax",
        "min",
        "amin",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
    }
)
_MAXES = frozenset({"max", "amax", "min", "amin"})
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


@dataclass(frozen=True)
class _Call:
    """A nonlinear call in the forward pass: the torch module running it (None: the model's own code)."""

    name: str
    line: str
    owner: Optional[nn.Module]
    grad_fn: Any


def _model_line() -> str:
    """``file:line`` of the innermost frame outside torch and this module."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(_TORCH_DIR) and name != _THIS_FILE:
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


class _Scan(TorchFunctionMode):
    """One forward pass, recording each nonlinear call and the innermost module running it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []
        self.running: list[nn.Module] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _NONLINEAR_CALLS:
            inner = self.running[-1] if self.running else None
            owner = inner if inner is not None and type(inner).__module__.startswith("torch.nn.") else None
            value = result[0] if isinstance(result, tuple) else result
            line = _model_line() if owner is None else ""
            self.calls.append(_Call(name, line, owner, getattr(value, "grad_fn", None)))
        return result

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.running.append(module)

    def _leave(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.running.pop()

    def run(self, forward: Any, x: tuple, args: tuple) -> Any:
        handles = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._leave),
        ]
        leaves = tuple(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in x)
        try:
            with torch.enable_grad(), self:
                return forward(*leaves, *args)
        finally:
            for handle in handles:
                handle.remove()


def _reaches(output: Any) -> set:
    """The autograd nodes the output depends on."""
    roots = [t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    seen: set = set()
    stack: list[Optional[Node]] = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def _model_of(method: Attribution) -> Optional[nn.Module]:
    """The module behind the method's forward function, when there is one."""
    forward = method.forward_func
    for candidate in (getattr(method, "model", None), forward, getattr(forward, "__self__", None)):
        if isinstance(candidate, nn.Module):
            return candidate
    return None


def _training_suspects(model: Optional[nn.Module], method: Attribution, x: tuple, args: tuple) -> list[Suspect]:
    if model is not None:
        stochastic = [
            (name or "<model>", type(m).__name__)
            for name, m in model.named_modules()
            if m.training and isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm))
        ]
        if stochastic:
            return [
                Suspect(
                    "training_mode",
                    f"the model is in training mode with {', '.join(f'{t} {n!r}' for n, t in stochastic)}: each "
                    "forward pass draws new dropout masks or normalises with the batch's own statistics, so F is not "
                    "one function of x.",
                    "call model.eval() before attributing.",
                )
            ]
    with torch.no_grad():
        first, second = method.forward_func(*x, *args), method.forward_func(*x, *args)
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and not torch.equal(first, second):
        return [
            Suspect(
                "nondeterministic",
                "two forward passes on the same inputs give different outputs, so F is not one function of x.",
                "make the forward pass deterministic (eval mode, no sampling) before attributing.",
            )
        ]
    return []


def _deeplift_suspects(method: Attribution, model: Optional[nn.Module], x: tuple, args: tuple) -> list[Suspect]:
    """Nonlinearities DeepLift's rules do not cover: no module hook, no rule for the module, or a softmax.

    (A nonlinear module run twice needs no suspect: Captum's DeepLift raises an error for it.)"""
    name = type(method).__name__
    tail: dict[Any, Finding] = {}
    if model is not None:
        for nonlinearity in find_output_nonlinearities(model, *x, *args):
            place = nonlinearity.where if nonlinearity.kind == "module" else (nonlinearity.name, nonlinearity.line)
            tail[place] = nonlinearity
    to_logits = f"attribute the logits instead: {name}(ci.select_output(model, 'logits'))"
    names = {id(m): n or "<model>" for n, m in (model.named_modules() if model is not None else ())}
    scan = _Scan()
    reached = _reaches(scan.run(method.forward_func, x, args))
    found: dict[tuple, Suspect] = {}
    key: tuple[str, ...]
    for call in scan.calls:
        if call.grad_fn is not None and call.grad_fn not in reached:
            continue  # its result does not reach the attributed output
        if call.owner is None:
            finding = tail.get((call.name, call.line))
            where = call.line
            if call.name in _MAXES:
                key = ("max_in_forward", call.name, where)
                reason = (
                    f"torch.{call.name} inside forward at {where}: no hook sees it and DeepLift has no rule for it; "
                    "its gradient routes everything to one element, so DeepLift's multipliers do not add up."
                )
                fix = (
                    f"{to_logits}; a softmax needs no max subtraction (F.softmax is already stable)."
                    if finding is not None
                    else "use a module DeepLift supports (nn.MaxPool*), or ci.IntegratedGradients."
                )
            else:
                returned = " (returned by forward)" if finding is not None and finding.is_output else ""
                key = ("functional_nonlinearity", call.name, where)
                reason = (
                    f"functional {call.name} inside forward at {where}{returned}: "
                    "DeepLift's hooks cannot see a function call, so it gets the plain gradient instead of the "
                    "rescale rule and the attributions no longer add up to F(x) - F(x')."
                )
                module = f"nn.{_module_name(call.name)}()"
                fix = (
                    f"{to_logits}, or keep probabilities with ci.IntegratedGradients(ci.select_output(model, 'probs'))."
                    if finding is not None
                    else f"call it through a module (e.g. self.act = {module}), or use ci.IntegratedGradients."
                )
        else:
            where = names.get(id(call.owner), type(call.owner).__name__)
            if isinstance(call.owner, nn.Softmax):
                key = ("nonelementwise_module", where)
                reason = (
                    f"nn.Softmax module {where!r}: softmax is not elementwise, and DeepLift's rule for it rescales "
                    "each output by the change of its own input only, which cannot conserve F(x) - F(x') across "
                    "classes (the attributions only look right)."
                )
                fix = to_logits + (", or use ci.IntegratedGradients for probabilities." if where in tail else ".")
            elif type(call.owner) in SUPPORTED_NON_LINEAR:
                continue
            else:
                key = ("unsupported_module", where)
                reason = (
                    f"{type(call.owner).__name__} module {where!r} computes {call.name}, for which DeepLift has no "
                    "rule: it gets the plain gradient and the attributions no longer add up."
                )
                fix = (
                    to_logits + "."
                    if where in tail
                    else "use activations DeepLift supports (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, MaxPool), "
                    "or ci.IntegratedGradients."
                )
        found.setdefault(key, Suspect(key[0], reason, fix))
    return list(found.values())


def _module_name(function: str) -> str:
    """The torch.nn module for a functional activation, for the suggested fix."""
    modules = {
        "relu": "ReLU",
        "relu_": "ReLU",
        "tanh": "Tanh",
        "sigmoid": "Sigmoid",
        "elu": "ELU",
        "leaky_relu": "LeakyReLU",
        "softplus": "Softplus",
    }
    return modules.get(function, "ReLU")


def _steps_suspect(method: Attribution, kwargs: dict, error: float, measure: Callable[[dict], float]) -> Suspect:
    """Whether more integration steps shrink the error: too few steps, or a path the integral cannot follow."""
    steps = kwargs.get("n_steps", inspect.signature(method.attribute).parameters["n_steps"].default)
    if steps == "auto":
        steps = int(method.convergence.n_steps.max())
    more = 4 * steps
    finer = measure({**kwargs, "n_steps": more})
    if finer < error / 2:
        return Suspect(
            "too_few_steps",
            f"the integral is not converged: relative error {error:.3g} at n_steps={steps} falls to {finer:.3g} at "
            f"n_steps={more}.",
            "raise n_steps, or let ci.IntegratedGradients(...).attribute(..., n_steps='auto') refine each example "
            "until |delta| <= completeness_rtol * |F(x) - F(x')|.",
        )
    return Suspect(
        "not_integrable",
        f"more steps do not help (relative error {error:.3g} at n_steps={steps}, {finer:.3g} at {more}): F is "
        "probably discontinuous along the path (argmax, rounding, thresholds), or reaches the output other than "
        "through the attributed layer.",
        "attribute a continuous output (e.g. ci.select_output(model, 'logits')) of a layer every path goes through.",
    )


def check_completeness(
    method: Attribution,
    inputs: Any,
    *,
    baselines: Any = None,
    target: Any = None,
    additional_forward_args: Any = None,
    rtol: float = 1e-2,
    atol: float = 1e-6,
    **attribute_kwargs: Any,
) -> CompletenessReport:
    """Run ``method.attribute`` and check sum(attributions) = F(x) - F(x') per example.

    ``method``: any Captum attribution object with a convergence delta (ours or Captum's
    IntegratedGradients, DeepLift, DeepLiftShap, GradientShap, LayerIntegratedGradients ...);
    ``attribute_kwargs`` go to its ``attribute`` (n_steps, attribute_to_layer_input, ...). F(x) and
    F(x') are the method's forward function on the inputs and baselines, not the method's own
    delta. Passes when |delta| <= rtol * |F(x) - F(x')| + atol for every example; otherwise
    ``suspects`` names the likely causes, each with a fix.

    Args:
        method (Attribution): a Captum attribution object with a convergence delta, built with
            ``multiply_by_inputs=True``; otherwise a TypeError or ValueError.
        inputs (Tensor or tuple of Tensor): the inputs x, batch first, as ``method.attribute``
            takes them.
        baselines (Tensor, number, tuple or callable, optional): the baselines x', as
            ``method.attribute`` takes them (a callable is called once, with ``inputs`` when it
            takes arguments); for DeepLiftShap and GradientShap a distribution, one tensor
            (m, *example shape) per input, over which F(x') is averaged. Default: None (zeros).
        target (int, tuple, Tensor or list, optional): the output index per example, as in
            Captum. Default: None (the output is a scalar per example).
        additional_forward_args (Any, optional): further arguments of the forward function, as
            in Captum. Default: None.
        rtol (float, optional): relative tolerance, >= 0. Default: 1e-2.
        atol (float, optional): absolute tolerance, >= 0. Default: 1e-6.
        **attribute_kwargs (Any): further arguments of ``method.attribute`` (``n_steps``,
            ``n_samples`` and ``internal_batch_size`` must be positive ints, or ``n_steps="auto"``
            for ``ci.IntegratedGradients``); not ``return_convergence_delta``.

    Returns:
        CompletenessReport: delta, relative error and output change per example, whether every
        example passed, the failing examples and the suspects (empty when passed).
    """
    _check_method(method)
    for arg, value, low in (("rtol", rtol, 0.0), ("atol", atol, 0.0)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{arg}: expected a float >= 0; got {value!r}.")
    for arg in ("n_steps", "n_samples"):  # checked here: Captum would assert, or divide by zero
        value = attribute_kwargs.get(arg, 1)
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg}: expected a positive int (or 'auto' for ci.IntegratedGradients); got {value!r}.")
    batch = attribute_kwargs.get("internal_batch_size")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"internal_batch_size: expected a positive int or None; got {batch!r}.")
    if "return_convergence_delta" in attribute_kwargs:
        raise ValueError("return_convergence_delta: check_completeness measures delta itself; do not pass it.")
    x, _ = format_inputs(inputs, floating=False)
    n = x[0].shape[0]
    args = format_args(additional_forward_args, n)
    index = target_index(target, n)
    baselines = _materialize(baselines, inputs)

    def measure(kwargs: dict) -> torch.Tensor:
        attributions = method.attribute(
            inputs, baselines=baselines, target=target, additional_forward_args=additional_forward_args, **kwargs
        )
        return _attribution_sums(attributions, n)

    change = _output_change(method, x, baselines, args, index)
    delta = measure(attribute_kwargs) - change
    relative = _relative_error(delta, change)
    ok = _within(delta, change, rtol, atol)
    suspects: list[Suspect] = []
    if not ok.all():
        suspects = _suspects(
            method,
            x,
            args,
            attribute_kwargs,
            float(relative.max()),
            lambda kwargs: float(_relative_error(measure(kwargs) - change, change).max()),
        )
    return CompletenessReport(
        delta=delta,
        relative_error=relative,
        passed=bool(ok.all()),
        suspects=suspects,
        output_change=change,
        rtol=float(rtol),
        atol=float(atol),
        failing=(~ok).nonzero().flatten().tolist(),
    )


def _suspects(
    method: Attribution, x: tuple, args: tuple, kwargs: dict, error: float, measure: Callable[[dict], float]
) -> list[Suspect]:
    """Every likely cause of a failed check; ``measure(kwargs)`` reruns the method, returning its worst relative
    error."""
    model = _model_of(method)
    suspects = _training_suspects(model, method, x, args)
    if isinstance(method, DeepLift):
        suspects += _deeplift_suspects(method, model, x, args)
    if isinstance(method, (GradientShap, LayerGradientShap)):
        suspects.append(
            Suspect(
                "sampling",
                f"{type(method).__name__} draws random baselines and path points: completeness holds only in "
                f"expectation, and with n_samples={kwargs.get('n_samples', 5)} the estimate is noisy.",
                "raise n_samples, or use ci.IntegratedGradients on each baseline for an exact decomposition.",
            )
        )
    if "n_steps" in inspect.signature(method.attribute).parameters and not suspects:
        suspects.append(_steps_suspect(method, kwargs, error, measure))
    if not suspects:
        suspects.append(
            Suspect(
                "unexplained",
                f"none of the known causes was found in {type(method).__name__}'s forward pass.",
                "compare with ci.IntegratedGradients(...).attribute(..., n_steps='auto'), whose completeness "
                "is exact up to the quadrature.",
            )
        )
    return suspects
