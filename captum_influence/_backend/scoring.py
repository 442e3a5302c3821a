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
        raise ValueError(f"queries: feature dimension {queries.shape[1]} does not match the stored {keys.shape[1]}.")
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


def _block_topk(block: torch.Tensor, start: int, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` columns of a stable argsort of one block (values, absolute column indices).

    torch.topk is O(width) per row against a sort's O(width log width), but among entries tied
    at the k-th value it may keep any of them; rows where it could have kept a higher index than
    a stable sort would (more ties in the block than kept), or that hold NaN (ordered first by
    topk, last by a sort), are redone with the stable sort."""
    values, cols = torch.topk(block, min(k, block.shape[1]), dim=1, largest=largest, sorted=False)
    kth = (values.min(1) if largest else values.max(1)).values.unsqueeze(1)
    redo = ((block == kth).sum(1) > (values == kth).sum(1)) | values.isnan().any(1)
    rows = redo.nonzero().flatten()
    if len(rows):
        sub = block[rows]
        order = torch.argsort(-sub if largest else sub, dim=1, stable=True)[:, : values.shape[1]]
        values[rows], cols[rows] = sub.gather(1, order), order
    return values, cols + start


def merge_topk(
    blocks: Iterable[tuple[int, torch.Tensor]], k: int, *, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` per row of a score matrix given as column blocks ``(start, S[:, start:stop])``,
    keeping a running top-k; returns values and column indices, ties to the lower index (exactly
    the first k columns of a stable argsort of the whole matrix)."""
    best: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (values, indices)
    for start, block in blocks:
        values, indices = _block_topk(block, start, k, largest)
        if best is not None:
            values, indices = torch.cat([best[0], values], dim=1), torch.cat([best[1], indices], dim=1)
        # Sorted by index, then stably by value: ties keep the lower index whatever the block order.
        order = torch.argsort(indices, dim=1)
        values, indices = values.gather(1, order), indices.gather(1, order)
        order = torch.argsort(-values if largest else values, dim=1, stable=True)[:, :k]
        best = values.gather(1, order), indices.gather(1, order)
    if best is None:
        raise ValueError("blocks: no score block to take the top k of.")
    return best


def topk(
    queries: torch.Tensor,
    keys: Features,
    k: int,
    *,
    largest: bool = True,
    query_block_size: int = 1024,
    score_blocks: Optional[Callable[[torch.Tensor, Features], Iterable[tuple[int, torch.Tensor]]]] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` scores per query and their key indices, merging a running top-k block by block.

    Ties are broken by the lower key index, as a stable argsort would. ``score_blocks(queries,
    keys)`` yields the ``(start, block)`` pairs instead of :func:`iter_score_blocks` (``**kwargs``)."""
    check_k(k, keys.shape[0])
    blocks = score_blocks or (lambda q, keys: iter_score_blocks(q, keys, **kwargs))
    values_out, indices_out = [], []
    for qs in range(0, queries.shape[0], query_block_size):
        q = queries[qs : qs + query_block_size]
        values, indices = merge_topk(blocks(q, keys), k, largest=largest)
        values_out.append(values)
        indices_out.append(indices)
    return torch.cat(values_out), torch.cat(indices_out)
