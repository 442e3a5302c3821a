"""What a model must satisfy before per-example gradients mean anything, and keeping its modes.

Per-example gradients are those of each example's own output. A module whose output depends on
the other examples of the batch (BatchNorm in training mode) or on chance (Dropout in training
mode, any module whose output changes between two identical calls) makes them ill-defined: both
raise here with the module's name, on every path (hooks, vmap, loop).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map


def check_eval_norms(model: nn.Module) -> None:
    """BatchNorm in training mode normalises with the batch's statistics: refuse it."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"model: module {name!r} ({type(module).__name__}) is in training mode, which couples "
                "the examples of a batch; call model.eval() before taking per-example gradients."
            )


def _random_module_error(name: str, module: nn.Module, how: str) -> ValueError:
    mode = " in training mode" if module.training else ""
    return ValueError(
        f"model: module {name!r} ({type(module).__name__}){mode} {how}, so per-example gradients "
        "would change from call to call; call model.eval() before taking per-example gradients."
    )


def _same(a: Any, b: Any) -> bool:
    """Equal pytrees of tensors, NaN equal to NaN."""
    left, right = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not bool(((x == y) | (x.isnan() & y.isnan())).all()):
                return False
        elif not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x != y:
            return False
    return True


def check_deterministic(model: nn.Module, fn: Callable[..., Any], inputs: tuple) -> None:
    """Raise naming the module when ``fn(model, *inputs)`` is random: a Dropout with p > 0 in
    training mode, or any module whose output differs between two identical calls (the first
    such module in call order). The global random state is left as it was."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise _random_module_error(name, module, f"drops activations at random (p={module.p})")
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})

    def fresh() -> tuple:  # a model may change its inputs in place: each call gets its own copy
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)

    with torch.random.fork_rng(devices=devices), torch.no_grad():
        first, second = fn(model, *fresh()), fn(model, *fresh())
        if _same(first, second):
            return
        names = {id(m): n for n, m in model.named_modules()}
        runs: list[list[tuple[nn.Module, Any]]] = [[], []]
        for run in runs:

            def keep(module, args, output, run=run):
                run.append((module, tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, output)))

            handles = [m.register_forward_hook(keep) for m in model.modules()]
            try:
                fn(model, *fresh())
            finally:
                for handle in handles:
                    handle.remove()
    # Forward hooks fire when a call ends, so the first differing output is the innermost culprit.
    for (module, a), (_, b) in zip(*runs):
        if not _same(a, b):
            raise _random_module_error(
                names.get(id(module), "?") or "<model>", module, "gives different outputs for two identical calls"
            )
    raise ValueError(
        "fn: gives different outputs for two identical calls (randomness outside the model's modules); "
        "per-example gradients need a deterministic fn and model.eval()."
    )


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's ``training`` flag on exit, whatever happened inside."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
