"""On-disk feature store: memory-mapped arrays, their settings, and per-batch progress.

A store directory holds ``metadata.json`` (the settings that produced it), ``NAME.npy`` arrays
(numpy memmaps) and ``NAME.done.npy`` flags, one per batch, set only after the batch's rows are
flushed. A killed job rerun with the same settings skips finished batches; a store written with
other settings is refused.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm


def _normalise(metadata: dict) -> dict:
    return json.loads(json.dumps(metadata, sort_keys=True, default=str))


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    # A temporary name of its own, so that processes writing the same file (ranks of one job
    # saving the same metadata) never move each other's half-written file into place.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


class FeatureStore:
    """A directory of arrays tied to the settings in ``metadata``."""

    def __init__(self, path: Union[str, os.PathLike], metadata: dict):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"store_dir: cannot create {str(self.path)!r}: {err}.") from err
        self.metadata = _normalise(metadata)
        meta_file = self.path / "metadata.json"
        if meta_file.exists():
            stored = json.loads(meta_file.read_text())
            differing = sorted(k for k in set(stored) | set(self.metadata) if stored.get(k) != self.metadata.get(k))
            if differing:
                details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {self.metadata.get(k)!r}" for k in differing)
                raise ValueError(
                    f"store_dir: {str(self.path)!r} was written with other settings ({details}). "
                    "Use another store_dir or delete this one."
                )
        else:
            _atomic_write(meta_file, lambda p: Path(p).write_text(json.dumps(self.metadata, indent=1, sort_keys=True)))

    def array(self, name: str, shape: tuple, dtype=np.float32) -> np.memmap:
        """The array ``name`` of ``shape``, created zero-filled or reopened for update."""
        file = self.path / f"{name}.npy"
        if file.exists():
            arr = np.load(file, mmap_mode="r+")
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(
                    f"store_dir: array {name!r} has shape {arr.shape} {arr.dtype}; expected {tuple(shape)} {np.dtype(dtype)}."
                )
            return arr
        return np.lib.format.open_memmap(file, mode="w+", dtype=dtype, shape=tuple(shape))

    def flags(self, name: str, count: int) -> np.memmap:
        """Per-batch completion flags of ``name``."""
        return self.array(f"{name}.done", (count,), np.uint8)

    def save_tensor(self, name: str, tensor: torch.Tensor) -> None:
        _atomic_write(self.path / f"{name}.pt", lambda p: torch.save(tensor.cpu(), p))

    def load_tensor(self, name: str) -> Optional[torch.Tensor]:
        file = self.path / f"{name}.pt"
        return torch.load(file, weights_only=True) if file.exists() else None


def release_pages(block: np.ndarray) -> None:
    """Drop a memory-mapped block's pages from this process's resident memory once it has been
    read or written. The page cache keeps them (the store's mappings are shared, so nothing is
    lost and a later read sees the same bytes); reading a large store block by block then holds
    about one block resident instead of the whole file. A no-op for other arrays or platforms."""
    mapping = getattr(block, "_mmap", None)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or block.size == 0:
        return
    low, high = np.lib.array_utils.byte_bounds(block)
    base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    page = mmap.PAGESIZE
    start, stop = -(-(low - base) // page) * page, (high - base) // page * page  # whole pages inside
    if stop > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


def fill_rows(
    batches: Iterable[tuple[int, Any]],
    compute: Callable[[Any], torch.Tensor],
    *,
    n_rows: int,
    dim: int,
    n_batches: int,
    store: Optional[FeatureStore] = None,
    name: str = "features",
    dtype: torch.dtype = torch.float32,
    show_progress: bool = False,
    desc: str = "featurising",
    indices: Optional[range] = None,
) -> Union[torch.Tensor, np.memmap]:
    """Rows ``compute(batch)`` written at each batch's ``start``: a tensor, or with ``store`` a memmap
    whose finished batches are skipped on a rerun (byte-identical to an uninterrupted run).

    ``indices``: the batch numbers (out of ``n_batches``) of the batches given, when they are one
    shard of the loader (default: all of them, in order); rows of other batches stay zero."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    indices = range(n_batches) if indices is None else indices
    if store is None:
        out: Union[torch.Tensor, np.memmap] = torch.zeros(n_rows, dim, dtype=dtype)
        done = None
    else:
        out = store.array(name, (n_rows, dim), np_dtype)
        done = store.flags(name, n_batches)
    bar = tqdm(total=len(indices), desc=desc, disable=not show_progress, leave=False)
    for index, (start, batch) in zip(indices, batches):
        if done is not None and done[index]:
            bar.update()
            continue
        rows = compute(batch).detach().to("cpu", dtype)
        if store is None:
            out[start : start + rows.shape[0]] = rows
        else:
            out[start : start + rows.shape[0]] = rows.numpy()
            out.flush()
            release_pages(out[start : start + rows.shape[0]])
            done[index] = 1
            done.flush()
        bar.update()
    bar.refresh()  # the bar is cleared on close: show its final state once
    bar.close()
    return out
