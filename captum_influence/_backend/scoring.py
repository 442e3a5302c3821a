"""Blockwise scores and top-k: S = Q K^T computed a block of rows and columns at a time.

Memory is O(test_block x train_block + n_test x k), never n_test x n_train unless the caller
asks for the full matrix.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch

from .solve import Features, as_tensor_block

BlockFn = Callable[[torch.Tensor, int, int], torch.Tensor]


def iter_score_blocks(
    queries: torch.Tensor,
    keys: Features,
    *,
    block_size: int = 8192,
    dtype: torch.dtype = torch.float32,
    transform: Optional[BlockFn] = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, queries @ keys[start:stop].T)`` over blocks of ``keys`` rows.

    ``transform(scores, start, stop)`` may rescale a block (for example by per-train weights)."""
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries: feature dimension {queries.shape[1]} does not match the stored {keys.shape[1]}."
        )
    n = keys.shape[0]
    q = queries.to(dtype)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        block = q @ as_tensor_block(keys, start, stop, dtype, q.device).T
        yield start, transform(block, start, stop) if transform else block


def scores(queries: torch.Tensor, keys: Features, **kwargs) -> torch.Tensor:
    """The full (n_queries, n_keys) score matrix, filled block by block."""
    out = torch.empty(queries.shape[0], keys.shape[0], dtype=kwargs.get("dtype", torch.float32), device=queries.device)
    for start, block in iter_score_blocks(queries, keys, **kwargs):
        out[:, start : start + block.shape[1]] = block
    return out


def check_k(k: int, n: int) -> None:
    """``k`` must be an int in [1, n]."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= n:
        raise ValueError(f"k: expected an int in [1, {n}]; got {k!r}.")


def merge_topk(
    blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` per row of a score matrix given as column blocks ``(start, S[:, start:stop])``,
    keeping a running top-k; returns values and column indices, ties to the lower index."""
    best_v: Optional[torch.Tensor] = None
    best_i: Optional[torch.Tensor] = None
    for start, block in blocks:
        idx = torch.arange(start, start + block.shape[1], device=block.device).expand_as(block)
        if best_v is not None:
            block = torch.cat([best_v, block], dim=1)
            idx = torch.cat([best_i, idx], dim=1)
        order = torch.argsort(block if not largest else -block, dim=1, stable=True)[:, :k]
        best_v, best_i = block.gather(1, order), idx.gather(1, order)
    if best_v is None:
        raise ValueError("blocks: no score block to take the top k of.")
    return best_v, best_i


def topk(
    queries: torch.Tensor,
    keys: Features,
    k: int,
    *,
    largest: bool = True,
    query_block_size: int = 1024,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` scores per query and their key indices, merging a running top-k block by block.

    Ties are broken by the lower key index, as a stable argsort would."""
    check_k(k, keys.shape[0])
    values_out, indices_out = [], []
    for qs in range(0, queries.shape[0], query_block_size):
        q = queries[qs : qs + query_block_size]
        values, indices = merge_topk(iter_score_blocks(q, keys, **kwargs), k, largest=largest)
        values_out.append(values)
        indices_out.append(indices)
    return torch.cat(values_out), torch.cat(indices_out)
