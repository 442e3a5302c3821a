"""What TRAK and TracIn share: scores that are inner products of a test vector and a train vector.

Every method here reduces to influence(z, z_i) = <q(z), k(z_i)> * w_i, where q and k stack
per-checkpoint vectors and w_i is an optional per-training-example weight. The base class holds
the configuration (model, data, checkpoints, device) and turns the two feature maps into full
score matrices, top-k results and self-influence, all blockwise.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import numpy as np
import torch
from captum.influence import DataInfluence
from captum.influence._utils.common import KMostInfluentialResults
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._backend import FeatureStore, fill_rows_sharded, scores_sharded, topk_sharded
from ._backend.model_checks import preserved_modes
from ._backend.sharding import collective_timeout
from ._backend.solve import as_tensor_block
from ._checkpoints import LoadFunc, load_checkpoint, resolve_checkpoints
from ._data import as_loader, check_labelled, iter_batches, split_batch, to_device
from ._progress import progress

Features = Union[torch.Tensor, np.ndarray]


def _check_device(device: Union[str, torch.device]) -> torch.device:
    """``device`` as a torch.device this machine has, refused up front otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device: {device!r} is not a torch device ({err}); expected 'cpu', 'cuda', 'cuda:N', None "
            "(the model's device) or a torch.device."
        ) from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device: {device!r} was asked for but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); expected 'cpu' or None (the model's device)."
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device: {device!r} asks for GPU {resolved.index}; this machine has "
                f"{torch.cuda.device_count()} (cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device: {device!r} was asked for but MPS is not available; expected 'cpu' or None.")
    return resolved


Method = TypeVar("Method", bound=Callable[..., Any])


def keeps_model_state(method: Method) -> Method:
    """The caller's model comes back as it was found: a public method loads checkpoints, moves the
    model to ``device`` and puts it in eval mode, and afterwards its weights, buffers, device and
    every module's train/eval mode are restored."""

    @functools.wraps(method)
    def wrapper(self: "GradientFeatureInfluence", *args: Any, **kwargs: Any) -> Any:
        if self._holding_model:  # called from another public method: that one restores
            return method(self, *args, **kwargs)
        model = self.model
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        devices = {p.device for p in model.parameters()}
        self._holding_model = True
        try:
            with preserved_modes(model), collective_timeout(self.timeout):
                return method(self, *args, **kwargs)
        finally:
            self._holding_model = False
            if len(devices) == 1:
                model.to(devices.pop())
            model.load_state_dict(state)

    return wrapper  # type: ignore[return-value]


def check_scores(scores: torch.Tensor, what: str, rows: str) -> None:
    """Scores from finite gradients that are still NaN or inf overflowed the model's dtype."""
    finite = torch.isfinite(scores).all(dim=1)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten().tolist()
    raise ValueError(
        f"{what}: the scores of {rows + ' ' if rows else ''}examples {bad[:20]}{' ...' if len(bad) > 20 else ''} "
        f"overflow {scores.dtype} (every gradient is finite, but their products are too large); use smaller "
        "checkpoint weights, or a float64 model where the method keeps its dtype (TracIn)."
    )


class GradientFeatureInfluence(DataInfluence):
    """Base of the data-attribution classes: ``influence = Q K^T diag(w)``, computed in blocks.

    Subclasses implement ``_train_features()`` (the keys K, one row per training example, a tensor
    or a memmap of the store) and ``_test_features(inputs)`` (the queries Q), and may set
    ``_train_weights`` (a Tensor[n_train]) multiplying each training example's column.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Any,
        checkpoints_load_func: Optional[LoadFunc] = None,
        *,
        batch_size: int = 64,
        device: Union[str, torch.device, None] = None,
        show_progress: bool = False,
        timeout: Optional[float] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module; got {type(model).__name__}.")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"timeout: expected a positive number of seconds or None; got {timeout!r}.")
        #: under torch.distributed, the longest wait for the other ranks at a collective; then a
        #: TimeoutError names the ranks that did not answer (None: the process group's timeout)
        self.timeout = timeout
        if checkpoints_load_func is not None and not callable(checkpoints_load_func):
            raise TypeError("checkpoints_load_func: expected a callable (model, checkpoint) -> float.")
        self.model = model
        self.train_dataset = train_dataset
        self.batch_size = batch_size
        self.train_loader = as_loader(train_dataset, batch_size)
        check_labelled(self.train_loader)
        self.n_train = len(self.train_loader.dataset)  # type: ignore[arg-type]
        self.checkpoints = resolve_checkpoints(checkpoints)
        self.checkpoints_load_func = checkpoints_load_func
        self.device = _check_device(device) if device is not None else next(model.parameters()).device
        self.show_progress = show_progress
        self.store: Optional[FeatureStore] = None
        self._train_weights: Optional[torch.Tensor] = None
        self._example_shapes: Optional[list] = None
        self._holding_model = False

    # --- checkpoints and data -------------------------------------------------------------

    def _iter_checkpoints(self, desc: str) -> Iterator[tuple[int, float]]:
        """Load each checkpoint once, in order, yielding ``(index, weight)``, the model in eval mode
        (public methods restore the caller's model afterwards: :func:`keeps_model_state`)."""
        self.model.to(self.device)
        bar = progress(total=len(self.checkpoints), desc=desc, show=self.show_progress, inner=False, unit="checkpoint")
        for index in range(len(self.checkpoints)):
            weight = load_checkpoint(self.model, self.checkpoints[index], self.checkpoints_load_func, index)
            self.model.eval()
            yield index, weight
            bar.update()
        bar.close()

    def _test_batches(self, inputs: Any) -> tuple[list[tuple[int, tuple]], int]:
        """``inputs`` (a batch tuple, a Dataset or a DataLoader) as ``[(start, batch)]`` and its size."""
        if isinstance(inputs, (Dataset, DataLoader)):
            loader = as_loader(inputs, self.batch_size, arg="inputs")
            check_labelled(loader, arg="inputs")
            batches = list(iter_batches(loader, arg="inputs"))
        else:
            split_batch(inputs, arg="inputs")
            batches = [(0, tuple(inputs))]
            labels = batches[0][1][-1]
            if hasattr(labels, "__len__") and len(labels) == 0:
                raise ValueError("inputs: the batch is empty (labels of length 0); expected at least one test example.")
        for _, batch in batches:
            self._check_shapes(batch)
        n = sum(len(batch[-1]) for _, batch in batches)
        return [(s, to_device(b, self.device)) for s, b in batches], n

    def _train_batches(self) -> Iterator[tuple[int, tuple]]:
        for start, batch in iter_batches(self.train_loader):
            if self._example_shapes is None:
                self._check_shapes(batch)
            yield start, to_device(batch, self.device)

    def _check_shapes(self, batch: tuple) -> None:
        """Test examples must have the training examples' form and shapes: each model input a
        tensor of the same shape but for the batch dimension, or the same kind of other object
        (a dict encoding, whose padded lengths may differ between batches)."""
        shapes = [tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else type(x).__name__ for x in batch[:-1]]
        if self._example_shapes is None:
            self._example_shapes = shapes
            return
        # A tensor is described by its example shape, anything else by its type.
        forms = [f"tensor {s}" if isinstance(s, tuple) else s for s in shapes]
        train_forms = [f"tensor {s}" if isinstance(s, tuple) else s for s in self._example_shapes]
        if [f.split(" ")[0] for f in forms] != [f.split(" ")[0] for f in train_forms]:
            raise ValueError(
                f"inputs: the batch forms differ: the training batches hold ({', '.join(train_forms)}) before "
                f"the labels, these hold ({', '.join(forms)}); pass the model inputs in the same form."
            )
        if shapes != self._example_shapes:
            raise ValueError(
                f"inputs: example shapes {shapes} do not match the training examples' {self._example_shapes}."
            )

    def _featurise_train(
        self, n_rows: int, dim: int, compute: Callable, name: str, desc: str, dtype: torch.dtype = torch.float32
    ) -> Features:
        """Rows of ``compute((start, batch))`` for every training batch; in the store (resumable)
        when there is one. Under ``torch.distributed`` each rank computes its shard of the batches
        and every rank gets all the rows (through the shared store, or an all-reduce)."""

        def on_device(items):
            for start, batch in items:
                if self._example_shapes is None:
                    self._check_shapes(batch)
                yield start, (start, to_device(batch, self.device))

        return fill_rows_sharded(
            self.train_loader,
            compute,
            n_rows=n_rows,
            dim=dim,
            store=self.store,
            name=name,
            batches=on_device,
            show_progress=self.show_progress,
            desc=desc,
            dtype=dtype,
        )

    # --- the two feature maps -------------------------------------------------------------

    def _train_features(self) -> Features:  # the keys K, (n_train, d)
        raise NotImplementedError

    def _test_features(self, inputs: Any) -> torch.Tensor:  # the queries Q, (n_test, d)
        raise NotImplementedError

    @keeps_model_state
    def compute_intermediate_quantities(self, inputs: Any, aggregate: bool = False) -> torch.Tensor:
        """Per-example vectors whose dot products with the training vectors give the scores
        (``aggregate``: their sum over the examples, (1, d)).

        Args:
            inputs (tuple, Dataset or DataLoader): the examples.
            aggregate (bool, optional): return their sum over the examples. Default: False.

        Returns:
            Tensor: the vectors (n, d); (1, d) with ``aggregate``.
        """
        vectors = self._test_features(inputs)
        return vectors.sum(0, keepdim=True) if aggregate else vectors

    # --- scores ---------------------------------------------------------------------------

    def _weight_columns(self, block: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self._train_weights is None:
            return block
        return block * self._train_weights[start:stop].to(block)

    @property
    def _score_dtype(self) -> torch.dtype:
        """The dtype scores are computed and returned in."""
        return torch.float32

    def _clamp_k(self, k: Optional[int]) -> Optional[int]:
        """``k`` checked to be a positive int (or None) and clamped to n_train, as in Captum."""
        if k is None:
            return None
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"k: expected a positive int or None; got {k!r}.")
        return min(k, self.n_train)

    @contextlib.contextmanager
    def _progress(self, show_progress: bool) -> Iterator[None]:
        """Progress bars for one call (``show_progress`` of a method), as well as when the
        constructor asked for them."""
        before = self.show_progress
        self.show_progress = before or bool(show_progress)
        try:
            yield
        finally:
            self.show_progress = before

    @keeps_model_state
    def influence(
        self,
        inputs: Any,
        k: Optional[int] = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Union[torch.Tensor, KMostInfluentialResults]:
        """Scores (n_test, n_train), positive when the training example helps; with ``k`` (clamped
        to n_train), the top-k proponents (or opponents) as ``KMostInfluentialResults(indices,
        influence_scores)``. ``aggregate``: the scores summed over the test examples, (1, n_train),
        and the top-k of that sum, as in Captum.

        Args:
            inputs (tuple, Dataset or DataLoader): the test examples, a batch ``(*model_inputs,
                labels)`` or a dataset of such tuples.
            k (int, optional): return only the top ``k`` training examples per test example,
                clamped to n_train; a positive int or None. Default: None (every score).
            proponents (bool, optional): with ``k``, the highest scores (True) or the lowest,
                the opponents (False). Default: True.
            show_progress (bool, optional): progress bars over checkpoints and batches.
                Default: False.
            aggregate (bool, optional): score the sum over the test examples instead of each
                test example. Default: False.

        Returns:
            Tensor or KMostInfluentialResults: without ``k``, the scores (n_test, n_train)
            ((1, n_train) with ``aggregate``); with ``k``, ``KMostInfluentialResults(indices,
            influence_scores)``, each (n_test, k) ((1, k) with ``aggregate``).
        """
        with self._progress(show_progress):
            result = self._influence(inputs, self._clamp_k(k), proponents, aggregate)
        check_scores(result if isinstance(result, torch.Tensor) else result.influence_scores, "influence", "test")
        return result

    def _influence(
        self, inputs: Any, k: Optional[int], proponents: bool, aggregate: bool
    ) -> Union[torch.Tensor, KMostInfluentialResults]:
        queries = self._test_features(inputs).to(self.device)
        keys = self._train_features()
        if aggregate:  # scores are linear in the query: the sum of scores is the sum's score
            queries = queries.sum(0, keepdim=True)
        # Under torch.distributed the key blocks are split over the ranks and gathered (exact).
        if k is None:
            return scores_sharded(queries, keys, transform=self._weight_columns, dtype=self._score_dtype)
        values, indices = topk_sharded(
            queries, keys, k, largest=bool(proponents), transform=self._weight_columns, dtype=self._score_dtype
        )
        return KMostInfluentialResults(indices, values)

    @staticmethod
    def _rowwise_scores(
        queries: Features,
        keys: Features,
        weights: Optional[torch.Tensor],
        block_size: int = 8192,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Self-influence style scores <q_i, k_i> * w_i for aligned rows (tensors or memmaps), a block at a time."""
        out = torch.empty(queries.shape[0], dtype=dtype)
        for start in range(0, queries.shape[0], block_size):
            stop = min(start + block_size, queries.shape[0])
            q = as_tensor_block(queries, start, stop, torch.float64)
            out[start:stop] = (q * as_tensor_block(keys, start, stop, torch.float64, q.device)).sum(1).cpu()
        return out if weights is None else out * weights.to(out)
