"""Captum's feature-attribution arguments, checked and put in one form.

``inputs`` a tensor or a tuple of tensors with a common batch dimension B; ``baselines`` one per
input (None for zeros, a scalar, a tensor shaped like the input or like one example of it);
``additional_forward_args`` passed after the inputs, tensors with a batch dimension following
their example; ``target`` in any of Captum's forms, turned into one index row per example so that
the attributed output is ``output[b, *index[b]]``.
"""

from __future__ import annotations

from numbers import Real
from typing import Any, Optional

import torch


def format_inputs(inputs: Any, *, floating: bool = True, arg: str = "inputs") -> tuple[tuple[torch.Tensor, ...], bool]:
    """``(inputs as a tuple, whether they came as a tuple)``; every tensor shares the batch size B >= 1."""
    is_tuple = isinstance(inputs, tuple)
    tensors = inputs if is_tuple else (inputs,)
    if not tensors or not all(isinstance(x, torch.Tensor) for x in tensors):
        given = f"tuple of ({', '.join(type(x).__name__ for x in tensors)})" if is_tuple else type(inputs).__name__
        raise TypeError(f"{arg}: expected a Tensor or a non-empty tuple of Tensors; got {given}.")
    if floating and not all(x.is_floating_point() for x in tensors):
        dtypes = [str(x.dtype) for x in tensors]
        raise TypeError(f"{arg}: gradients need floating-point tensors; got dtypes {dtypes}.")
    sizes = [tuple(x.shape) for x in tensors]
    if any(x.dim() == 0 for x in tensors) or len({s[0] for s in sizes}) != 1 or sizes[0][0] == 0:
        raise ValueError(f"{arg}: every tensor needs the same non-empty batch (first) dimension; got shapes {sizes}.")
    return tuple(x.detach() for x in tensors), is_tuple


def format_baselines(
    baselines: Any, inputs: tuple[torch.Tensor, ...], *, arg: str = "baselines"
) -> tuple[torch.Tensor, ...]:
    """One baseline per input, broadcast (as a view) to the input's shape: zeros when ``baselines`` is None."""
    if baselines is None:
        return tuple(torch.zeros_like(x) for x in inputs)
    given = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(given) != len(inputs):
        raise ValueError(f"{arg}: expected {len(inputs)} baseline(s), one per input tensor; got {len(given)}.")
    out = []
    for i, (b, x) in enumerate(zip(given, inputs)):
        if isinstance(b, Real) and not isinstance(b, bool):
            # The stubs' numbers.Real promises no __int__; every real number has one (numpy's too).
            fill = float(b) if x.is_floating_point() else int(b)  # type: ignore[call-overload]
            out.append(torch.full_like(x, fill))
            continue
        if not isinstance(b, torch.Tensor):
            raise TypeError(f"{arg}[{i}]: expected a real number or a Tensor; got {type(b).__name__}.")
        if tuple(b.shape) not in (tuple(x.shape), (1, *x.shape[1:])):
            raise ValueError(
                f"{arg}[{i}]: expected shape {tuple(x.shape)} or {(1, *x.shape[1:])} to match inputs[{i}]; "
                f"got {tuple(b.shape)}."
            )
        out.append(b.detach().to(x.dtype).expand_as(x))
    return tuple(out)


def format_args(additional_forward_args: Any, n: int, *, arg: str = "additional_forward_args") -> tuple:
    """The extra forward arguments as a tuple; a tensor with dimensions must have one row per example."""
    if additional_forward_args is None:
        return ()
    args = additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] != n:
            raise ValueError(
                f"{arg}[{i}]: a tensor argument is split by example like the inputs, so its first dimension "
                f"must be the batch size {n}; got shape {tuple(a.shape)}."
            )
    return args


def take(args: tuple, rows: torch.Tensor) -> tuple:
    """The rows ``rows`` of every batched tensor in ``args``; other arguments unchanged."""
    return tuple(a[rows] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


def target_index(target: Any, n: int, *, arg: str = "target") -> Optional[torch.Tensor]:
    """Captum's ``target`` as a LongTensor ``(n, k)``: row b indexes output dimensions 1..k of example b.

    An int, a one-element tensor or a tuple of ints applies to every example; a list of ints, a 1-D
    tensor of length n or a list of tuples gives one per example. None stays None (the output must
    already be one scalar per example)."""
    if target is None:
        return None
    if isinstance(target, bool):
        raise TypeError(f"{arg}: expected an int, a tuple of ints, a list or a LongTensor; got a bool.")
    if isinstance(target, int):
        rows = [[target]] * n
    elif isinstance(target, tuple):
        if not target or not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise TypeError(f"{arg}: a tuple target must hold ints, one per output dimension; got {target!r}.")
        rows = [list(target)] * n
    elif isinstance(target, torch.Tensor):
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"{arg}: a tensor target must hold integer class indices; got dtype {target.dtype}.")
        if target.numel() == 1:
            rows = [[int(target.item())]] * n
        elif target.dim() == 1 and target.numel() == n:
            return target.detach().to(torch.long).reshape(n, 1)
        else:
            raise ValueError(
                f"{arg}: a tensor target must have one element or shape ({n},), one per example; "
                f"got shape {tuple(target.shape)}."
            )
    elif isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"{arg}: a list target needs one entry per example ({n}); got {len(target)}.")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            rows = [[t] for t in target]
        elif all(isinstance(t, tuple) for t in target) and len({len(t) for t in target}) == 1:
            rows = [list(t) for t in target]
        else:
            raise TypeError(f"{arg}: a list target must hold ints or equal-length tuples of ints; got {target!r}.")
    else:
        raise TypeError(
            f"{arg}: expected None, an int, a tuple of ints, a list or a LongTensor; got {type(target).__name__}."
        )
    return torch.tensor(rows, dtype=torch.long)


def select_targets(output: Any, index: Optional[torch.Tensor], *, arg: str = "target") -> torch.Tensor:
    """``output[b, *index[b]]`` for each example b, as a Tensor[B]; with no index the output must already be one
    scalar per example."""
    if not isinstance(output, torch.Tensor) or output.dim() == 0:
        got = type(output).__name__ if not isinstance(output, torch.Tensor) else "a 0-dim tensor"
        raise ValueError(f"forward_func: must return a Tensor whose first dimension is the batch; got {got}.")
    n = output.shape[0]
    if index is None:
        if output[0].numel() != 1:
            raise ValueError(
                f"{arg}: forward_func returns shape {tuple(output.shape)}, not one scalar per example; "
                "pass a target (e.g. the class index) to choose which output to attribute."
            )
        return output.reshape(n)
    index = index.to(output.device)
    k = index.shape[1]
    sizes = output.shape[1 : 1 + k]
    if len(sizes) < k:
        raise ValueError(
            f"{arg}: indexes {k} output dimension(s) but forward_func returns shape {tuple(output.shape)}."
        )
    bound = torch.tensor(sizes, device=output.device)
    bad = ((index < -bound) | (index >= bound)).any(dim=1)
    if bad.any():
        b = int(bad.nonzero()[0])
        raise ValueError(
            f"{arg}: index {tuple(index[b].tolist())} for example {b} is out of range for outputs of shape "
            f"{tuple(output.shape[1:])} per example."
        )
    index = torch.remainder(index, bound)
    picked = output[(torch.arange(n, device=output.device),) + index.unbind(1)]
    if picked[0].numel() != 1:
        raise ValueError(
            f"{arg}: selects shape {tuple(picked.shape[1:])} per example from outputs of shape "
            f"{tuple(output.shape[1:])}; it must select one scalar per example."
        )
    return picked.reshape(n)


def check_finite(tensors: tuple[torch.Tensor, ...], arg: str, consequence: str) -> None:
    """Refuse NaN or inf in a tuple of batched tensors (``inputs``, ``baselines``), naming the
    tensor and the examples; ``consequence`` says what would be NaN otherwise."""
    for i, t in enumerate(tensors):
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        rows = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
        bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
        raise ValueError(
            f"{arg if len(tensors) == 1 else f'{arg}[{i}]'}: NaN or inf in examples {bad[:20]}"
            f"{' ...' if len(bad) > 20 else ''}; {consequence}."
        )
