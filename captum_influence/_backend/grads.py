"""Per-example gradients: ``vmap(grad(fn))`` over a functional call of the model, chunked.

For a batch of B examples and a scalar-per-example function ``fn(model, *inputs) -> Tensor[B]``,
row b of the result for parameter theta is d fn(model, *inputs[b:b+1])[0] / d theta.
"""

from __future__ import annotations

import os
import traceback
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from .model_checks import check_deterministic, check_eval_norms
from .params import ParamSpec, select_param_names

OutputFn = Callable[..., torch.Tensor]


class _Call(nn.Module):
    """``fn(model, *inputs)`` as a module, so that ``functional_call`` can swap the parameters."""

    def __init__(self, model: nn.Module, fn: OutputFn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def batch_size_of(inputs: tuple, *, arg: str = "inputs") -> int:
    """The common leading dimension of every tensor in ``inputs`` (a pytree)."""
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]
    if not leaves:
        raise ValueError(f"{arg}: no tensor found; expected batched tensors (or dicts of them).")
    sizes = {tuple(x.shape[:1]) for x in leaves}
    if any(x.dim() == 0 for x in leaves) or len(sizes) != 1:
        shapes = [tuple(x.shape) for x in leaves]
        raise ValueError(f"{arg}: every tensor must share the batch (first) dimension; got shapes {shapes}.")
    if leaves[0].shape[0] == 0:
        raise ValueError(
            f"{arg}: the batch is empty (shapes {[tuple(x.shape) for x in leaves]}); expected at least one example."
        )
    return leaves[0].shape[0]


def _as_tuple(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size: expected a positive int or None; got {chunk_size!r}.")


def slice_batch(inputs: tuple, start: int, stop: int) -> tuple:
    """Examples ``start:stop`` of a batch: every tensor, also inside dicts, sliced on dim 0."""
    return tree_map(lambda x: x[start:stop] if isinstance(x, torch.Tensor) else x, inputs)


def check_per_example_output(out: Any, n: int) -> torch.Tensor:
    """``out`` if it is one scalar per example, a Tensor of shape (n,); else a ValueError naming ``fn``."""
    if not isinstance(out, torch.Tensor) or out.shape != (n,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fn: must return one scalar per example, shape ({n},); got {got}.")
    return out


def _scalar(out: Any) -> torch.Tensor:
    """The one example's output under vmap, where the model sees a batch of 1."""
    return check_per_example_output(out, 1).reshape(())


def _culprit(call: _Call, inputs: tuple, run: Callable[[], Any]) -> str:
    """Module path that was running when ``run()`` raised, found with forward hooks."""
    stack: list[str] = []
    names = {id(m): n for n, m in call.model.named_modules()}

    def pre(module, args):
        stack.append(names.get(id(module), "?") or "<model>")

    def post(module, args, out):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in call.model.modules()]
    handles += [m.register_forward_hook(post) for m in call.model.modules()]
    try:
        run()
    except Exception:
        return stack[-1] if stack else "fn (outside any module)"
    finally:
        for h in handles:
            h.remove()
    return "unknown"


def failure_site(err: BaseException) -> str:
    """Where ``err`` was raised: the innermost frame outside torch, as "file.py, line N: code"."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(torch_dir)]
    if not frames:
        return "inside torch"
    frame = frames[-1]
    return f"{frame.filename}, line {frame.lineno}: {(frame.line or '').strip()}"


class VmapUnsupportedError(RuntimeError):
    """The model cannot run under ``torch.func.vmap``; the message names the module."""


def iter_per_example_grads(
    model: nn.Module,
    fn: OutputFn,
    inputs: Any,
    *,
    params: ParamSpec = None,
    chunk_size: Optional[int] = None,
    fallback: str = "loop",
    check_model: bool = True,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(start, grads)`` for consecutive chunks of the batch; see :func:`per_example_grads`.
    ``check_model``: refuse a random model (checked on the first examples) before starting."""
    if fallback not in ("loop", "error"):
        raise ValueError(f"fallback: expected 'loop' or 'error'; got {fallback!r}.")
    _check_chunk_size(chunk_size)
    inputs = _as_tuple(inputs)
    n = batch_size_of(inputs)
    names = select_param_names(model, params)
    check_eval_norms(model)
    if check_model:
        check_deterministic(model, fn, slice_batch(inputs, 0, min(n, 2)))
    call = _Call(model, fn)
    selected = {name: p.detach() for name, p in model.named_parameters() if name in set(names)}
    frozen = {f"model.{name}": p.detach() for name, p in model.named_parameters() if name not in selected}
    frozen.update({f"model.{name}": b for name, b in model.named_buffers()})

    def one(sel, example):
        batched = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, example)
        state = {**frozen, **{f"model.{k}": v for k, v in sel.items()}}
        return _scalar(functional_call(call, state, batched))

    in_dims = tree_map(lambda x: 0 if isinstance(x, torch.Tensor) else None, inputs)
    batched_grad = vmap(grad(one), in_dims=(None, in_dims))
    step = chunk_size or n
    use_loop = False
    for start in range(0, n, step):
        chunk = slice_batch(inputs, start, min(start + step, n))
        if not use_loop:
            try:
                yield start, batched_grad(selected, chunk)
                continue
            except ValueError:
                raise
            except Exception as err:  # vmap cannot run this model
                where = _culprit(call, inputs, lambda: batched_grad(selected, slice_batch(inputs, 0, 1)))
                message = (
                    f"torch.func.vmap cannot run module {where!r} of the model at {failure_site(err)} "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                )
                if fallback == "error":
                    raise VmapUnsupportedError(message) from err
                warnings.warn(message + "; falling back to a loop of single-example gradients.")
                use_loop = True
        yield start, _loop_grads(model, fn, chunk, names)


def single_example_grads(
    model: nn.Module, fn: OutputFn, examples: list[tuple], names: list[str]
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The reference: for each batch of one example, ``(fn's output, {name: gradient})`` from its
    own forward and ``torch.autograd.grad`` (zeros for a parameter it does not reach)."""
    table = dict(model.named_parameters())
    wrt = [table[name] for name in names]
    frozen = [p for p in wrt if not p.requires_grad]
    results = []
    try:
        for p in frozen:  # selected by name: differentiated even when frozen
            p.requires_grad_(True)
        for example in examples:
            with torch.enable_grad():
                out = _scalar(fn(model, *example))
                grads = torch.autograd.grad(out, wrt, allow_unused=True) if out.requires_grad else [None] * len(wrt)
            results.append(
                (
                    out.detach(),
                    {name: g if g is not None else torch.zeros_like(p) for name, p, g in zip(names, wrt, grads)},
                )
            )
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return results


def _loop_grads(model: nn.Module, fn: OutputFn, inputs: tuple, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-example gradients by one ``torch.autograd.grad`` call per example."""
    rows = single_example_grads(model, fn, [slice_batch(inputs, b, b + 1) for b in range(batch_size_of(inputs))], names)
    return {name: torch.stack([grads[name] for _, grads in rows]) for name in names}
