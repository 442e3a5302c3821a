"""Per-example input gradients in one autograd call per chunk.

For a function whose examples do not interact (an eval-mode model), d fn(x)[b] / d x[b] equals
the gradient of sum_b fn(x)[b] with respect to x, row b; one ``torch.autograd.grad`` call gives
every row, with ``create_graph=True`` when the gradient itself is to be differentiated.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .grads import _check_chunk_size, batch_size_of, check_per_example_output


def input_grads(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    *,
    chunk_size: Optional[int] = None,
    create_graph: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Gradients of ``fn(*inputs) -> Tensor[B]`` with respect to each input tensor, row by row.

    Returns a tuple shaped like ``inputs``; row b is d fn(*inputs)[b] / d inputs[i][b].
    ``chunk_size`` bounds the examples per call; ``create_graph`` keeps the result differentiable."""
    _check_chunk_size(chunk_size)
    inputs = tuple(inputs)
    n = batch_size_of(inputs)
    step = chunk_size or n
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, n, step):
        with torch.enable_grad():
            # A new leaf per chunk, unless the caller differentiates through inputs that need grad.
            chunk = tuple(
                x[start : start + step]
                if create_graph and x.requires_grad
                else x[start : start + step].detach().requires_grad_(True)
                for x in inputs
            )
            out = check_per_example_output(fn(*chunk), chunk[0].shape[0])
            grads = torch.autograd.grad(out.sum(), chunk, create_graph=create_graph, allow_unused=True)
        parts.append(tuple(g if g is not None else torch.zeros_like(x) for g, x in zip(grads, chunk)))
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(column) for column in zip(*parts))
