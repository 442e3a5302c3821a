"""The training set sharded over the ranks of ``torch.distributed`` (torchrun; gloo on CPU, NCCL on GPU).

With R ranks, rank r featurises the contiguous batches ``shard_range(n_batches, r, R)`` and writes
their rows into the shared on-disk store (or, without a store, into a zero tensor that one
all-reduce completes on every rank). Scoring splits the same fixed grid of key blocks that a single
process uses, so every block is the same matrix product and the gathered scores equal a
single-process run bit for bit. A killed rank is resumed by rerunning the same command: batches
whose rows were flushed are skipped (the store's per-batch flags). Without an initialised process
group every function here is its single-process counterpart.

Before each collective, every rank checks in through the process group's key-value store and
waits at most ``timeout`` seconds for the others (:func:`collective_timeout`; by default the
``timeout`` given to ``init_process_group``); a rank that does not answer, frozen or dead, is
then named in a ``TimeoutError`` instead of leaving the others blocked inside the collective.

    torchrun --nproc_per_node 4 script.py     # script: dist.init_process_group(); TRAK(..., store_dir=shared)
"""

from __future__ import annotations

import contextlib
import itertools
import math
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, cast

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler, Subset

from .scoring import Features, check_k, iter_score_blocks, topk
from .store import FeatureStore, fill_rows


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_timeout: Optional[float] = None
_check_ins = itertools.count()  # every rank makes the same collectives in the same order


@contextlib.contextmanager
def collective_timeout(seconds: Optional[float]) -> Iterator[None]:
    """Within the block, a rank waits at most ``seconds`` for the others at each collective
    (None: the process group's own timeout)."""
    global _timeout
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0
    ):
        raise ValueError(f"timeout: expected a positive number of seconds or None; got {seconds!r}.")
    previous, _timeout = _timeout, seconds
    try:
        yield
    finally:
        _timeout = previous


def _wait_for_ranks(what: str) -> None:
    """Check in and wait for every other rank to check in at the same collective, raising a
    ``TimeoutError`` that names the ranks missing after the timeout."""
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    prefix = f"captum_influence/check_in/{next(_check_ins)}/"
    store.set(f"{prefix}{rank}", "1")
    seconds = _timeout if _timeout is not None else store.timeout.total_seconds()  # type: ignore[attr-defined]
    others = [r for r in range(world) if r != rank]
    try:
        store.wait([f"{prefix}{r}" for r in others], timedelta(seconds=seconds))
    except RuntimeError as err:
        missing = [r for r in others if not store.check([f"{prefix}{r}"])]
        if not missing:
            raise
        raise TimeoutError(
            f"torch.distributed: rank(s) {missing} of {world} did not reach {what} within {seconds:g} s "
            f"(this is rank {rank}); they are frozen, dead or on another code path. Rerun the same "
            "command to resume from the store (timeout: raise it with collective_timeout(seconds) or "
            "init_process_group(timeout=...) if they are only slow)."
        ) from err


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(n)``; the first ``n % world_size`` ranks take one more."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}); got {rank!r}.")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _as_batch(batch: object) -> tuple:
    """A loader's batch as a tuple ``(*model_inputs, labels)``, or a clear error (a collate_fn that
    returns a bare tensor would otherwise be split into its rows)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch)
    shape = f" of shape {tuple(batch.shape)}" if isinstance(batch, torch.Tensor) else ""
    raise ValueError(
        f"train_dataset: its loader yields a {type(batch).__name__}{shape}; expected batches that are tuples "
        "(*model_inputs, labels) as in captum.influence (check the DataLoader's collate_fn)."
    )


def iter_loader_shard(loader: DataLoader, batches: range) -> Iterator[tuple[int, tuple]]:
    """``(start, batch)`` for the batches numbered ``batches`` of a fixed-order loader. A loader
    with a fixed batch size over a sequential sampler loads only those examples; any other is
    iterated from the start and the other batches are skipped."""
    size = loader.batch_size
    if size is not None and isinstance(loader.sampler, SequentialSampler) and len(batches):
        first = batches.start * size
        last = min(batches.stop * size, len(loader.dataset))  # type: ignore[arg-type]
        part = DataLoader(
            Subset(loader.dataset, range(first, last)),
            batch_size=size,
            shuffle=False,
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
        )
        start = first
        for batch in part:
            batch = _as_batch(batch)
            yield start, batch
            start += len(batch[-1])
        return
    start = 0
    for index, batch in enumerate(loader):
        if index >= batches.stop:
            return
        batch = _as_batch(batch)
        if index in batches:
            yield start, batch
        start += len(batch[-1])


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; through the GPU when the group is NCCL's."""
    _wait_for_ranks("an all-reduce")
    if dist.get_backend() == "nccl" and not tensor.is_cuda:
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu)
        tensor.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor


def _all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on every rank), in rank order."""
    _wait_for_ranks("an all-gather")
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = tensor.to(device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.to(tensor.device) for p in parts]


def shared_array(store: FeatureStore, name: str, shape: tuple, dtype=np.float32, *, finite: bool = False) -> np.memmap:
    """``store.array(name, shape, dtype)`` opened by every rank: rank 0 checks the file (and
    replaces a damaged one) or creates a missing one first, so that no rank opens a file being
    replaced or truncates rows another rank wrote."""
    if rank_and_world()[1] == 1:
        return store.array(name, shape, dtype, finite=finite)
    if dist.get_rank() == 0:
        store.array(name, shape, dtype, finite=finite)
    barrier()
    return store.array(name, shape, dtype, finite=finite)


def fill_rows_sharded(
    loader: DataLoader,
    compute: Callable[[tuple], torch.Tensor],
    *,
    n_rows: int,
    dim: int,
    store: Optional[FeatureStore] = None,
    name: str = "features",
    dtype: torch.dtype = torch.float32,
    batches: Optional[Callable[[Iterable[tuple[int, tuple]]], Iterable[Any]]] = None,
    show_progress: bool = False,
    desc: str = "featurising",
) -> Any:
    """:func:`fill_rows` over ``loader``, this rank doing its share of the batches.

    Every rank returns all ``n_rows`` rows: with ``store``, the shared memmap once every rank has
    written its shard (the store directory must be shared by all ranks); without, a tensor
    completed by an all-reduce (each row is written by one rank, the others add zeros).
    ``batches`` may wrap the ``(start, batch)`` iterator (to move batches to a device, say).
    """
    n_batches = len(loader)
    rank, world = rank_and_world()
    mine = shard_range(n_batches, rank, world)
    items: Iterable[Any] = iter_loader_shard(loader, mine)
    if batches is not None:
        items = batches(items)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    if store is not None:
        shared_array(store, name, (n_rows, dim), np_dtype)
        shared_array(store, f"{name}.done", (n_batches,), np.uint8)
        shared_array(store, f"{name}.sums", (n_batches, 3), np.uint64)
    out = fill_rows(
        items,
        compute,
        n_rows=n_rows,
        dim=dim,
        n_batches=n_batches,
        store=store,
        name=name,
        dtype=dtype,
        show_progress=show_progress,
        desc=desc,
        indices=mine,
    )
    if world == 1:
        return out
    if store is None:
        return _all_reduce_sum(cast(torch.Tensor, out))  # without a store, fill_rows returns a tensor
    barrier()
    out = store.array(name, (n_rows, dim), np_dtype)  # reopened: every rank's rows, flushed
    if rank == 0 and store.flags(name, n_batches).all():
        store.finish(name)
    return out


def _my_blocks(n: int, block_size: int) -> range:
    """The key rows of this rank's share of the fixed grid of ``block_size`` blocks."""
    rank, world = rank_and_world()
    blocks = shard_range(-(-n // block_size), rank, world)
    return range(blocks.start * block_size, min(blocks.stop * block_size, n))


def _shifted(transform, offset: int):
    if transform is None:
        return None
    return lambda block, start, stop: transform(block, start + offset, stop + offset)


ScoreBlocks = Callable[[torch.Tensor, Features], Iterable[tuple[int, torch.Tensor]]]


def _part_blocks(queries, part, offset: int, block_size: int, dtype, transform, score_blocks: Optional[ScoreBlocks]):
    """``(start, block)`` over this rank's keys ``part`` (which begin at key ``offset``)."""
    if score_blocks is not None:
        return score_blocks(queries, part)
    return iter_score_blocks(queries, part, block_size=block_size, dtype=dtype, transform=_shifted(transform, offset))


def scores_sharded(
    queries: torch.Tensor,
    keys: Features,
    *,
    block_size: int = 8192,
    dtype: torch.dtype = torch.float32,
    transform=None,
    score_blocks: Optional[ScoreBlocks] = None,
) -> torch.Tensor:
    """:func:`scores` with the key blocks split over the ranks and summed into the full
    (n_queries, n_keys) matrix on every rank; bit-identical to one process.

    ``score_blocks(queries, keys)`` replaces :func:`iter_score_blocks` (and ``transform``) for
    scores that are not inner products: it yields ``(start, block)`` over ``keys`` in blocks of
    ``block_size`` rows, ``start`` counted from the first row of the ``keys`` it is given."""
    n = keys.shape[0]
    rank, world = rank_and_world()
    rows = _my_blocks(n, block_size) if world > 1 else range(n)
    out = torch.zeros(queries.shape[0], n, dtype=dtype, device=queries.device)
    part = keys[rows.start : rows.stop]
    for start, block in _part_blocks(queries, part, rows.start, block_size, dtype, transform, score_blocks):
        out[:, rows.start + start : rows.start + start + block.shape[1]] = block
    return _all_reduce_sum(out) if world > 1 else out


def topk_sharded(
    queries: torch.Tensor,
    keys: Features,
    k: int,
    *,
    largest: bool = True,
    query_block_size: int = 1024,
    block_size: int = 8192,
    dtype: torch.dtype = torch.float32,
    transform=None,
    score_blocks: Optional[ScoreBlocks] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk` with each rank taking the top k of its key blocks and the candidates of all
    ranks merged (ties to the lower key index, as in one process); ``score_blocks`` as in
    :func:`scores_sharded`."""
    n = keys.shape[0]
    check_k(k, n)
    rank, world = rank_and_world()
    rows = _my_blocks(n, block_size) if world > 1 else range(n)
    values = torch.full(
        (queries.shape[0], k), float("-inf") if largest else float("inf"), dtype=dtype, device=queries.device
    )
    indices = torch.full((queries.shape[0], k), n, dtype=torch.int64, device=queries.device)
    if len(rows):
        v, i = topk(
            queries,
            keys[rows.start : rows.stop],
            min(k, len(rows)),
            largest=largest,
            query_block_size=query_block_size,
            score_blocks=lambda q, part: _part_blocks(q, part, rows.start, block_size, dtype, transform, score_blocks),
        )
        values[:, : v.shape[1]] = v
        indices[:, : v.shape[1]] = i + rows.start
    if world == 1:
        return values, indices
    # Sorted by key index first, a stable sort by value keeps ties at the lower index, as in one
    # process; the padding (index n) goes after every real key of the same value.
    all_v = torch.cat(_all_gather(values), dim=1)
    all_i = torch.cat(_all_gather(indices), dim=1)
    order = torch.argsort(all_i, dim=1, stable=True)
    all_v, all_i = all_v.gather(1, order), all_i.gather(1, order)
    order = torch.argsort(-all_v if largest else all_v, dim=1, stable=True)[:, :k]
    return all_v.gather(1, order), all_i.gather(1, order)


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process), at most the timeout."""
    if rank_and_world()[1] > 1:
        _wait_for_ranks("a barrier")
