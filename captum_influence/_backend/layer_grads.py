"""Per-example gradients from layer hooks: the engine under every method.

One batched forward records every hooked layer's input a, one backward of sum_b f_b returns
every output gradient d (for examples that do not interact, row b of d(sum f)/dy is d f_b/dy),
and the layer's rule (``layer_rules``) turns (a, d) into all B gradients, or keeps them as factors:
about the arithmetic of one ordinary backward pass. Each parameter's (B, |theta|) block can go
straight into a :class:`Projector` (``project_param``), so the (B, P) matrix never exists.

One fallback chain for what the hooks cannot do exactly: parameters of layers without a rule
(recurrent layers, custom modules) go to ``vmap``, and from there to a loop of single-example
gradients when vmap cannot run the model; each step warns with the module's name and, for vmap,
the source line where it failed. Nothing is dropped.

One check, on the first chunk: the hooks' gradients of a few examples against a separate
forward and backward of each example alone. A forward that couples the examples of a batch
(a branch on a batch statistic) is caught there and every gradient is then taken one example at
a time; a parameter used outside its module's forward is caught by a second comparison, of
sum_b v_b g_b with autograd's gradient of sum_b v_b f_b for random v, and goes to vmap.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union, cast

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from .factored_projection import FactoredProjector
from .grads import (
    OutputFn,
    _as_tuple,
    _check_chunk_size,
    batch_size_of,
    iter_per_example_grads,
    single_example_grads,
    slice_batch,
)
from .layer_calls import LayerCall, module_path, output_grads, record_calls
from .layer_rules import LayerRule, rule_for
from .model_checks import check_deterministic, check_eval_norms
from .params import ParamSpec, select_param_names
from .projector import Projector

PRECISIONS = ("exact", "tf32", "bf16")
Factors = tuple[torch.Tensor, torch.Tensor]
# Examples compared with a forward of their own in the check (first, middle and last of the chunk).
_CHECK_EXAMPLES = 3


@contextlib.contextmanager
def _precision(precision: str) -> Iterator[None]:
    """TF32 matrix products (float32 accumulation) for the "tf32" mode; settings restored after."""
    if precision != "tf32":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """No TF32 anywhere (matmuls and cuDNN convolutions), for the check."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-8 if dtype == torch.float64 else 1e-3


@dataclass
class _Hooked:
    """A module whose selected parameters the hooks compute: its rule and ``{attr: name}``."""

    module: nn.Module
    rule: LayerRule
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class LayerIO:
    """One call of a layer kept raw: its input ``a`` and output gradient ``d``, batch first."""

    module: nn.Module
    a: torch.Tensor
    d: torch.Tensor


@dataclass
class ChunkGrads:
    """One chunk's per-example gradients: ``grads`` {name: (B, *shape)} for every selected
    parameter not in a factored layer, ``factors`` {module path: (A, D)} for factored layers
    (positions and calls concatenated along dim 1; see ``layer_rules``)."""

    grads: dict[str, torch.Tensor]
    factors: dict[str, Factors]


class LayerGrads:
    """Per-example gradients of ``fn(model, *inputs) -> Tensor[B]`` from forward/backward hooks.

    Linear, Conv1d/2d/3d, BatchNorm (eval), LayerNorm, GroupNorm, Embedding (inputs shared by the
    batch included, such as position ids of batch dimension 1) and transformers' Conv1D parameters
    come from each layer's input and output gradient with batched products: the same numbers as
    a loop of single-example autograd calls, up to float rounding. Other parameters go to the
    vmap path and from there to a loop (``fallback="vmap"``, warning with the module's name) or
    raise (``fallback="error"``); ``vmap_fallback="error"`` raises where vmap cannot run the model.
    ``precision``: "exact" (the operands' dtype), "tf32" (TF32 matrix products on GPU) or "bf16"
    (bfloat16 operands, float32 accumulation) for the per-layer products. ``check``: compare the
    first chunk with single-example autograd once (see the module docstring); a random model
    (Dropout in training mode) raises there.

    Example::

        >>> lg = LayerGrads(model, params=None)
        >>> proj = Projector(param_shapes(model, lg.names), 2048, device="cuda")
        >>> features = lg.project(fn, (x, y), proj)          # (B, 2048), no (B, P) matrix
    """

    def __init__(
        self,
        model: nn.Module,
        params: ParamSpec = None,
        *,
        fallback: str = "vmap",
        precision: str = "exact",
        check: bool = True,
        vmap_fallback: str = "loop",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module; got {type(model).__name__}.")
        if fallback not in ("vmap", "error"):
            raise ValueError(f"fallback: expected 'vmap' or 'error'; got {fallback!r}.")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}; got {precision!r}.")
        if vmap_fallback not in ("loop", "error"):
            raise ValueError(f"vmap_fallback: expected 'loop' or 'error'; got {vmap_fallback!r}.")
        self.vmap_fallback = vmap_fallback
        self.model = model
        self._paths = {id(m): path for path, m in reversed(list(model.named_modules()))}
        self.names = select_param_names(model, params)
        self.fallback = fallback
        self.precision = precision
        self._checked = not check
        #: True once the forward was found to couple the examples: each example then goes alone.
        self.coupled = False
        self._guarded = 0  # chunks whose coupling was checked, to rotate the example compared
        #: why each module that is not on the hook path is not, by module path
        self.reasons: dict[str, str] = {}
        #: parameters the check found used outside their module's forward (so not d a^T)
        self.used_outside: set[str] = set()
        table = dict(model.named_parameters())
        name_of = {id(table[name]): name for name in self.names}
        owners: dict[str, list[tuple[str, nn.Module, str]]] = {name: [] for name in self.names}
        for path, module in model.named_modules(remove_duplicate=False):
            for attr, p in module.named_parameters(recurse=False):
                if id(p) in name_of and all(m is not module for _, m, _ in owners[name_of[id(p)]]):
                    owners[name_of[id(p)]].append((path, module, attr))
        # A parameter goes to the hooks only when every module holding it has an exact rule.
        self._hooked: dict[int, _Hooked] = {}
        self.vmap_names: list[str] = []
        #: parameters of batch dimension 1 used directly in a forward (a class token, learned
        #: position embeddings): expanded to the batch, so that each example's row is its gradient
        self.shared_names: list[str] = []
        reasons: dict[str, str] = {}
        for name, held_by in owners.items():
            rules = {path: rule_for(module) for path, module, _ in held_by}
            why = {path: reason for path, (_, reason) in rules.items() if reason}
            if why and table[name].dim() > 1 and table[name].shape[0] == 1:
                self.shared_names.append(name)
                continue
            if why or not held_by:
                self.vmap_names.append(name)
                reasons.update(why or {name: "a parameter held by no module"})
                continue
            for path, module, attr in held_by:
                rule = rules[path][0]
                assert rule is not None
                self._hooked.setdefault(id(module), _Hooked(module, rule)).attrs[attr] = name
        if reasons:
            self._fall_back(reasons)

    def _fall_back(self, reasons: dict[str, str], kind: str = "module") -> None:
        """Warn (or raise with fallback="error") that these modules' (or parameters') gradients
        are taken one example at a time, and why."""
        self.reasons.update(reasons)
        listed = "; ".join(f"{kind} {path!r}: {reason}" for path, reason in reasons.items())
        if self.fallback == "error":
            raise ValueError(
                f"model: the hook path cannot compute these per-example gradients exactly ({listed}); "
                "use fallback='vmap' or leave these parameters out of params."
            )
        warnings.warn(f"per-example gradients by vmap (a loop where vmap fails) for {listed}.", stacklevel=3)

    @property
    def hook_names(self) -> list[str]:
        """Names computed from hooks (the rest: ``vmap_names`` by vmap, ``shared_names`` expanded)."""
        return [name for name in self.names if name not in self.vmap_names and name not in self.shared_names]

    def hooks_cover(self, module: nn.Module) -> bool:
        """True when every parameter of ``module`` is selected, held by no other hooked module and
        computed by its hooks alone: its gradients may then be kept as factors."""
        hooked = self._hooked.get(id(module))
        own = {name for name, _ in module.named_parameters(recurse=False)}
        if hooked is None or not own or set(hooked.attrs) != own:
            return False
        elsewhere = {name for key, h in self._hooked.items() if key != id(module) for name in h.attrs.values()}
        return all(name not in self.vmap_names and name not in elsewhere for name in hooked.attrs.values())

    def covered_modules(self) -> dict[str, nn.Module]:
        """``{path: module}`` of the hooked modules whose gradients may be kept as factors (``hooks_cover``)."""
        return {self._path(h.module): h.module for h in self._hooked.values() if self.hooks_cover(h.module)}

    def module_params(self, module: nn.Module) -> list[str]:
        """The selected parameter names the hooks of ``module`` compute."""
        hooked = self._hooked.get(id(module))
        return list(hooked.attrs.values()) if hooked is not None else []

    def path_of(self, module: nn.Module) -> str:
        """``module``'s name in the model (the first, for a module registered twice)."""
        path = self._paths.get(id(module))
        return path if path is not None else module_path(self.model, module)

    _path = path_of

    # --- one forward and backward with hooks ----------------------------------------------

    def _run_hooks(self, fn: OutputFn, chunk: tuple, n: int, check_weights: Optional[torch.Tensor] = None):
        """Forward with recording hooks and a backward of sum_b f_b; returns the output, the records,
        their output gradients, the batch-shared parameters' per-example gradients, and with
        ``check_weights`` v also autograd's gradients of sum_b v_b f_b with respect to the hooked
        parameters (else None)."""
        hooked = [h.module for h in self._hooked.values()]
        table = dict(self.model.named_parameters())
        params = [table[name] for name in self.hook_names]
        frozen = [p for p in params if not p.requires_grad]
        shared = {
            name: table[name].detach().expand(n, *table[name].shape[1:]).clone().requires_grad_(True)
            for name in self.shared_names
        }
        try:
            for p in frozen:  # hooked outputs join the graph (no copies) and the check can use them
                p.requires_grad_(True)
            with _reparametrize_module(self.model, shared) if shared else contextlib.nullcontext():
                out, records = record_calls(self.model, fn, chunk, n, hooked)
            for rec in records:
                if rec.value._version != rec.version:
                    raise ValueError(
                        f"model: the input of module {self._path(rec.module)!r} was modified in place after "
                        "the module ran; the hook path needs it unchanged (avoid the in-place op or use vmap)."
                    )
            d_list = output_grads(out, records, retain_graph=check_weights is not None or bool(shared))
            shared_grads = {}
            if shared:
                found = torch.autograd.grad(
                    out,
                    list(shared.values()),
                    torch.ones_like(out),
                    allow_unused=True,
                    retain_graph=check_weights is not None,
                )
                shared_grads = {
                    name: (g if g is not None else torch.zeros_like(x)).reshape(n, *table[name].shape)
                    for (name, x), g in zip(shared.items(), found)
                }
            ref: Optional[list[Optional[torch.Tensor]]] = None
            if check_weights is not None:
                ref = [None] * len(params)
                if out.requires_grad:
                    ref = list(torch.autograd.grad(out, params, check_weights.to(out), allow_unused=True))
        finally:
            for p in frozen:
                p.requires_grad_(False)
        return out.detach(), records, d_list, shared_grads, ref

    def _contributions(
        self,
        records: list[LayerCall],
        d_list: list,
        n: int,
        dtype: Optional[torch.dtype],
        factored: Sequence[nn.Module] = (),
        unbatched: Optional[dict] = None,
        raw: Sequence[nn.Module] = (),
    ) -> Iterator[tuple[str, Any]]:
        """``(name, Tensor[B, *shape])`` for each hooked call (a name repeats for a reused layer),
        ``(path, (A, D))`` for calls of ``factored`` modules, ``(path, LayerIO)`` for calls of
        ``raw`` modules. A layer whose first dimension is not the example raises, or with
        ``unbatched`` is noted there (path: reason) and skipped."""
        factored_ids = {id(m) for m in factored}
        raw_ids = {id(m) for m in raw}
        for rec, d in zip(records, d_list):
            if d is None:  # the call did not reach the output
                continue
            if rec.value.shape[0] != n or d.shape[0] != n:
                path = self._path(rec.module)
                reason = (
                    f"got an input of shape {tuple(rec.value.shape)} whose first dimension is neither "
                    f"the batch of {n} examples nor 1 (shared by the batch)"
                )
                if unbatched is None:
                    raise ValueError(f"model: module {path!r} {reason}; the hook path needs batch-first layers.")
                unbatched[path] = reason
                continue
            hooked = self._hooked[id(rec.module)]
            if id(rec.module) in raw_ids:
                yield self._path(rec.module), LayerIO(rec.module, rec.value, d)
                continue
            if id(rec.module) in factored_ids:
                assert hooked.rule.factors is not None  # _chunk takes only factored modules with a factor rule
                yield self._path(rec.module), hooked.rule.factors(rec.module, rec.value, d)
                continue
            for attr, g in hooked.rule.grads(rec.module, rec.value, d, dtype, set(hooked.attrs)).items():
                yield hooked.attrs[attr], g

    # --- the check --------------------------------------------------------------------------

    def check(self, fn: OutputFn, chunk: Any) -> None:
        """Once per engine: refuse a random model, then compare the hooks with single-example
        autograd on a few examples of ``chunk`` (see the module docstring)."""
        if self._checked:
            return
        chunk = _as_tuple(chunk)
        n = batch_size_of(chunk)
        check_eval_norms(self.model)
        check_deterministic(self.model, fn, slice_batch(chunk, 0, min(n, 2)))
        self._checked = True
        if not self.hook_names and not self.shared_names:
            return
        with _full_precision():
            self._check_hooks(fn, chunk, n)

    def _check_hooks(self, fn: OutputFn, chunk: tuple, n: int) -> None:
        table = dict(self.model.named_parameters())
        hook_names = self.hook_names
        generator = torch.Generator().manual_seed(0)
        v = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5
        try:
            out, records, d_list, shared_grads, ref = self._run_hooks(fn, chunk, n, v)
        except RuntimeError:  # a shape error, most likely from a parameter that is not broadcast
            failures = self._expansion_failures(fn, chunk, n)
            if not failures:
                raise
            for name, err in failures.items():
                self._unshare([name], f"expanded to the batch, the forward fails ({type(err).__name__}: {err})")
            return self._check_hooks(fn, chunk, n)
        unbatched: dict[str, str] = {}
        per_example: dict[str, torch.Tensor] = dict(shared_grads)
        for name, g in self._contributions(records, d_list, n, None, unbatched=unbatched):
            per_example[name] = per_example[name] + g if name in per_example else g
        zeros = {
            name: torch.zeros(n, *table[name].shape, dtype=table[name].dtype, device=table[name].device)
            for name in hook_names
        }
        per_example.update({name: per_example.get(name, zeros[name]).to(table[name].dtype) for name in hook_names})
        ref_of = {name: r if r is not None else torch.zeros_like(table[name]) for name, r in zip(hook_names, ref)}
        weighted = {
            name: torch.einsum("b,b...->...", v.to(per_example[name]), per_example[name]) for name in hook_names
        }
        # Rounding grows with a layer's gradient: compare each parameter at its module's scale,
        # floored at a small fraction of the largest (a bias whose exact gradient is 0, say).
        scales = {
            key: sum(max(float(ref_of[nm].norm()), float(weighted[nm].norm())) ** 2 for nm in h.attrs.values()) ** 0.5
            for key, h in self._hooked.items()
        }
        floor = 1e-4 * max(scales.values(), default=0.0)
        reasons: dict[str, str] = {}
        outside: set[str] = set()
        for key, hooked in self._hooked.items():
            path = self._path(hooked.module)
            if path in unbatched:
                reasons[path] = unbatched[path]
                outside.update(hooked.attrs.values())
                continue
            for name in hooked.attrs.values():
                error = float((weighted[name] - ref_of[name]).norm()) / max(
                    scales[key], floor, torch.finfo(torch.float64).tiny
                )
                if error > _tolerance(table[name].dtype):
                    outside.add(name)
                    self.used_outside.add(name)
                    reasons[path] = (
                        f"the hooks do not reproduce autograd for {name!r} (error {error:.1e} of the layer's "
                        "gradient): the parameter is used outside the module's forward"
                    )
        coupling, not_shared = self._coupling(fn, chunk, n, out, per_example, outside)
        if coupling is not None and self.shared_names:  # rule out the expansion before blaming forward
            self._unshare(self.shared_names, "expanded to the batch, it changes the model's output")
            return self._check_hooks(fn, chunk, n)
        if not_shared and coupling is None:
            self._unshare(not_shared, "its rows expanded to the batch are not each example's gradient")
        if coupling is not None:
            self._report_coupling(coupling)
            return
        if outside:
            self.vmap_names = [name for name in self.names if name in outside or name in self.vmap_names]
            for key in list(self._hooked):
                hooked = self._hooked[key]
                hooked.attrs = {attr: name for attr, name in hooked.attrs.items() if name not in outside}
                if not hooked.attrs:
                    del self._hooked[key]
            self._fall_back(reasons)

    def _coupling(
        self, fn: OutputFn, chunk: tuple, n: int, out: torch.Tensor, per_example: dict, skip: set
    ) -> tuple[Optional[str], list[str]]:
        """How the batched forward differs from forwards of single examples (None: it does not),
        compared on the first, middle and last example: the output, then each hooked gradient;
        and the batch-shared parameters whose expanded rows are not the examples' gradients."""
        examples = sorted({0, n // 2, n - 1})[:_CHECK_EXAMPLES]
        names = [name for name in per_example if name not in skip]
        alone = single_example_grads(self.model, fn, [slice_batch(chunk, b, b + 1) for b in examples], names)
        not_shared: list[str] = []
        for i, b in enumerate(examples):
            single, grads = alone[i]
            scale = max(float(single.abs().max()), float(out[b].abs()), torch.finfo(torch.float64).tiny)
            error = float((out[b] - single.reshape(())).abs()) / scale
            if error > _tolerance(out.dtype):
                return (
                    f"example {b}'s output in the batch differs from its output alone "
                    f"(relative difference {error:.1e})",
                    [],
                )
            # A gradient that is zero up to rounding (a key bias under softmax) is compared at the
            # scale of the example's largest gradient.
            largest = max(float(per_example[nm][b].norm()) for nm in names)
            for name in names:
                got, want = per_example[name][b], grads[name]
                diff = float((got - want).norm())
                error = diff / max(float(want.norm()), float(got.norm()), torch.finfo(torch.float64).tiny)
                if error <= _tolerance(want.dtype) or diff <= 1e-6 * largest:
                    continue
                if name in self.shared_names:
                    not_shared.append(name)
                    continue
                return (
                    f"example {b}'s gradient of {name!r} from the batch differs from its gradient alone "
                    f"(relative difference {error:.1e})"
                ), []
        return None, sorted(set(not_shared))

    def _expansion_failures(self, fn: OutputFn, chunk: tuple, n: int) -> dict[str, RuntimeError]:
        """The batch-shared parameters with which, each expanded alone, the forward fails."""
        table = dict(self.model.named_parameters())
        failures = {}
        for name in self.shared_names:
            expanded = {name: table[name].detach().expand(n, *table[name].shape[1:])}
            try:
                with torch.no_grad(), _reparametrize_module(self.model, expanded):
                    fn(self.model, *chunk)
            except RuntimeError as err:
                failures[name] = err
        return failures

    def _unshare(self, names: Sequence[str], reason: str) -> None:
        """Send batch-shared parameters to the vmap path, saying why."""
        self.shared_names = [name for name in self.shared_names if name not in names]
        self.vmap_names = [name for name in self.names if name in names or name in self.vmap_names]
        self._fall_back({name: reason for name in names}, kind="parameter")

    # --- one chunk ------------------------------------------------------------------------

    def collect(self, fn: OutputFn, chunk: Any, *, factored: Sequence[nn.Module] = ()) -> ChunkGrads:
        """Every selected parameter's per-example gradients for ``chunk``, those of the
        ``factored`` modules (each covered by the hooks, see ``hooks_cover``) as factors."""
        chunk = _as_tuple(chunk)
        n = batch_size_of(chunk)
        grads: dict[str, torch.Tensor] = {}
        factor_parts: dict[str, list[Factors]] = {}

        def sink(name: str, g: torch.Tensor) -> None:
            grads[name] = grads[name] + g if name in grads else g

        def factor_sink(path: str, factors: Factors) -> None:
            factor_parts.setdefault(path, []).append(factors)

        self._chunk(fn, chunk, sink, factored, factor_sink)
        table = dict(self.model.named_parameters())
        factored_names = {n for m in factored for n in self._hooked[id(m)].attrs.values()}
        ordered = {
            name: grads[name].to(table[name].dtype).reshape(n, *table[name].shape)
            if name in grads
            else table[name].new_zeros(n, *table[name].shape)
            for name in self.names
            if name not in factored_names
        }
        factors = {}
        for module in factored:
            path = self._path(module)
            parts = factor_parts.get(path)
            if not parts:  # the layer did not reach the output: zero gradients at one position
                weight = cast(torch.Tensor, module.weight)
                width_out, width_in = weight.shape if isinstance(module, nn.Linear) else tuple(reversed(weight.shape))
                zero = weight.new_zeros(n, 1, 1)
                parts = [(zero.expand(n, 1, width_in + (module.bias is not None)), zero.expand(n, 1, width_out))]
            factors[path] = (torch.cat([a for a, _ in parts], 1), torch.cat([d for _, d in parts], 1))
        return ChunkGrads(ordered, factors)

    def _chunk(
        self,
        fn: OutputFn,
        chunk: tuple,
        sink: Callable[[str, torch.Tensor], object],
        factored: Sequence[nn.Module] = (),
        factor_sink: Optional[Callable[[str, Factors], None]] = None,
        raw: Sequence[nn.Module] = (),
        raw_sink: Optional[Callable[[LayerIO], object]] = None,
    ) -> None:
        """Send every selected parameter's per-example gradient for ``chunk`` to ``sink``, the
        factors of ``factored`` modules to ``factor_sink`` and the calls of ``raw`` modules, as
        they are, to ``raw_sink``. Once the forward is known to couple the examples, each example
        goes through the same path alone (a batch of one cannot couple)."""
        self.check(fn, chunk)
        if any(not self.hooks_cover(m) for m in (*factored, *raw)):
            bad = [self._path(m) for m in (*factored, *raw) if not self.hooks_cover(m)]
            raise ValueError(f"factored: modules {bad} are not computed by the hooks alone; they cannot be factored.")
        no_rule = [self._path(m) for m in factored if self._hooked[id(m)].rule.factors is None]
        if no_rule:
            raise ValueError(f"factored: modules {no_rule} have no factor rule (Linear and Conv1D layers have one).")
        n = batch_size_of(chunk)
        with _precision(self.precision):
            if not self.coupled and self._pass(fn, chunk, n, factored, sink, factor_sink, raw, raw_sink, guard=True):
                return
            grads: dict[str, list[torch.Tensor]] = {}
            factors: dict[str, list[Factors]] = {}
            calls: list[list[LayerIO]] = []
            for b in range(n):
                example: dict[str, torch.Tensor] = {}

                def add(name: str, g: torch.Tensor) -> None:
                    example[name] = example[name] + g if name in example else g

                parts: dict[str, list[Factors]] = {}
                calls.append([])
                self._pass(
                    fn,
                    slice_batch(chunk, b, b + 1),
                    1,
                    factored,
                    add,
                    lambda path, f: parts.setdefault(path, []).append(f),
                    raw,
                    calls[-1].append,
                    guard=False,
                )
                for name, g in example.items():
                    grads.setdefault(name, []).append(g)
                for path, pieces in parts.items():
                    factors.setdefault(path, []).append(
                        (torch.cat([a for a, _ in pieces], 1), torch.cat([d for _, d in pieces], 1))
                    )
            for name, gs in grads.items():
                sink(name, torch.cat(gs))
            for path, fs in factors.items():
                assert factor_sink is not None
                if len({a.shape[1] for a, _ in fs}) > 1:
                    raise ValueError(
                        f"model: layer {path!r} runs at a different number of positions for different examples."
                    )
                factor_sink(path, (torch.cat([a for a, _ in fs]), torch.cat([d for _, d in fs])))
            if raw:
                assert raw_sink is not None
                if len({tuple(id(io.module) for io in example) for example in calls}) > 1:
                    raise ValueError("model: the layers run a different number of times for different examples.")
                for ios in zip(*calls):
                    raw_sink(LayerIO(ios[0].module, torch.cat([io.a for io in ios]), torch.cat([io.d for io in ios])))

    def _pass(
        self,
        fn: OutputFn,
        chunk: tuple,
        n: int,
        factored: Sequence[nn.Module],
        sink: Callable[[str, torch.Tensor], object],
        factor_sink: Optional[Callable[[str, Factors], None]],
        raw: Sequence[nn.Module],
        raw_sink: Optional[Callable[[LayerIO], object]],
        guard: bool,
    ) -> bool:
        """One batched forward and backward with hooks, then vmap (or a loop) for the rest. With
        ``guard``, one example's output is first compared with its output alone, rotating over the
        chunks, so a forward that couples the examples only in some batches is still caught:
        nothing is sent then, and False returned."""
        if self.hook_names or self.shared_names:
            dtype = torch.bfloat16 if self.precision == "bf16" else None
            out, records, d_list, shared_grads, _ = self._run_hooks(fn, chunk, n)
            if guard and n > 1 and self._couples(fn, chunk, n, out):
                return False
            for name, g in shared_grads.items():
                sink(name, g)
            for key, value in self._contributions(records, d_list, n, dtype, factored, raw=raw):
                if isinstance(value, LayerIO):
                    assert raw_sink is not None
                    raw_sink(value)
                elif isinstance(value, tuple):
                    assert factor_sink is not None
                    factor_sink(key, value)
                else:
                    sink(key, value)
        if self.vmap_names:
            for _, grads in iter_per_example_grads(
                self.model, fn, chunk, params=self.vmap_names, check_model=False, fallback=self.vmap_fallback
            ):
                for name, g in grads.items():
                    sink(name, g)
        return True

    def _couples(self, fn: OutputFn, chunk: tuple, n: int, out: torch.Tensor) -> bool:
        """Compare one example's output in the batch with its output alone; on a difference, warn
        (or raise with fallback="error") and mark the forward as coupling the examples."""
        self._guarded += 1
        b = (self._guarded * 2654435761) % n  # scattered over the positions from chunk to chunk
        with torch.no_grad():
            alone = fn(self.model, *slice_batch(chunk, b, b + 1)).reshape(())
        scale = max(float(alone.abs()), float(out[b].abs()), torch.finfo(torch.float64).tiny)
        error = float((out[b] - alone).abs()) / scale
        if error <= _tolerance(out.dtype):
            return False
        self._report_coupling(
            f"example {b}'s output in a batch differs from its output alone (relative difference {error:.1e})"
        )
        return True

    def _report_coupling(self, how: str) -> None:
        message = (
            f"model: the forward couples the examples of a batch: {how}. Per-example gradients are those "
            "of each example alone, so each example now goes through the model alone: exact, but slower."
        )
        if self.fallback == "error":
            raise ValueError(message + " Make forward treat each example independently.")
        warnings.warn(message, stacklevel=5)
        self.coupled = True

    # --- public entry points --------------------------------------------------------------

    def _chunks(self, inputs: Any, chunk_size: Optional[int]) -> Iterator[tuple[int, tuple]]:
        _check_chunk_size(chunk_size)
        inputs = _as_tuple(inputs)
        n = batch_size_of(inputs)
        check_eval_norms(self.model)
        step = chunk_size or n
        for start in range(0, n, step):
            yield start, slice_batch(inputs, start, min(start + step, n))

    def grads(self, fn: OutputFn, inputs: Any, *, chunk_size: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``{name: Tensor[B, *param.shape]}``, row b = d fn(...)[b] / d param, in ``names`` order."""
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for _, chunk in self._chunks(inputs, chunk_size):
            for name, g in self.collect(fn, chunk).grads.items():
                parts[name].append(g)
        return {name: torch.cat(gs) if len(gs) > 1 else gs[0] for name, gs in parts.items()}

    def project(
        self,
        fn: OutputFn,
        inputs: Any,
        projector: Union[Projector, FactoredProjector],
        *,
        chunk_size: Optional[int] = None,
        extra_columns: int = 0,
    ) -> torch.Tensor:
        """``projector.project(grads(fn, inputs))`` without the (B, P) matrix: each layer's
        (B, |theta|) gradient is projected as it is produced. Returns (B, projection_dim), float32
        or the projector's wider dtype, followed by ``extra_columns`` zero columns for the caller
        to fill (so that a row and its extras are one array without a copy). A
        ``FactoredProjector`` gets its layers' inputs and output gradients instead, and those
        layers' (B, |theta|) gradients are never formed."""
        self._check_projector(projector)
        factored = projector if isinstance(projector, FactoredProjector) else None
        dtype = projector.dtype if projector.dtype in (torch.float32, torch.float64) else torch.float32
        n, k = batch_size_of(_as_tuple(inputs)), projector.projection_dim
        out = torch.zeros(n, k + extra_columns, dtype=dtype, device=projector.device)
        for start, chunk in self._chunks(inputs, chunk_size):
            rows = out[start : start + batch_size_of(chunk), :k]
            if factored is not None:
                self._chunk(
                    fn,
                    chunk,
                    lambda name, g: factored.project_param(name, g, rows),
                    raw=factored.modules,
                    raw_sink=lambda io: factored.project_call(io.module, io.a, io.d, rows),
                )
            else:
                self._chunk(fn, chunk, lambda name, g: projector.project_param(name, g, rows))
        return out

    def _check_projector(self, projector: Any) -> None:
        """Refuse a projector not built for the selected parameters."""
        table = dict(self.model.named_parameters())
        wanted = {name: table[name].numel() for name in self.names}
        if isinstance(projector, FactoredProjector):
            held = {name for m in projector.modules for name in self.module_params(m)} | set(projector.names)
            if held != set(wanted):
                raise ValueError(
                    f"projector: expected a FactoredProjector for the selected parameters {self.names}; "
                    f"it projects {sorted(held)}."
                )
            return
        if not isinstance(projector, Projector):
            raise TypeError(f"projector: expected a Projector or FactoredProjector; got {type(projector).__name__}.")
        shapes = dict(zip(projector.names or [], projector.sizes))
        if shapes != wanted:
            raise ValueError(
                "projector: expected one built from the selected parameters' shapes, "
                f"Projector(param_shapes(model, {self.names}), k); it has {projector.names or projector.grad_dim}."
            )


# Parameter-free modules that act on each example alone (in eval mode, for Dropout).
_PER_EXAMPLE = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Dropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def exact_by_construction(model: nn.Module) -> bool:
    """True for nested ``nn.Sequential`` of layers with a rule and parameter-free per-example
    modules (exact types, Dropout in eval mode): each parameter is used only in its module's
    forward and no layer mixes the examples, so the hooks' check cannot fail for an output
    function that treats each example alone, and may be skipped."""
    if type(model) is nn.Sequential:
        return all(exact_by_construction(child) for child in model)
    if type(model) in _PER_EXAMPLE:
        return type(model) is not nn.Dropout or not model.training
    return next(model.children(), None) is None and rule_for(model)[0] is not None


def per_example_grads(
    model: nn.Module,
    fn: OutputFn,
    inputs: Any,
    *,
    params: ParamSpec = None,
    chunk_size: Optional[int] = None,
    method: str = "hooks",
    fallback: str = "loop",
) -> dict[str, torch.Tensor]:
    """Per-example gradients of ``fn(model, *inputs) -> Tensor[B]``:
    g_b = d fn(model, *inputs)[b] / d theta for every example b, the same as a loop of
    single-example autograd calls.

    ``method="hooks"`` is the engine (:class:`LayerGrads`: layer hooks, then vmap for layers
    without a rule, then a loop, each fallback with a warning naming the module); ``"vmap"`` is
    ``vmap(grad(.))`` over a functional call, then a loop. A random model (Dropout in training
    mode) or BatchNorm in training mode raises. Each call checks the model once (a few
    single-example passes); for many batches keep one ``LayerGrads(model, params)`` and call its
    ``grads``, as TRAK and TracIn do.

    Args:
        model (nn.Module): the model; its parameters are read, never changed.
        fn (callable): ``fn(model, *inputs) -> Tensor[B]``, one scalar per example, written
            for a batch.
        inputs (tuple): the batch: tensors (or dicts of tensors) with first dimension B,
            passed as ``fn(model, *inputs)``; anything else than a tuple is one argument.
        params (list of str or nn.Module, optional): parameter names, module paths or modules
            to differentiate. Default: every trainable parameter.
        chunk_size (int, optional): examples per batched pass, to bound memory.
            Default: the whole batch.
        method (str, optional): "hooks" or "vmap". Default: "hooks".
        fallback (str, optional): "loop" (one example at a time, with a warning) or "error"
            (raise) where vmap cannot run the model. Default: "loop".

    Returns:
        dict[str, Tensor]: ``{name: Tensor[B, *param.shape]}`` in the order of the selected
        parameters, row b = d fn(model, *inputs)[b] / d param.

    Example::

        >>> fn = lambda m, x, y: -F.cross_entropy(m(x), y, reduction="none")
        >>> grads = per_example_grads(model, fn, (x, y), params=[model.fc], chunk_size=32)
    """
    if method == "hooks":
        engine = LayerGrads(model, params, vmap_fallback=fallback)
        return engine.grads(fn, inputs, chunk_size=chunk_size)
    if method != "vmap":
        raise ValueError(f"method: expected 'hooks' or 'vmap'; got {method!r}.")
    parts: dict[str, list[torch.Tensor]] = {}
    for _, chunk in iter_per_example_grads(model, fn, inputs, params=params, chunk_size=chunk_size, fallback=fallback):
        for name, g in chunk.items():
            parts.setdefault(name, []).append(g)
    return {name: torch.cat(gs) if len(gs) > 1 else gs[0] for name, gs in parts.items()}


def projected_grads(
    model: nn.Module,
    fn: OutputFn,
    inputs: Any,
    projector: Projector,
    *,
    params: ParamSpec = None,
    chunk_size: Optional[int] = None,
    method: str = "hooks",
    fallback: str = "vmap",
    precision: str = "exact",
) -> torch.Tensor:
    """``projector.project(per_example_grads(model, fn, inputs))``: (B, projection_dim).

    ``method="hooks"`` projects each layer's gradient as it is produced (:class:`LayerGrads`);
    ``method="vmap"`` projects the vmap gradients of each chunk. Both give the same numbers.
    Each call checks the model once; for many batches keep one ``LayerGrads`` and call ``project``.
    """
    if method == "hooks":
        return LayerGrads(model, params, fallback=fallback, precision=precision).project(
            fn, inputs, projector, chunk_size=chunk_size
        )
    if method != "vmap":
        raise ValueError(f"method: expected 'hooks' or 'vmap'; got {method!r}.")
    parts = [
        projector.project(grads)
        for _, grads in iter_per_example_grads(model, fn, inputs, params=params, chunk_size=chunk_size)
    ]
    return torch.cat(parts) if len(parts) > 1 else parts[0]
