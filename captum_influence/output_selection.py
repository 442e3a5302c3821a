"""Output selection: attribute logits, probabilities, log-probabilities or TRAK's margin.

A model may end in logits g, in ``nn.Softmax``/``nn.LogSoftmax``/``nn.Sigmoid`` modules, or in a
softmax called as a function inside ``forward`` (``F.softmax``, ``torch.softmax``,
``Tensor.softmax``, often after the stabilising ``z - z.max(dim, keepdim=True)[0]``). Module hooks
see only the modules; a ``torch.overrides.TorchFunctionMode`` sees every call.
One forward pass under both records each softmax, log_softmax and sigmoid with its input, and the
logits are the input of the call whose result ``forward`` returns (before the max subtraction,
when there is one). From the logits every space is computed:

    probs = softmax(g),  log_probs = log_softmax(g),  margin_c = g_c - logsumexp_{j != c} g_j,

with the elementwise sigmoid, logsigmoid and g itself when the model ends in a sigmoid. The tensor
``forward`` returns may be held in a dict / output object as ``logits`` (transformers'
``ModelOutput``), and forward's inputs may be positional or keyword (a tokenizer's encoding).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._data import logits_of

OUTPUTS = ("logits", "probs", "log_probs", "margin")

# Calls whose result can be a model's output probabilities: name -> the space it returns.
_ACTIVATIONS = {"softmax": "categorical", "log_softmax": "categorical", "sigmoid": "bernoulli"}
# Calls after which the logits are lost when forward returns something else.
_PROBABILITY_LIKE = frozenset({"softmax", "log_softmax", "softmin", "sigmoid", "logsigmoid", "exp"})
_MAXES = frozenset({"max", "amax"})
_NONLINEAR = (
    frozenset(_ACTIVATIONS)
    | _PROBABILITY_LIKE
    | _MAXES
    | frozenset(
        {
            "relu",
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
            "hardtanh",
            "hardsigmoid",
            "hardswish",
            "log",
            "log1p",
            "expm1",
            "logsumexp",
            "min",
            "amin",
            "clamp",
            "clip",
            "abs",
            "sqrt",
            "rsqrt",
            "pow",
            "square",
        }
    )
)
# Value-preserving calls: a softmax result seen through them is still the model's softmax.
_VIEWS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "squeeze",
        "unsqueeze",
        "flatten",
        "contiguous",
        "clone",
        "detach",
        "__getitem__",
        "select",
        "narrow",
        "permute",
        "transpose",
        "t",
        "to",
        "float",
        "double",
    }
)
# Elementwise changes of a softmax result with constants (``softmax(z) + 1e-9``, ``clamp``, ``log``): the
# softmax's input is still the model's logits, whatever follows it.
_ELEMENTWISE = frozenset(
    {
        "add",
        "__add__",
        "__radd__",
        "sub",
        "__rsub__",
        "mul",
        "__mul__",
        "__rmul__",
        "div",
        "__truediv__",
        "true_divide",
        "clamp",
        "clamp_min",
        "clamp_max",
        "clip",
        "log",
        "log1p",
        "log2",
        "log10",
        "sqrt",
        "pow",
        "__pow__",
        "nan_to_num",
    }
)
# Views after which a max-subtracted tensor keeps its shape, so its pre-max values still align.
_SAME_SHAPE = frozenset({"clone", "detach", "contiguous", "to", "float", "double"})
_ALIASES = {
    "special_softmax": "softmax",
    "special_log_softmax": "log_softmax",
    "special_expit": "sigmoid",
    "expit": "sigmoid",
    "subtract": "sub",
    "__sub__": "sub",
}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@dataclass(frozen=True)
class Finding:
    """A nonlinearity between the model's last parameterised layer and its output.

    ``name``: the function ("softmax", "max", ...); ``kind``: "module" (an ``torch.nn`` activation
    module, which forward hooks see) or "functional" (a call inside ``forward``, which they do not);
    ``where``: the module path for a module, else ``file:line`` of the call; ``line``: where it was
    called from in the model's code; ``dim``: the softmax dimension; ``max_subtracted``: its input
    is ``x - max(x)``; ``is_output``: its result is what ``forward`` returns.

    Args:
        name (str): the function's name, such as "softmax", "log_softmax", "sigmoid" or "max".
        kind (str): "module" (a ``torch.nn`` activation module) or "functional" (a call inside
            ``forward``).
        where (str): the module path for a module ("<model>" for the model itself), else
            ``file:line`` of the call.
        hooks_can_see (bool): whether module hooks (DeepLift and other hook-based methods) see
            it: true for modules, false for functional calls.
        line (str, optional): ``file:line`` in the model's code it was called from.
            Default: "".
        module_type (str, optional): the module's class name for a module. Default: None.
        dim (int, optional): the softmax dimension. Default: None.
        max_subtracted (bool, optional): its input is ``x - max(x)``. Default: False.
        is_output (bool, optional): its result is what ``forward`` returns. Default: False.
    """

    name: str
    kind: str
    where: str
    hooks_can_see: bool
    line: str = ""
    module_type: Optional[str] = None
    dim: Optional[int] = None
    max_subtracted: bool = False
    is_output: bool = False

    def __str__(self) -> str:
        what = f"{self.module_type} module {self.where!r}" if self.kind == "module" else f"functional {self.name}"
        facts = [f"dim={self.dim}"] if self.dim is not None else []
        facts += ["after a max subtraction"] if self.max_subtracted else []
        facts += ["returned by forward"] if self.is_output else []
        facts += ["module hooks see it" if self.hooks_can_see else "module hooks cannot see it"]
        return f"{what} at {self.line} ({', '.join(facts)})"


class _Call:
    """One recorded nonlinearity: its input and result, and where it ran."""

    __slots__ = ("name", "index", "input", "result", "dim", "module", "line", "unshifted")

    def __init__(self, name, index, input, result, dim, module, line, unshifted):
        self.name, self.index, self.input, self.result = name, index, input, result
        self.dim, self.module, self.line, self.unshifted = dim, module, line, unshifted


def _caller_line() -> str:
    """``file:line`` of the innermost frame outside torch and this package: the model's own code."""
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, _PACKAGE_DIR)):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"


def _norm_dim(dim: Any, ndim: int) -> Any:
    if isinstance(dim, (tuple, list)) and len(dim) == 1:
        dim = dim[0]
    return dim % ndim if isinstance(dim, int) and ndim > 0 else dim


def _softmax_dim(args: tuple, kwargs: dict, ndim: int) -> Optional[int]:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None:  # torch's implicit choice, kept for old code
        dim = 0 if ndim in (0, 1, 3) else 1
    return _norm_dim(dim, ndim)


def _is_activation_module(module: nn.Module) -> bool:
    return type(module).__module__ == "torch.nn.modules.activation" and not any(
        True for _ in module.parameters(recurse=False)
    )


class _Tracer(TorchFunctionMode):
    """Records, during one forward pass, the calls that decide where a model's logits are.

    Every torch call is numbered; the last one taking a parameter of ``model`` marks the last
    parameterised layer. Nonlinearities are recorded with their input and result; maxes and
    ``x - max(x)`` are followed so that a softmax of a max-subtracted input knows its ``x``; a
    softmax result is followed through value-preserving views. Tensors are keyed by ``id`` and
    held until the pass ends, so that ids stay unique.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.param_ids = {id(p) for p in model.parameters()}
        self.index = 0
        self.last_param = -1
        self.calls: list[_Call] = []
        self.modules: list[list] = []  # activation modules running: [module, line, recorded call]
        self.maxes: dict[int, tuple] = {}  # id(max) -> (max, x, dim)
        self.shifted: dict[int, tuple] = {}  # id(x - max) -> (x - max, x, dim of the max)
        self.derived: dict[int, tuple] = {}  # id(t) -> (t, call, views from call.result to t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self._see(func, args, kwargs, result)
        return result

    def _uses_params(self, args: tuple, kwargs: dict) -> bool:
        for a in (*args, *kwargs.values()):
            if isinstance(a, (list, tuple)):
                if any(id(b) in self.param_ids for b in a):
                    return True
            elif id(a) in self.param_ids:
                return True
        return False

    def _see(self, func: Callable, args: tuple, kwargs: dict, result: Any) -> None:
        index = self.index
        self.index += 1
        if self._uses_params(args, kwargs):
            self.last_param = index
        name = getattr(func, "__name__", "")
        name = _ALIASES.get(name, name)
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor):
            return
        if name in _VIEWS and isinstance(result, torch.Tensor):
            self._follow_view(func, name, first, args, kwargs, result)
        elif name in _MAXES and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            values = result[0] if isinstance(result, tuple) else result
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            self.maxes[id(values)] = (values, first, _norm_dim(dim, first.dim()))
        elif name == "sub" and len(args) > 1 and kwargs.get("alpha", 1) == 1:
            entry = self.maxes.get(id(args[1]))
            if entry is not None and entry[0] is args[1] and entry[1] is first:
                self.shifted[id(result)] = (result, first, entry[2])
        if name in _ELEMENTWISE and isinstance(result, torch.Tensor):
            self._follow_elementwise(args, kwargs, result)
        if name in _NONLINEAR:
            self._record(name, index, first, args, kwargs, result)

    def _follow_elementwise(self, args: tuple, kwargs: dict, result: torch.Tensor) -> None:
        """A softmax result changed elementwise by constants (numbers or one-element tensors that are not
        parameters) and keeping its shape still comes from that softmax's logits."""
        operands = (*args, *kwargs.values())
        sources = [a for a in operands if isinstance(a, torch.Tensor) and self._derived(a) is not None]
        others = [a for a in operands if not any(a is t for t in sources)]
        constant = all(
            not isinstance(a, torch.Tensor) or (a.numel() == 1 and id(a) not in self.param_ids) for a in others
        )
        if len(sources) == 1 and constant and result.shape == sources[0].shape:
            entry = self._derived(sources[0])
            assert entry is not None  # sources keeps only derived tensors
            self.derived[id(result)] = (result, entry[1], entry[2])

    def _derived(self, tensor: torch.Tensor) -> Optional[tuple]:
        entry = self.derived.get(id(tensor))
        return entry if entry is not None and entry[0] is tensor else None

    def _follow_view(self, func, name, source, args, kwargs, result) -> None:
        entry = self.derived.get(id(source))
        if entry is not None and entry[0] is source:
            self.derived[id(result)] = (result, entry[1], entry[2] + ((func, args[1:], kwargs),))
        entry = self.maxes.get(id(source))
        if entry is not None and entry[0] is source:
            self.maxes[id(result)] = (result, entry[1], entry[2])
        entry = self.shifted.get(id(source))
        if entry is not None and entry[0] is source and name in _SAME_SHAPE:
            self.shifted[id(result)] = (result, entry[1], entry[2])

    def _record(self, name, index, first, args, kwargs, result) -> None:
        module = self.modules[-1] if self.modules else None
        if module is not None and module[2] is not None:
            return  # one record per activation module call: its first nonlinearity
        if not isinstance(result, (torch.Tensor, tuple)):
            return
        dim = _softmax_dim(args, kwargs, first.dim()) if name in ("softmax", "log_softmax") else None
        unshifted = None
        entry = self.shifted.get(id(first))
        if name in ("softmax", "log_softmax") and entry is not None and entry[0] is first:
            if entry[2] is None or entry[2] == dim:  # a global or per-row max: softmax is invariant to it
                unshifted = entry[1]
        line = module[1] if module is not None else _caller_line()
        call = _Call(name, index, first, result, dim, module[0] if module else None, line, unshifted)
        self.calls.append(call)
        if module is not None:
            module[2] = call
        if name in _ACTIVATIONS:
            self.derived[id(result)] = (result, call, ())

    def enter_module(self, module: nn.Module, args: tuple) -> None:
        self.modules.append([module, _caller_line(), None])

    def exit_module(self, module: nn.Module, args: tuple, result: Any) -> None:
        entry = self.modules.pop()
        call = entry[2]
        if call is None:  # an activation that calls nothing we record (e.g. GLU): still a finding
            call = _Call(
                type(module).__name__.lower(),
                self.index,
                args[0] if args else None,
                result,
                None,
                module,
                entry[1],
                None,
            )
            self.calls.append(call)
        elif call.name in _ACTIVATIONS and self.derived.get(id(result), (None,))[0] is not result:
            self.derived[id(result)] = (result, call, ())  # a hook of the module replaced its output


@dataclass
class _Traced:
    """A traced forward pass: what it returned and the calls that ran."""

    model: nn.Module
    tensor: torch.Tensor
    tracer: _Tracer

    def output_call(self) -> Optional[tuple]:
        entry = self.tracer.derived.get(id(self.tensor))
        if entry is not None and entry[0] is self.tensor:
            return entry[1], entry[2]
        return None

    def where(self, call: _Call) -> str:
        if call.module is None:
            return call.line
        return next((name or "<model>" for name, m in self.model.named_modules() if m is call.module), "?")

    def describe(self, call: _Call) -> str:
        if call.module is None:
            return f"{call.name} (at {call.line})"
        return f"{call.name} (module {self.where(call)!r}, called at {call.line})"


def _trace(model: nn.Module, args: tuple, kwargs: dict) -> _Traced:
    tracer = _Tracer(model)
    activations = [m for m in model.modules() if _is_activation_module(m)]
    handles = [m.register_forward_pre_hook(tracer.enter_module) for m in activations]
    handles += [m.register_forward_hook(tracer.exit_module) for m in activations]
    try:
        with tracer:
            returned = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return _Traced(model, logits_of(returned), tracer)


@dataclass
class _Logits:
    """The logits of a forward pass and the space they live in ("categorical" or "bernoulli")."""

    logits: torch.Tensor
    space: str
    call: Optional[_Call]
    reshaped: bool


def _replay(views: tuple, tensor: torch.Tensor) -> torch.Tensor:
    for func, rest, kwargs in views:
        tensor = func(tensor, *rest, **kwargs)
    return tensor


def _find_logits(traced: _Traced) -> _Logits:
    found = traced.output_call()
    if found is not None:
        call, views = found
        source = call.unshifted if call.unshifted is not None else call.input
        logits = _replay(views, source)
        return _Logits(logits, _ACTIVATIONS[call.name], call, logits.shape != call.input.shape)
    tracer = traced.tracer
    lost = [c for c in tracer.calls if c.name in _PROBABILITY_LIKE and c.index > tracer.last_param]
    if lost:
        raise ValueError(
            f"model: no detectable logits: {traced.describe(lost[-1])} runs after the last "
            "parameterised layer, but forward does not return its result (later operations combine it "
            "with other tensors or change its shape), so the values before it cannot be recovered. "
            "Make forward return the logits, or "
            "return the softmax / log_softmax / sigmoid result itself."
        )
    return _Logits(traced.tensor, "categorical", None, False)


def _margins(logits: torch.Tensor) -> torch.Tensor:
    """TRAK's margin for every class along the last dim: m_c = g_c - logsumexp_{j != c} g_j.

    Equal to log(p_c / (1 - p_c)) with p = softmax(g); finite for any finite g. For a class below
    the top one the top logit is among its rivals, so sum_{j != c} exp(g_j - max) >= 1 has no
    cancellation; the top class takes the logsumexp of the others directly.
    """
    top, arg = logits.max(dim=-1, keepdim=True)
    is_top = torch.arange(logits.shape[-1], device=logits.device) == arg
    e = torch.exp(logits - top)
    # At the top entry the masked sum stays >= 1 so that the unused branch of where has finite gradients.
    rivals_below = top + torch.log(e.sum(-1, keepdim=True) - e.masked_fill(is_top, 0.0))
    rivals_top = torch.logsumexp(logits.masked_fill(is_top, float("-inf")), dim=-1, keepdim=True)
    return logits - torch.where(is_top, rivals_top, rivals_below)


class _Margin(nn.Module):
    """TRAK's margin m_c = g_c - logsumexp_{j != c} g_j over dim 1, for every class c."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return _margins(logits)


_HEADS: dict[str, dict[str, Callable[[], nn.Module]]] = {
    "categorical": {
        "logits": nn.Identity,
        "probs": lambda: nn.Softmax(dim=1),
        "log_probs": lambda: nn.LogSoftmax(dim=1),
        "margin": _Margin,
    },
    # Independent Bernoulli outputs: log(p / (1 - p)) of a sigmoid is its logit.
    "bernoulli": {"logits": nn.Identity, "probs": nn.Sigmoid, "log_probs": nn.LogSigmoid, "margin": nn.Identity},
}


def _check_classes(found: _Logits, output: str) -> None:
    """Probabilities over classes need (batch, classes) logits with the softmax over the classes."""
    if found.space == "bernoulli":
        return
    shape = tuple(found.logits.shape)
    call = found.call
    bad_dim = call is not None and (call.input.dim() != 2 or call.dim != 1 or found.reshaped)
    if len(shape) != 2 or shape[1] < 2 or bad_dim:
        detail = f" (softmax over dim {call.dim} of shape {tuple(call.input.shape)})" if call and bad_dim else ""
        raise ValueError(
            f"output={output!r}: the model's logits have shape {shape}{detail}; probabilities over "
            "classes need logits of shape (batch, classes) with at least 2 classes and any softmax "
            "over dim 1. Reshape in a wrapper module, or use output='logits'. For a single-logit "
            "binary model return torch.cat([torch.zeros_like(z), z], 1), whose softmax is (1 - p, p)."
        )


class _SelectedOutput(nn.Module):
    """``model`` seen in one output space; see :func:`select_output`."""

    def __init__(self, model: nn.Module, output: str):
        super().__init__()
        self.model = model
        self.output = output
        # The heads are modules so that hook-based methods (DeepLift) see the softmax they apply.
        self.categorical = _HEADS["categorical"][output]()
        self.bernoulli = _HEADS["bernoulli"][output]()

    def forward(self, *args, **kwargs) -> torch.Tensor:
        found = _find_logits(_trace(self.model, args, kwargs))
        if self.output != "logits":
            _check_classes(found, self.output)
        head = self.bernoulli if found.space == "bernoulli" else self.categorical
        return head(found.logits)

    def extra_repr(self) -> str:
        return f"output={self.output!r}"


def _as_call(example_inputs: Any) -> tuple[tuple, dict]:
    """forward's positional and keyword arguments: a dict is keywords, a tuple positional, else one."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)), {}


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}.")


def select_output(model: nn.Module, output: str = "logits", *, example_inputs: Any = None) -> nn.Module:
    """A module sharing ``model``'s parameters whose forward returns the chosen output space.

    ``output``: "logits" (g: the input of a trailing softmax / log_softmax / sigmoid, module or
    functional, taken before a stabilising ``x - max(x)`` and whatever elementwise changes by
    constants follow it, such as ``softmax(g) + 1e-9``, ``clamp`` or ``log``; the model's output
    when it ends in none), "probs" (softmax(g) over dim 1, or sigmoid(g)), "log_probs" (log_softmax(g), or
    logsigmoid(g)) or "margin" (m_c = g_c - logsumexp_{j != c} g_j = log(p_c / (1 - p_c)) for
    every class, TRAK's output; g itself for a sigmoid). Captum's ``target`` then picks the class.
    The heads are modules, so hook-based methods see the softmax they apply (DeepLift's rule for
    it is approximate); on "logits" DeepLift meets no softmax or max at all, and its completeness
    holds. The model may return a tensor or a dict / output object with a ``logits`` tensor (a
    transformers ``ModelOutput``), and the module takes forward's arguments as the model does,
    positional or keyword. ``example_inputs`` (a tensor, a tuple of positional arguments, or a
    dict of keyword arguments such as a tokenizer's encoding) runs one pass now, so that a model
    that cannot be handled fails here rather than at the first call.

    Args:
        model (nn.Module): the classifier; it returns a tensor, or a dict / output object with a
            ``logits`` tensor.
        output (str, optional): the output space, "logits", "probs", "log_probs" or "margin"
            (see above); otherwise a ValueError. Default: "logits".
        example_inputs (Tensor, tuple or dict, optional): forward's arguments for one check pass
            now (without gradients): a tensor, a tuple of positional arguments or a dict of
            keyword arguments. Default: None (no pass).

    Returns:
        nn.Module: a module holding ``model`` (its parameters shared, not copied) whose forward
        takes ``model``'s arguments and returns the chosen output, of the logits' shape (over
        classes, "probs", "log_probs" and "margin" need logits of shape (batch, classes)).

    Example::

        >>> ig = captum.attr.IntegratedGradients(ci.select_output(model, "logits"))
        >>> attributions = ig.attribute(x, target=y)
        >>> probs = ci.select_output(bert, "probs", example_inputs=encoding)(**encoding)  # (B, C)
    """
    _check_model(model)
    if output not in OUTPUTS:
        raise ValueError(f"output: expected one of {', '.join(map(repr, OUTPUTS))}; got {output!r}.")
    selected = _SelectedOutput(model, output)
    if example_inputs is not None:
        args, kwargs = _as_call(example_inputs)
        with torch.no_grad():
            selected(*args, **kwargs)
    return selected


def _shape_or_type(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def find_output_nonlinearities(model: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> list[Finding]:
    """Each nonlinearity between ``model``'s last parameterised layer and its output, in call order.

    Runs ``model(*example_inputs, **example_kwargs)`` once, without gradients; the output is a
    tensor or a dict / output object with a ``logits`` tensor. A call counts when it runs after the
    last torch call that takes one of the model's parameters, or when forward returns its result.
    ``hooks_can_see`` is true for ``torch.nn`` activation modules (what DeepLift and other
    hook-based methods rewrite) and false for functions called inside ``forward``.

    Args:
        model (nn.Module): the model to run.
        *example_inputs (Any): forward's positional arguments, for example one batch of its data.
        **example_kwargs (Any): forward's keyword arguments (such as a tokenizer's encoding). At
            least one positional or keyword argument is required; a forward that fails on them
            raises a ValueError.

    Returns:
        list of Finding: the nonlinearities found, in call order; empty when there are none.

    Example::

        >>> for finding in ci.find_output_nonlinearities(model, x):
        ...     print(finding)
        functional max at model.py:41 (module hooks cannot see it)
        functional softmax at model.py:42 (dim=1, after a max subtraction, returned by forward, ...)
        >>> ci.find_output_nonlinearities(bert, input_ids=ids, attention_mask=mask)
        []
    """
    _check_model(model)
    if not example_inputs and not example_kwargs:
        raise ValueError(
            "example_inputs: expected at least one input for model's forward, positional or keyword; got none."
        )
    try:
        with torch.no_grad():
            traced = _trace(model, example_inputs, example_kwargs)
    except (RuntimeError, IndexError, TypeError) as err:
        given = [_shape_or_type(x) for x in example_inputs]
        given += [f"{k}={_shape_or_type(v)}" for k, v in example_kwargs.items()]
        raise ValueError(
            f"example_inputs: the model's forward fails on the inputs given ({', '.join(given)}): "
            f"{type(err).__name__}: {str(err).strip()}; expected inputs the model takes, for example one batch "
            "of its data."
        ) from err
    found = traced.output_call()
    output_call = found[0] if found is not None else None
    findings = []
    for call in traced.tracer.calls:
        if call.index <= traced.tracer.last_param and call is not output_call:
            continue
        is_module = call.module is not None
        findings.append(
            Finding(
                name=call.name,
                kind="module" if is_module else "functional",
                where=traced.where(call),
                hooks_can_see=is_module,
                line=call.line,
                module_type=type(call.module).__name__ if is_module else None,
                dim=call.dim,
                max_subtracted=call.unshifted is not None,
                is_output=call is output_call,
            )
        )
    return findings
