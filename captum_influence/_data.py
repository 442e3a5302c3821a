"""Datasets, loaders and batches: a batch is a tuple ``(*model_inputs, labels)`` as in Captum."""

from __future__ import annotations

from typing import Any, Iterator, Union

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


def as_loader(data: Any, batch_size: int, *, arg: str = "train_dataset") -> DataLoader:
    """A loader in a fixed order over ``data`` (a Dataset or a DataLoader of batch tuples)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}.")
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise ValueError(f"{arg}: a shuffling DataLoader gives no stable example indices; pass shuffle=False.")
        loader = data
    elif isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    else:
        raise TypeError(f"{arg}: expected a torch Dataset or DataLoader; got {type(data).__name__}.")
    if len(loader.dataset) == 0:  # type: ignore[arg-type]
        raise ValueError(f"{arg}: the dataset is empty.")
    return loader


def split_batch(batch: Any, *, arg: str = "inputs") -> tuple[tuple, torch.Tensor]:
    """``(model_inputs, labels)`` of a batch tuple whose last element is the label."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"{arg}: expected a tuple (*model_inputs, labels) as in captum.influence; got "
            f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}."
        )
    return tuple(batch[:-1]), batch[-1]


def iter_batches(loader: DataLoader) -> Iterator[tuple[int, tuple]]:
    """Yield ``(start_index, batch)`` over a fixed-order loader."""
    start = 0
    for batch in loader:
        batch = tuple(batch)
        yield start, batch
        start += len(batch[-1])


def to_device(batch: Any, device: Union[str, torch.device, None]) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if device is None:
        return batch
    return torch.utils._pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)
