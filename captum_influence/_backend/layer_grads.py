"""Per-example gradients from layer hooks, combined with batched matrix products.

A layer y_t = W a_t + c applied at positions t (tokens, pixels) gives example b's output f_b the
gradient  dW_b = sum_t d_{b,t} a_{b,t}^T  and  dc_b = sum_t d_{b,t},  where a is the layer's input
and d_{b,t} = d f_b / d y_{b,t}. One batched forward records every a, one backward of sum_b f_b
returns every d (for examples that do not interact, row b of d(sum f)/dy is d f_b/dy), and a
batched matrix product per layer gives all B gradients: about the arithmetic of one ordinary
backward pass. Norm layers use their normalised input x_hat in place of a, embeddings scatter d
into the rows that were looked up. Each parameter's (B, |theta|) block can go straight into a
:class:`Projector` (``project_param``), so the (B, P) matrix of the whole model never exists.

Layers without an exact rule here (attention's fused projections, custom modules) go to the
``vmap`` path with a warning naming the module, or raise with ``fallback="error"``; nothing is
dropped. The first chunk is checked against autograd (a random combination of the examples'
gradients), which also catches a parameter used outside its module's forward.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .grads import OutputFn, _as_tuple, _check_chunk_size, _check_eval_norms, _slice, batch_size_of, iter_per_example_grads
from .layer_calls import module_path, output_grads, record_calls
from .params import ParamSpec, select_param_names
from .projector import Projector

PRECISIONS = ("exact", "tf32", "bf16")
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, Optional[torch.dtype], set], dict]


def _cast(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return x if dtype is None else x.to(dtype)


def _linear(module: nn.Linear, a: torch.Tensor, d: torch.Tensor, dtype, wanted: set) -> dict:
    """dW_b = sum_t d_{b,t} a_{b,t}^T as one (B, out, T) x (B, T, in) product; dc_b = sum_t d_{b,t}."""
    batch = a.shape[0]
    a3, d3 = a.reshape(batch, -1, a.shape[-1]), d.reshape(batch, -1, d.shape[-1])
    out = {}
    if "weight" in wanted:
        out["weight"] = torch.bmm(_cast(d3, dtype).transpose(1, 2), _cast(a3, dtype))
    if "bias" in wanted:
        out["bias"] = d3.sum(1)
    return out


def _conv_input(module: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The input as the convolution sees it and the zero padding still to apply: string padding
    ("same") may be uneven and other modes are not zeros, so those are padded here as forward does."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return a, module.padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(a, module._reversed_padding_repeated_twice, mode=mode), 0


def _conv_weight(module: nn.Module, x: torch.Tensor, padding, d: torch.Tensor) -> torch.Tensor:
    """Every example's weight gradient from one weight-gradient convolution with B x G groups:
    the batch folded into the channels, so example b's input only meets its own d_b. The same
    products as unfolding patches and multiplying, without the k-times larger patch tensor."""
    batch, groups = x.shape[0], module.groups
    weight_size = (batch * module.out_channels, *module.weight.shape[1:])
    grad_weight = torch.nn.grad.conv2d_weight if isinstance(module, nn.Conv2d) else torch.nn.grad.conv1d_weight
    grads = grad_weight(
        x.reshape(1, -1, *x.shape[2:]), weight_size, d.reshape(1, -1, *d.shape[2:]),
        stride=module.stride, padding=padding, dilation=module.dilation, groups=batch * groups,
    )
    return grads.reshape(batch, *module.weight.shape)


def _conv(module: nn.Module, a: torch.Tensor, d: torch.Tensor, dtype, wanted: set) -> dict:
    """Conv1d/Conv2d: dW_b = sum over output positions l of d_{b,l} (x)  patch_{b,l} (per group);
    the bias gradient sums d over the positions."""
    out = {}
    if "weight" in wanted:
        x, padding = _conv_input(module, _cast(a, dtype))
        out["weight"] = _conv_weight(module, x, padding, _cast(d, dtype))
    if "bias" in wanted:
        out["bias"] = d.reshape(d.shape[0], d.shape[1], -1).sum(2)
    return out


def _affine_norm(x_hat: torch.Tensor, d: torch.Tensor, channel_dims: int, wanted: set) -> dict:
    """Per-example gradients of y = x_hat * weight + bias, weight spanning ``channel_dims`` dims."""
    batch = d.shape[0]

    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum(tuple(range(1, t.dim() - channel_dims))) if t.dim() > channel_dims + 1 else t

    out = {}
    if "weight" in wanted:
        out["weight"] = total(d * x_hat).reshape(batch, *d.shape[d.dim() - channel_dims :])
    if "bias" in wanted:
        out["bias"] = total(d).reshape(batch, *d.shape[d.dim() - channel_dims :])
    return out


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, d: torch.Tensor, dtype, wanted: set) -> dict:
    """Eval mode: x_hat = (x - running_mean) / sqrt(running_var + eps), channels on dim 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
    # Move channels last so that the weight spans the last dimension.
    return _affine_norm(x_hat.movedim(1, -1), d.movedim(1, -1), 1, wanted)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor, d: torch.Tensor, dtype, wanted: set) -> dict:
    """x_hat = (x - mean) / sqrt(var + eps) over the last len(normalized_shape) dimensions."""
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, keepdim=True, unbiased=False)
    return _affine_norm((x - mean) * torch.rsqrt(var + module.eps), d, len(dims), wanted)


def _group_norm(module: nn.GroupNorm, x: torch.Tensor, d: torch.Tensor, dtype, wanted: set) -> dict:
    """x_hat normalised within each example's channel groups; weight and bias per channel."""
    groups = x.reshape(x.shape[0], module.num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, keepdim=True, unbiased=False)
    x_hat = ((groups - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)
    return _affine_norm(x_hat.movedim(1, -1), d.movedim(1, -1), 1, wanted)


def _embedding(module: nn.Embedding, ids: torch.Tensor, d: torch.Tensor, dtype, wanted: set) -> dict:
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


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RULES: dict[type, Rule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
    **{cls: _batch_norm for cls in _NORMS},
}


def _unsupported(module: nn.Module) -> Optional[str]:
    """Why the hook path cannot take this module's parameters exactly, or None when it can.

    Types match exactly: a subclass may compute something else in its own forward."""
    if type(module) not in _RULES:
        return f"no exact per-example rule for {type(module).__name__}"
    if isinstance(module, _NORMS) and module.running_mean is None:  # training mode raises, as for vmap
        return "BatchNorm without running statistics normalises with the batch's"
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return "scale_grad_by_freq scales by counts over the whole batch"
    return None


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
    """No TF32 anywhere (matmuls and cuDNN convolutions), for the autograd check."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(before)


class LayerGrads:
    """Per-example gradients of ``fn(model, *inputs) -> Tensor[B]`` from forward/backward hooks.

    Linear, Conv1d, Conv2d, BatchNorm (eval), LayerNorm, GroupNorm and Embedding parameters are
    computed from each layer's input and output gradient with batched matrix products; the same
    numbers as :func:`per_example_grads` (vmap) up to float rounding. Parameters of other modules
    go through the vmap path (``fallback="vmap"``, with a warning naming the module) or raise
    (``fallback="error"``). ``precision``: "exact" (the operands' dtype), "tf32" (TF32 matrix
    products on GPU) or "bf16" (bfloat16 operands, float32 accumulation) for the per-layer
    products. ``check``: compare the first chunk with autograd once; a parameter whose gradient
    the hooks cannot reproduce (used outside its module, examples that interact) is reported.

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
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module; got {type(model).__name__}.")
        if fallback not in ("vmap", "error"):
            raise ValueError(f"fallback: expected 'vmap' or 'error'; got {fallback!r}.")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}; got {precision!r}.")
        self.model = model
        self.names = select_param_names(model, params)
        self.fallback = fallback
        self.precision = precision
        self._checked = not check
        table = dict(model.named_parameters())
        name_of = {id(table[name]): name for name in self.names}
        owners: dict[str, list[tuple[str, nn.Module, str]]] = {name: [] for name in self.names}
        for path, module in model.named_modules(remove_duplicate=False):
            for attr, p in module.named_parameters(recurse=False):
                if id(p) in name_of and all(m is not module for _, m, _ in owners[name_of[id(p)]]):
                    owners[name_of[id(p)]].append((path, module, attr))
        # A parameter goes to the hooks only when every module holding it has an exact rule.
        self._attrs: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        self.vmap_names: list[str] = []
        reasons: dict[str, str] = {}
        for name, held_by in owners.items():
            why = {path: _unsupported(module) for path, module, _ in held_by}
            why = {path: reason for path, reason in why.items() if reason}
            if why or not held_by:
                self.vmap_names.append(name)
                reasons.update(why or {name: "a parameter held by no module"})
                continue
            for _, module, attr in held_by:
                self._attrs.setdefault(id(module), (module, {}))[1][attr] = name
        if reasons:
            self._fall_back(reasons)

    def _fall_back(self, reasons: dict[str, str]) -> None:
        listed = "; ".join(f"module {path!r}: {reason}" for path, reason in reasons.items())
        if self.fallback == "error":
            raise ValueError(
                f"model: the hook path cannot compute these per-example gradients exactly ({listed}); "
                "use fallback='vmap' or leave these parameters out of params."
            )
        warnings.warn(f"per-example gradients by vmap for {listed}.", stacklevel=3)

    @property
    def hook_names(self) -> list[str]:
        """Names computed from hooks (the rest, ``vmap_names``, by vmap)."""
        return [name for name in self.names if name not in self.vmap_names]

    # --- one chunk ------------------------------------------------------------------------

    def _run_hooks(self, fn: OutputFn, chunk: tuple, n: int, check_weights: Optional[torch.Tensor] = None):
        """Forward with recording hooks and a backward of sum_b f_b; returns the records and their
        output gradients, and with ``check_weights`` v also autograd's gradients of sum_b v_b f_b
        with respect to the hooked parameters (else None)."""
        hooked = [module for module, _ in self._attrs.values()]
        table = dict(self.model.named_parameters())
        params = [table[name] for name in self.hook_names]
        frozen = [p for p in params if not p.requires_grad]
        try:
            for p in frozen:  # hooked outputs join the graph (no copies) and the check can use them
                p.requires_grad_(True)
            out, records = record_calls(self.model, fn, chunk, n, hooked)
            for rec in records:
                if rec.value._version != rec.version:
                    raise ValueError(
                        f"model: the input of module {self._path(rec.module)!r} was modified in place after "
                        "the module ran; the hook path needs it unchanged (avoid the in-place op or use vmap)."
                    )
            d_list = output_grads(out, records, retain_graph=check_weights is not None)
            ref = None
            if check_weights is not None:
                ref = [None] * len(params)
                if out.requires_grad:
                    ref = list(torch.autograd.grad(out, params, check_weights.to(out), allow_unused=True))
        finally:
            for p in frozen:
                p.requires_grad_(False)
        return records, d_list, ref

    def _path(self, module: nn.Module) -> str:
        return module_path(self.model, module)

    def _contributions(self, records, d_list, n: int, dtype, unbatched: Optional[dict] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, Tensor[B, *shape])`` for each hooked call; a name repeats for a reused layer.
        A layer whose first dimension is not the example raises, or with ``unbatched`` is noted
        there (module path: reason) and skipped."""
        for rec, d in zip(records, d_list):
            if d is None:  # the call did not reach the output
                continue
            if rec.value.shape[0] != n or d.shape[0] != n:
                path = self._path(rec.module)
                reason = (
                    f"got an input of shape {tuple(rec.value.shape)} whose first dimension is not "
                    f"the batch of {n} examples"
                )
                if unbatched is None:
                    raise ValueError(f"model: module {path!r} {reason}; the hook path needs batch-first layers.")
                unbatched[path] = reason
                continue
            _, attrs = self._attrs[id(rec.module)]
            grads = _RULES[type(rec.module)](rec.module, rec.value, d, dtype, set(attrs))
            for attr, g in grads.items():
                yield attrs[attr], g

    def _chunk(self, fn: OutputFn, chunk: tuple, sink: Callable[[str, torch.Tensor], None]) -> None:
        """Send every selected parameter's per-example gradient for ``chunk`` to ``sink``."""
        n = batch_size_of(chunk)
        with _precision(self.precision):
            if not self._checked:
                self._check(fn, chunk, n, sink)
            elif self.hook_names:
                dtype = torch.bfloat16 if self.precision == "bf16" else None
                records, d_list, _ = self._run_hooks(fn, chunk, n)
                for name, g in self._contributions(records, d_list, n, dtype):
                    sink(name, g)
            if self.vmap_names:
                for _, grads in iter_per_example_grads(self.model, fn, chunk, params=self.vmap_names):
                    for name, g in grads.items():
                        sink(name, g)

    def _check(self, fn: OutputFn, chunk: tuple, n: int, sink) -> None:
        """Once: the hooks' sum_b v_b g_b against autograd's gradient of sum_b v_b f_b for random
        v. Equal sums for a random v mean the hooks give each example's own gradient; a layer
        used outside its module, a layer whose first dimension is not the example, or examples
        that interact would break the equality."""
        self._checked = True
        if not self.hook_names:
            return
        table = dict(self.model.named_parameters())
        generator = torch.Generator().manual_seed(0)
        v = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5
        with _full_precision():
            records, d_list, ref = self._run_hooks(fn, chunk, n, v)
            unbatched: dict[str, str] = {}
            pieces = list(self._contributions(records, d_list, n, None, unbatched))
        totals: dict[str, torch.Tensor] = {}
        for name, g in pieces:
            weighted = (g * v.to(g).reshape(-1, *([1] * (g.dim() - 1)))).sum(0)
            totals[name] = totals[name] + weighted if name in totals else weighted
        ref_of = {name: r if r is not None else torch.zeros_like(table[name]) for name, r in zip(self.hook_names, ref)}
        got_of = {name: totals.get(name, torch.zeros_like(table[name])) for name in self.hook_names}
        # Rounding grows with a layer's gradient: compare each parameter at its module's scale,
        # floored at a small fraction of the largest (a bias whose exact gradient is 0, say).
        scales = {
            module_id: sum(max(float(ref_of[nm].norm()), float(got_of[nm].norm())) ** 2 for nm in attrs.values()) ** 0.5
            for module_id, (_, attrs) in self._attrs.items()
        }
        floor = 1e-4 * max(scales.values(), default=0.0)
        reasons: dict[str, str] = {}
        bad: set[str] = set()
        for module_id, (module, attrs) in self._attrs.items():
            path = self._path(module)
            if path in unbatched:
                reasons[path] = unbatched[path]
                bad.update(attrs.values())
                continue
            for name in attrs.values():
                r, got = ref_of[name], got_of[name]
                tol = 1e-8 if r.dtype == torch.float64 else 1e-3
                scale = max(scales[module_id], floor)
                error = float((got - r).norm())
                if error > tol * scale + torch.finfo(r.dtype).tiny:
                    bad.add(name)
                    reasons[path] = (
                        f"the hooks do not reproduce autograd for {name!r} (error {error / scale:.1e} of the "
                        "layer's gradient): used outside the module's forward, or examples interact"
                    )
        if bad:
            self.vmap_names = [name for name in self.names if name in bad or name in self.vmap_names]
            for module_id in list(self._attrs):
                module, attrs = self._attrs[module_id]
                kept = {attr: name for attr, name in attrs.items() if name not in bad}
                if kept:
                    self._attrs[module_id] = (module, kept)
                else:
                    del self._attrs[module_id]
            self._fall_back(reasons)
        for name, g in pieces:
            if name not in bad:
                sink(name, g)

    # --- public entry points --------------------------------------------------------------

    def _chunks(self, inputs: Any, chunk_size: Optional[int]) -> Iterator[tuple[int, tuple]]:
        _check_chunk_size(chunk_size)
        inputs = _as_tuple(inputs)
        n = batch_size_of(inputs)
        _check_eval_norms(self.model)
        step = chunk_size or n
        for start in range(0, n, step):
            yield start, _slice(inputs, start, min(start + step, n))

    def grads(self, fn: OutputFn, inputs: Any, *, chunk_size: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``{name: Tensor[B, *param.shape]}``, row b = d fn(...)[b] / d param, in ``names`` order."""
        table = dict(self.model.named_parameters())
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for _, chunk in self._chunks(inputs, chunk_size):
            n = batch_size_of(chunk)
            acc: dict[str, torch.Tensor] = {}

            def sink(name: str, g: torch.Tensor) -> None:
                g = g.to(table[name].dtype)
                acc[name] = acc[name] + g if name in acc else g

            self._chunk(fn, chunk, sink)
            for name in self.names:
                p = table[name]
                parts[name].append(acc[name].reshape(n, *p.shape) if name in acc else p.new_zeros(n, *p.shape))
        return {name: torch.cat(gs) if len(gs) > 1 else gs[0] for name, gs in parts.items()}

    def project(
        self, fn: OutputFn, inputs: Any, projector: Projector, *, chunk_size: Optional[int] = None
    ) -> torch.Tensor:
        """``projector.project(grads(fn, inputs))`` without the (B, P) matrix: each layer's
        (B, |theta|) gradient is projected as it is produced. Returns (B, projection_dim), float32
        or the projector's wider dtype."""
        self._check_projector(projector)
        dtype = projector.dtype if projector.dtype in (torch.float32, torch.float64) else torch.float32
        n = batch_size_of(_as_tuple(inputs))
        out = torch.zeros(n, projector.projection_dim, dtype=dtype, device=projector.device)
        for start, chunk in self._chunks(inputs, chunk_size):
            rows = out[start : start + batch_size_of(chunk)]
            self._chunk(fn, chunk, lambda name, g: projector.project_param(name, g, rows))
        return out

    def _check_projector(self, projector: Projector) -> None:
        if not isinstance(projector, Projector):
            raise TypeError(f"projector: expected a Projector; got {type(projector).__name__}.")
        shapes = dict(zip(projector.names or [], projector.sizes))
        table = dict(self.model.named_parameters())
        wanted = {name: table[name].numel() for name in self.names}
        if shapes != wanted:
            raise ValueError(
                "projector: expected one built from the selected parameters' shapes, "
                f"Projector(param_shapes(model, {self.names}), k); it has {projector.names or projector.grad_dim}."
            )


def layer_per_example_grads(
    model: nn.Module,
    fn: OutputFn,
    inputs: Any,
    *,
    params: ParamSpec = None,
    chunk_size: Optional[int] = None,
    fallback: str = "vmap",
    precision: str = "exact",
) -> dict[str, torch.Tensor]:
    """:func:`per_example_grads` computed from layer hooks; see :class:`LayerGrads`.

    Example::

        >>> grads = layer_per_example_grads(model, fn, (x, y), chunk_size=128)
    """
    return LayerGrads(model, params, fallback=fallback, precision=precision).grads(fn, inputs, chunk_size=chunk_size)


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
