"""Each hooked layer's input and the gradient of fn with respect to its output, from one forward
with hooks and one backward.

For examples that do not interact, row b of d(sum_b fn_b) / dy is d fn_b / dy, so one backward of
sum_b fn_b gives every example's output gradient at every call of every hooked layer. A layer
called several times (or at several positions) gives one record per call, in call order.

A layer called on an input shared by the batch (first dimension 1, such as the position ids that
BERT and GPT-2 broadcast over the examples) has one output row for all examples, whose gradient is
their sum. The recorder hands the model that output expanded to the batch instead, the same
values as the broadcast, so that each example's row gets its own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .grads import check_per_example_output


@dataclass
class LayerCall:
    """One call of a hooked module: its input (detached, with its version) and its output's edge.
    ``broadcast``: the input was shared by the batch and has been expanded to it."""

    module: nn.Module
    value: torch.Tensor
    version: int
    edge: Any
    broadcast: bool = False


def module_path(model: nn.Module, module: nn.Module) -> str:
    """``module``'s name inside ``model``, or its type name when it is not a submodule."""
    return next((path for path, m in model.named_modules() if m is module), type(module).__name__)


def layer_input(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The tensor a layer was called on: its first positional argument, else its ``input`` keyword
    (``fc(input=x)``), else its only tensor keyword."""
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    if isinstance(kwargs.get("input"), torch.Tensor):
        return kwargs["input"]
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


def record_calls(
    model: nn.Module, fn: Callable[..., torch.Tensor], inputs: tuple, n: int, modules: Iterable[nn.Module]
) -> tuple[torch.Tensor, list[LayerCall]]:
    """``out = fn(model, *inputs)`` (grad enabled, checked to have shape (n,)) and a
    :class:`LayerCall` for every call of ``modules`` during it."""
    calls: list[LayerCall] = []

    def record(module, args, kwargs, output):
        value = layer_input(args, kwargs)
        if value is None or not isinstance(output, torch.Tensor):
            raise ValueError(
                f"model: module {module_path(model, module)!r} was called without a tensor input and output."
            )
        version = value._version
        broadcast = n > 1 and value.dim() > 0 and value.shape[0] == 1 and output.dim() > 0 and output.shape[0] == 1
        if broadcast:  # one row shared by the batch: a row per example, with the same values
            value = value.expand(n, *value.shape[1:])
            output = output.expand(n, *output.shape[1:]).contiguous()
        promoted = not output.requires_grad
        if promoted:  # nothing before it needs grad: make it a leaf that does
            output.requires_grad_(True)
        # The edge is the output's slot in the graph as the layer left it, so an in-place op
        # after the layer (ReLU(inplace=True)) cannot turn it into the op's own result.
        calls.append(LayerCall(module, value.detach(), version, get_gradient_edge(output), broadcast))
        # A leaf that requires grad may not be modified in place: the model continues with a copy.
        if promoted:
            return output.clone()
        return output if broadcast else None

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in dict.fromkeys(modules)]
    try:
        with torch.enable_grad():
            out = fn(model, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    return check_per_example_output(out, n), calls


def output_grads(
    out: torch.Tensor, calls: list[LayerCall], *, retain_graph: bool = False
) -> list[Optional[torch.Tensor]]:
    """d(sum_b out_b) / dy for each call's output y; None where the call does not reach ``out``."""
    if not calls or not out.requires_grad:
        return [None] * len(calls)
    edges = [call.edge for call in calls]
    return list(torch.autograd.grad(out, edges, torch.ones_like(out), retain_graph=retain_graph, allow_unused=True))
