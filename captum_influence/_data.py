"""Datasets, loaders and batches: a batch is a tuple ``(*model_inputs, labels)`` as in Captum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator, Union

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, default_collate


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


def check_labelled(loader: DataLoader, arg: str = "train_dataset") -> None:
    """Refuse, before any work, a dataset whose first item is not ``(*model_inputs, label)`` (a
    custom ``collate_fn`` may build the tuples itself: then its batches are checked as they come)."""
    if loader.collate_fn is default_collate and not isinstance(loader.dataset, IterableDataset):
        check_item(loader.dataset[0], arg)


def check_item(item: Any, arg: str) -> None:
    """A dataset item must be a tuple ``(*model_inputs, label)``, as in captum.influence."""
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return
    what = type(item).__name__
    if isinstance(item, (tuple, list)):
        what += f" of length {len(item)}"
    elif isinstance(item, torch.Tensor):
        what += f" of shape {tuple(item.shape)}"
    raise ValueError(
        f"{arg}: its items are a {what}; expected each item to be a tuple (*model_inputs, label) as in "
        "captum.influence (for example a TensorDataset(x, y)): the last element is the label."
    )


def split_batch(batch: Any, *, arg: str = "inputs") -> tuple[tuple, torch.Tensor]:
    """``(model_inputs, labels)`` of a batch tuple whose last element is the label."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            f"{arg}: expected a tuple (*model_inputs, labels) as in captum.influence; got "
            f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}."
        )
    return tuple(batch[:-1]), batch[-1]


def iter_batches(loader: DataLoader, *, arg: str = "train_dataset") -> Iterator[tuple[int, tuple]]:
    """Yield ``(start_index, batch)`` over a fixed-order loader; each batch must be a tuple
    ``(*model_inputs, labels)``."""
    start = 0
    for batch in loader:
        check_item(batch, arg)
        batch = tuple(batch)
        yield start, batch
        start += len(batch[-1])


def to_device(batch: Any, device: Union[str, torch.device, None]) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if device is None:
        return batch
    return torch.utils._pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def call_args(inputs: tuple) -> tuple[tuple, dict]:
    """How a batch's model inputs reach forward, exactly as the batch gives them: one dict (a
    tokenizer's encoding) as keywords, ``model(**encoding)``; anything else positionally."""
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        return (), dict(inputs[0])
    return tuple(inputs), {}


def call_model(model: Any, inputs: tuple) -> Any:
    """``model(**encoding)`` for a dict encoding, else ``model(*inputs)``; see :func:`call_args`."""
    args, kwargs = call_args(inputs)
    return model(*args, **kwargs)


def logits_of(out: Any, arg: str = "model") -> torch.Tensor:
    """The tensor a classifier returns: ``out`` itself, ``out["logits"]`` or ``out.logits`` (a
    transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    field = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(field, torch.Tensor):
        return field
    raise ValueError(
        f"{arg}: forward returned {type(out).__name__}; expected a Tensor of logits or probabilities, "
        "or a dict / output object with a 'logits' tensor."
    )
