"""Damped Gram matrices and their Cholesky solves.

G = Phi^T Phi accumulated block by block in float64 (or float32); (G + lambda I)^{-1} B is solved
with a Cholesky factor, never an explicit inverse.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .store import release_pages

Features = Union[torch.Tensor, np.ndarray]


def as_tensor_block(features: Features, start: int, stop: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor or a (memory-mapped) array as a tensor of ``dtype``.
    A memory-mapped block is copied and its pages released, so reading a store block by block
    keeps about one block resident."""
    block = features[start:stop]
    if isinstance(block, np.memmap):
        copy = torch.from_numpy(np.array(block))
        release_pages(block)
        block = copy
    elif isinstance(block, np.ndarray):
        block = torch.from_numpy(np.ascontiguousarray(block))
    return block.to(device=device, dtype=dtype)


def _check_accumulation_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: accumulate in torch.float32 or torch.float64; got {dtype}.")


def gram(
    features: Features, *, dtype: torch.dtype = torch.float64, block_size: int = 4096, device=None
) -> torch.Tensor:
    """Phi^T Phi for ``features`` (n, d), accumulated over row blocks in ``dtype``: (d, d)."""
    _check_accumulation_dtype(dtype)
    n, d = features.shape
    out = torch.zeros(d, d, dtype=dtype, device=device)
    for start in range(0, n, block_size):
        block = as_tensor_block(features, start, min(start + block_size, n), dtype, device)
        out.addmm_(block.T, block)
    return out


def auto_damping(gram_matrix: torch.Tensor, fraction: float = 1e-3) -> float:
    """A damping of ``fraction`` times the mean eigenvalue of G (trace(G) / d)."""
    d = gram_matrix.shape[0]
    mean_eig = float(torch.diagonal(gram_matrix).sum()) / d
    return fraction * mean_eig if mean_eig > 0 else fraction


def damped_cholesky(gram_matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor L of G + damping * I (LL^T = G + damping I)."""
    if not isinstance(damping, (int, float)) or damping < 0 or damping != damping:
        raise ValueError(f"damping: expected a non-negative float; got {damping!r}.")
    _check_accumulation_dtype(gram_matrix.dtype)
    eye = torch.eye(gram_matrix.shape[0], dtype=gram_matrix.dtype, device=gram_matrix.device)
    factor, info = torch.linalg.cholesky_ex(gram_matrix + damping * eye)
    if int(info) != 0:
        raise ValueError(
            f"damping: G + {damping:g} I is not positive definite (Cholesky failed at column {int(info)}); "
            "the features are rank deficient: use a larger damping or damping='auto'."
        )
    return factor


def cholesky_solve(factor: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X with (L L^T) X = rhs, for rhs (d, m); returned in the factor's dtype."""
    return torch.cholesky_solve(rhs.to(factor.dtype), factor)


def damped_solve(
    gram_matrix: torch.Tensor, rhs: torch.Tensor, damping: float, factor: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(G + damping I)^{-1} rhs by Cholesky."""
    factor = factor if factor is not None else damped_cholesky(gram_matrix, damping)
    return cholesky_solve(factor, rhs)
