"""Tensors, arrays and sequences as checked numpy arrays, for the numpy-side modules (metrics, plots)."""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

NDim = Union[int, tuple[int, ...], None]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        # numpy has no bfloat16, and float64 is what every consumer here computes in anyway
        return (x.to(torch.float64) if x.is_floating_point() else x).numpy()
    if isinstance(x, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in x):
        return np.asarray([_to_numpy(e) for e in x])
    return np.asarray(x)


def _check_ndim(a: np.ndarray, name: str, ndim: NDim) -> None:
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and a.ndim not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name}: expected a {want} array; got shape {a.shape}.")


def as_array(x: Any, name: str, *, ndim: NDim = None, keep_dtype: bool = False) -> np.ndarray:
    """``x`` (tensor, array, nested sequence) as a finite float64 numpy array (its own dtype with
    ``keep_dtype``), with ``ndim`` checked; errors name the argument ``name``."""
    if x is None:
        raise ValueError(f"{name}: expected an array or tensor; got None.")
    try:
        a = _to_numpy(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected an array or tensor; got {type(x).__name__} ({err}).") from err
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise TypeError(f"{name}: expected numbers; got an array of dtype {a.dtype} and shape {a.shape}.")
    _check_ndim(a, name, ndim)
    if not keep_dtype:
        a = a.astype(np.float64)
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ValueError(f"{name}: {int((~np.isfinite(a)).sum())} entries are NaN or infinite; expected finite values.")
    return a


def as_mask(x: Any, name: str, *, ndim: NDim = None) -> np.ndarray:
    """``x`` as a boolean numpy array: booleans, or numbers that are all 0 or 1."""
    a = as_array(x, name, ndim=ndim, keep_dtype=True)
    if a.dtype != np.bool_:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name}: expected booleans (or 0/1); got values such as {np.unique(a)[:5].tolist()}.")
        a = a.astype(bool)
    return a


def squeeze_leading(a: np.ndarray, min_ndim: int = 1) -> np.ndarray:
    """Drop a leading batch axis of size 1 (one example as Captum returns it) if more than ``min_ndim`` remain."""
    return a[0] if a.ndim > min_ndim and a.shape[0] == 1 else a


def check_length(a: np.ndarray, name: str, n: int, what: str) -> None:
    """Check that ``a`` has ``n`` entries along its first axis, one per ``what``."""
    if a.shape[0] != n:
        raise ValueError(f"{name}: expected one entry per {what} ({n}); got {a.shape[0]} (shape {a.shape}).")
