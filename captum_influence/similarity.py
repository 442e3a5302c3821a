r"""Similarity influence: the source examples whose layer activations are most (or least) like a
test example's, Captum's ``SimilarityInfluence`` on this package's store and blockwise top-k.

For a layer l with activations a_l(z) (flattened to a vector), each test example z gets

    top-k_i  s(a_l(z), a_l(z_i))        over the source examples z_i, largest ("max") or smallest ("min"),

with s the cosine similarity <a, a'> / (||a|| ||a'||), the Euclidean distance ||a - a'||_2, or any
metric of two batches. The source activations are computed once and kept on disk, with the model's
and the data's fingerprints so that a stale cache is refused; the top k is merged block by block,
so the (n_test, n_source) similarity matrix is never held.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from captum.influence import DataInfluence
from captum.influence._core.similarity_influence import cosine_similarity as _captum_cosine_similarity
from captum.influence._utils.common import KMostInfluentialResults
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ._backend import FeatureStore, batch_size_of, fill_rows, merge_topk
from ._backend.model_checks import preserved_modes
from ._backend.solve import Features, as_tensor_block
from ._data import as_loader, call_args, to_device
from ._progress import progress

SimilarityMetric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Source rows per similarity_metric call (by default): the block of activations and the
# (n_test, rows) similarities each stay under this many elements.
_BLOCK_ELEMENTS = 2**22
# Examples hashed for the data's fingerprint, spread evenly from the first to the last.
_SAMPLED_EXAMPLES = 64
# The files of one layer's store (FeatureStore's metadata, the array and its batch flags).
_STORE_FILES = ("metadata.json", "activations.npy", "activations.done.npy", "activations.sums.npy")
# Captum's documented influence() keywords that its implementation never reads.
_UNUSED_CAPTUM_KEYWORDS = ("load_input_from_disk", "inputs_id")


# --- metrics ---------------------------------------------------------------------------------


def _zero_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of a (n, d) matrix whose norm is 0 (their cosine similarity is undefined)."""
    return torch.linalg.norm(x, dim=1) == 0


def cosine_similarity(test: torch.Tensor, train: torch.Tensor, replace_nan: float = 0.0) -> torch.Tensor:
    r"""Pairwise cosine similarity <a, b> / (||a|| ||b||) of the flattened rows: (n, *), (m, *) -> (n, m).

    A pair with a zero vector has no cosine and gets ``replace_nan`` exactly. (Captum's version
    fills a zero row with ``replace_nan`` before the product, which gives such pairs values like
    ``replace_nan * sum(b / ||b||)``, possibly above 1.)

    Example::

        >>> cosine_similarity(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[2.0, 2.0]]), -2)
        tensor([[ 0.7071],
                [-2.0000]])
    """
    test, train = test.reshape(test.shape[0], -1), train.reshape(train.shape[0], -1)
    test_zero, train_zero = _zero_rows(test), _zero_rows(train)
    test_norm = torch.linalg.norm(test, dim=1, keepdim=True).masked_fill(test_zero[:, None], 1)
    train_norm = torch.linalg.norm(train, dim=1, keepdim=True).masked_fill(train_zero[:, None], 1)
    similarity = (test / test_norm) @ (train / train_norm).T
    return similarity.masked_fill(test_zero[:, None] | train_zero[None, :], replace_nan)


def euclidean_distance(test: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    r"""Pairwise Euclidean distance ||a - b||_2 of the flattened rows: (n, *), (m, *) -> (n, m).

    Computed from the differences, not from ||a||^2 + ||b||^2 - 2<a, b>, whose cancellation loses
    the distances between near-duplicates (the nearest neighbours that "min" looks for).

    Example::

        >>> euclidean_distance(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5., 1.]])
    """
    return torch.cdist(
        test.reshape(test.shape[0], -1),
        train.reshape(train.shape[0], -1),
        compute_mode="donot_use_mm_for_euclid_dist",
    )


# --- model inputs, activations and fingerprints ----------------------------------------------


def _model_inputs(batch: Any) -> tuple:
    """The model inputs of a source batch (or example): a tuple ``(*inputs, label)`` gives its
    inputs, a 1-tuple or a bare tensor (unlabelled data) is the input itself."""
    if isinstance(batch, (tuple, list)):
        return tuple(batch[:-1]) if len(batch) > 1 else tuple(batch)
    return (batch,)


def _layer_outputs(
    model: nn.Module, layers: dict[str, nn.Module], inputs: tuple, extra: tuple, arg: str
) -> dict[str, torch.Tensor]:
    """Each layer's output, (n, *), from one forward ``model(*inputs, *extra)`` without grad
    (a single dict input reaches forward as keywords)."""
    n = batch_size_of(inputs, arg=arg)
    outputs: dict[str, list[Any]] = {name: [] for name in layers}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            # A copy: an in-place op after the layer (ReLU(inplace=True)) would change the output.
            outputs[name].append(output.detach().clone() if isinstance(output, torch.Tensor) else output)

        return hook

    args, kwargs = call_args(inputs)
    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            model(*args, *extra, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, calls in outputs.items():
        if len(calls) != 1:
            raise ValueError(
                f"layers: module {name!r} was called {len(calls)} times in one forward; its activation "
                "is defined for a module called exactly once."
            )
        out = calls[0]
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"layers: module {name!r} returned {shape} for a batch of {n} ({arg}); expected a tensor "
                "with one row per example."
            )
    return {name: calls[0] for name, calls in outputs.items()}


def _digest(value: Any, h: Any) -> None:
    """Feed ``value`` (tensors, arrays, containers of them, scalars) into the hash ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {t.dtype} {tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(f"mapping {len(value)}".encode())
        for key, item in value.items():
            h.update(repr(key).encode())
            _digest(item, h)
    elif isinstance(value, (tuple, list)):
        h.update(f"sequence {len(value)}".encode())
        for item in value:
            _digest(item, h)
    elif isinstance(value, (str, bytes, int, float, bool, type(None))):
        h.update(repr(value).encode())
    else:
        array = np.asarray(value)  # numpy arrays, images and the like: their values
        h.update(f"array {array.dtype} {array.shape}".encode())
        h.update(array.tobytes() if array.dtype != object else repr(value).encode())


def _model_identity(model: nn.Module) -> dict:
    """The model's class and a hash of every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    _digest(model.state_dict(), h)
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "state_sha256": h.hexdigest()}


def _data_identity(dataset: Dataset, n: int) -> dict:
    """The dataset's class, size and a hash of the model inputs of up to _SAMPLED_EXAMPLES
    examples spread evenly over it (labels left out: they do not change activations)."""
    count = min(n, _SAMPLED_EXAMPLES)
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})
    h = hashlib.sha256()
    for index in picks:
        _digest(_model_inputs(dataset[index]), h)
    return {
        "class": f"{type(dataset).__module__}.{type(dataset).__qualname__}",
        "n": n,
        "sampled": len(picks),
        "inputs_sha256": h.hexdigest(),
    }


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 activations are kept in float64, all others in float32 (numpy has no bfloat16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the method ------------------------------------------------------------------------------


class SimilarityInfluence(DataInfluence):
    r"""The source examples most (or least) similar to each test example in a layer's activations.

    For each layer l and test example z, with a_l the layer's output flattened to a vector,

    .. math::
        \mathrm{influence}_l(z) = \operatorname{top-k}_i\; s\big(a_l(z), a_l(z_i)\big)

    over the source examples z_i (``influence_src_dataset``), the largest values for
    ``similarity_direction="max"`` and the smallest for ``"min"``; s is
    :func:`cosine_similarity` (default), :func:`euclidean_distance` (with ``"min"``: nearest
    neighbours) or any ``similarity_metric(test (n, *), source (m, *)) -> (n, m)``.

    The source activations are computed once per layer, in eval mode and without grad, and kept
    under ``activation_dir/model_id/src/<layer>`` with the model's fingerprint (a hash of every
    parameter and buffer) and the data's (size and a hash of a sample of examples): a later call
    reuses them; one with another model or other data is refused with a ValueError that names
    what changed, and ``load_src_from_disk=False`` recomputes them (Captum's way to regenerate).
    A job killed while computing them resumes from the last finished batch.

    Differences from ``captum.influence.SimilarityInfluence``, on purpose:

    - Activations are taken in eval mode (Dropout off, BatchNorm on running statistics, so an
      example's activation does not depend on its batch), and the model's modes are restored.
    - A cached activation set is checked against the model and data; Captum reuses any files
      found under ``activation_dir/model_id``.
    - A cosine pair with a zero vector gets exactly ``replace_nan`` (by default -2 for "max" and 2
      for "min", so it ranks last), and ``"zero_acts-<layer>"`` lists every such pair as
      ``[test_index, source_index]`` rows with absolute source indices.
    - ``top_k`` is clamped to the number of source examples and works whatever the last
      batch's size (Captum fails when top_k exceeds the last batch).
    - Source batches follow this package's convention ``model(*batch[:-1])`` (Captum passes only
      ``batch[0]``); a bare tensor or a 1-tuple is the model input itself, as in Captum.
    - A layer called more than once in a forward, or whose output is not a tensor with one row
      per example, is refused; unknown keywords raise a TypeError.

    Args:
        module: the model; ``layers`` are names of its submodules.
        layers: a submodule name or a list of them, e.g. ``"fc1"`` or ``["encoder.3", "head"]``.
        influence_src_dataset: the source examples (a Dataset or an unshuffled DataLoader).
        activation_dir: where the source activations are kept.
        model_id: a subdirectory of ``activation_dir`` for this model's activations.
        similarity_metric: ``(test (n, *), source (m, *)) -> Tensor (n, m)``.
        similarity_direction: ``"max"`` or ``"min"``.
        batch_size: examples per forward over ``influence_src_dataset``.
        replace_nan: the cosine similarity of a pair with a zero vector (cosine metric only).
        block_size: source rows per ``similarity_metric`` call (default: sized to about 4M elements).
        show_progress: show progress bars over the source data.

    Example::

        >>> sim = ci.SimilarityInfluence(model, ["fc1", "fc2"], train_set, "acts", batch_size=64)
        >>> result = sim.influence(test_x, top_k=5)
        >>> result["fc1"].indices.shape, result["fc1"].influence_scores.shape   # (n_test, 5) each
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Union[str, list[str]],
        influence_src_dataset: Union[Dataset, DataLoader],
        activation_dir: Union[str, Path],
        model_id: str = "",
        similarity_metric: SimilarityMetric = cosine_similarity,
        similarity_direction: str = "max",
        batch_size: int = 1,
        *,
        replace_nan: Optional[float] = None,
        block_size: Optional[int] = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise TypeError(
                f"SimilarityInfluence: unknown keyword arguments {sorted(kwargs)}; the extra keywords "
                "are replace_nan, block_size and show_progress."
            )
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected an nn.Module; got {type(module).__name__}.")
        self.module = module
        self.layers = self._check_layers(layers)
        self._layer_modules = {name: module.get_submodule(name) for name in self.layers}
        if isinstance(influence_src_dataset, IterableDataset) or isinstance(
            getattr(influence_src_dataset, "dataset", None), IterableDataset
        ):
            raise TypeError(
                "influence_src_dataset: an IterableDataset has no indices to report; pass a map-style Dataset."
            )
        self.influence_src_dataset = influence_src_dataset
        self.influence_src_dataloader = as_loader(influence_src_dataset, batch_size, arg="influence_src_dataset")
        self.batch_size = batch_size
        self.n_src = len(self.influence_src_dataloader.dataset)  # type: ignore[arg-type]
        if not isinstance(activation_dir, (str, Path)):
            raise TypeError(f"activation_dir: expected a directory path; got {type(activation_dir).__name__}.")
        self.activation_dir = activation_dir
        if not isinstance(model_id, str):
            raise TypeError(f"model_id: expected a str; got {type(model_id).__name__}.")
        self.model_id = model_id
        if similarity_direction not in ("max", "min"):
            raise ValueError(f"similarity_direction: expected 'max' or 'min'; got {similarity_direction!r}.")
        self.similarity_direction = similarity_direction
        if not callable(similarity_metric):
            raise TypeError(
                f"similarity_metric: expected a callable (test, source) -> (n_test, n_source); "
                f"got {type(similarity_metric).__name__}."
            )
        self._cosine = similarity_metric in (cosine_similarity, _captum_cosine_similarity)
        if self._cosine:
            if replace_nan is None:
                replace_nan = -2.0 if similarity_direction == "max" else 2.0
            if isinstance(replace_nan, bool) or not isinstance(replace_nan, (int, float)):
                raise TypeError(f"replace_nan: expected a number; got {type(replace_nan).__name__}.")
            self.replace_nan = float(replace_nan)
            similarity_metric = partial(cosine_similarity, replace_nan=self.replace_nan)
        elif replace_nan is not None:
            raise ValueError("replace_nan: only the cosine similarity uses it; the given similarity_metric does not.")
        self.similarity_metric = similarity_metric
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0
        ):
            raise ValueError(f"block_size: expected a positive int or None; got {block_size!r}.")
        self.block_size = block_size
        if not isinstance(show_progress, bool):
            raise TypeError(f"show_progress: expected a bool; got {type(show_progress).__name__}.")
        self.show_progress = show_progress

    def _check_layers(self, layers: Any) -> list[str]:
        names = [layers] if isinstance(layers, str) else layers
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"layers: expected a submodule name or a non-empty list of them; got {layers!r:.80}.")
        if len(set(names)) != len(names):
            raise ValueError(f"layers: names repeat in {list(names)}.")
        for name in names:
            try:
                self.module.get_submodule(name)
            except AttributeError:
                known = [n for n, _ in self.module.named_modules() if n]
                raise ValueError(
                    f"layers: {name!r} is not a submodule of module; its submodules are {known[:20]}."
                ) from None
        return list(names)

    # --- source activations -----------------------------------------------------------------

    def _device(self) -> torch.device:
        tensor: Optional[torch.Tensor] = next(iter(self.module.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(self.module.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def _source_batches(self, device: torch.device) -> Iterator[tuple[int, tuple]]:
        """``(start, model_inputs)`` over the source data, in order."""
        start = 0
        for batch in self.influence_src_dataloader:
            inputs = to_device(_model_inputs(batch), device)
            yield start, inputs
            start += batch_size_of(inputs, arg="influence_src_dataset")

    def _store(self, layer: str, metadata: dict, load_src_from_disk: bool) -> FeatureStore:
        path = Path(self.activation_dir, self.model_id, "src", layer)
        if not load_src_from_disk:
            for name in _STORE_FILES:
                (path / name).unlink(missing_ok=True)
        try:
            return FeatureStore(path, metadata)
        except ValueError as err:
            raise ValueError(
                str(err).replace("store_dir", "activation_dir")
                + " Or pass load_src_from_disk=False to recompute the activations."
            ) from err

    def _source_activations(
        self, layer: str, shape: tuple, dtype: torch.dtype, identity: dict, load_src_from_disk: bool
    ) -> Features:
        """The layer's activations of every source example, (n_src, prod(shape)), from the store
        when it holds them (one pass over the source data per layer computed)."""
        metadata = {
            "method": "SimilarityInfluence",
            "layer": layer,
            **identity,
            "activation_shape": list(shape),
            "dtype": str(dtype),
            "batch_size": self.influence_src_dataloader.batch_size,  # the resumable unit of work
        }
        store = self._store(layer, metadata, load_src_from_disk)
        device = self._device()

        def compute(inputs: tuple) -> torch.Tensor:
            modules = {layer: self._layer_modules[layer]}
            out = _layer_outputs(self.module, modules, inputs, (), "influence_src_dataset")[layer]
            if tuple(out.shape[1:]) != shape:
                raise ValueError(
                    f"influence_src_dataset: layer {layer!r} gives activations of shape {tuple(out.shape[1:])} "
                    f"for source examples but {shape} for inputs; the similarity needs the same shape."
                )
            return out.reshape(out.shape[0], -1)

        return fill_rows(
            self._source_batches(device),
            compute,
            n_rows=self.n_src,
            dim=int(np.prod(shape)),
            n_batches=len(self.influence_src_dataloader),
            store=store,
            name="activations",
            dtype=dtype,
            show_progress=self.show_progress,
            desc=f"activations of {layer}",
        )

    # --- similarities -------------------------------------------------------------------------

    def _similarity_blocks(
        self, layer: str, queries: torch.Tensor, keys: Features, zero_pairs: list[torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, similarity_metric(queries, source block))`` over blocks of source rows; pairs
        with a zero vector (cosine only) are appended to ``zero_pairs``."""
        n_test, shape = queries.shape[0], tuple(queries.shape[1:])
        dim = int(np.prod(shape))
        rows = self.block_size or max(1, _BLOCK_ELEMENTS // max(dim, n_test))
        n = keys.shape[0]
        test_zero = _zero_rows(queries.reshape(n_test, -1)) if self._cosine else None
        starts = progress(range(0, n, rows), desc=f"similarities of {layer}", show=self.show_progress, unit="block")
        for start in starts:
            stop = min(start + rows, n)
            block = as_tensor_block(keys, start, stop, queries.dtype, queries.device)
            similarity = self.similarity_metric(queries, block.reshape(stop - start, *shape))
            if not isinstance(similarity, torch.Tensor):
                raise TypeError(f"similarity_metric: returned {type(similarity).__name__}; expected a Tensor.")
            if tuple(similarity.shape) != (n_test, stop - start):
                raise ValueError(
                    f"similarity_metric: returned shape {tuple(similarity.shape)} for {n_test} test and "
                    f"{stop - start} source examples; expected (inputs_batch_size, source_block_size) = "
                    f"{(n_test, stop - start)}."
                )
            if similarity.isnan().any():
                raise ValueError(
                    f"similarity_metric: returned NaN for layer {layer!r} and source examples {start} to "
                    f"{stop - 1}; check the activations and the metric for 0/0."
                )
            if test_zero is not None:
                pairs = (test_zero[:, None] | _zero_rows(block)[None, :]).nonzero()
                zero_pairs.append(pairs + torch.tensor([0, start], device=pairs.device))
            yield start, similarity

    def influence(
        self,
        inputs: Union[torch.Tensor, tuple[Any, ...]],
        top_k: int = 1,
        additional_forward_args: Optional[Any] = None,
        load_src_from_disk: bool = True,
        **kwargs: Any,
    ) -> dict[str, Union[KMostInfluentialResults, torch.Tensor]]:
        r"""The ``top_k`` most similar (``"max"``) or least similar (``"min"``) source examples of
        each test example, per layer.

        Args:
            inputs: the test batch as the model takes it, ``model(*inputs, *additional_forward_args)``:
                a Tensor, a tuple of them, or a dict encoding (``model(**inputs)``). No labels.
            top_k: how many source examples per test example (clamped to the number of them).
            additional_forward_args: further arguments of the forward after ``inputs``.
            load_src_from_disk: reuse the stored source activations (refused with a ValueError when
                they belong to another model or other data); False recomputes them.
            **kwargs: Captum's ``load_input_from_disk`` and ``inputs_id`` are accepted and, as in
                Captum, unused (test activations are always computed).

        Returns:
            ``{layer: KMostInfluentialResults(indices, influence_scores)}``, both ``(n_test, top_k)``:
            source indices and their similarities, best first (the same as Captum's
            ``(indices, similarities)`` tuple). With the cosine metric, a layer with zero
            activations also gets ``"zero_acts-<layer>"``: the ``[test_index, source_index]`` pairs
            holding a zero vector, with a RuntimeWarning, as in Captum.
        """
        unknown = sorted(set(kwargs) - set(_UNUSED_CAPTUM_KEYWORDS))
        if unknown:
            raise TypeError(f"influence: unknown keyword arguments {unknown}.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k: expected a positive int; got {top_k!r}.")
        if not isinstance(load_src_from_disk, bool):
            raise TypeError(f"load_src_from_disk: expected a bool; got {type(load_src_from_disk).__name__}.")
        if isinstance(inputs, torch.Tensor) or isinstance(inputs, Mapping):
            inputs = (inputs,)
        elif not isinstance(inputs, (tuple, list)):
            raise TypeError(
                f"inputs: expected a Tensor, a tuple of model inputs or a dict; got {type(inputs).__name__}."
            )
        extra = () if additional_forward_args is None else additional_forward_args
        extra = tuple(extra) if isinstance(extra, tuple) else (extra,)
        device = self._device()

        influences: dict[str, Union[KMostInfluentialResults, torch.Tensor]] = {}
        with preserved_modes(self.module):
            self.module.eval()
            test = _layer_outputs(
                self.module, self._layer_modules, to_device(tuple(inputs), device), to_device(extra, device), "inputs"
            )
            identity = {
                "model": _model_identity(self.module),
                "data": _data_identity(self.influence_src_dataloader.dataset, self.n_src),
            }
            for layer in self.layers:
                dtype = _store_dtype(test[layer].dtype)
                queries = test[layer].to(dtype)
                keys = self._source_activations(layer, tuple(queries.shape[1:]), dtype, identity, load_src_from_disk)
                zero_pairs: list[torch.Tensor] = []
                values, indices = merge_topk(
                    self._similarity_blocks(layer, queries, keys, zero_pairs),
                    min(top_k, self.n_src),
                    largest=self.similarity_direction == "max",
                )
                influences[layer] = KMostInfluentialResults(indices, values)
                zero = torch.cat(zero_pairs) if zero_pairs else torch.empty(0, 2, dtype=torch.long)
                if len(zero):
                    warnings.warn(
                        f"layers: layer {layer!r} has zero activation vectors, whose cosine similarity is "
                        f"undefined; their {len(zero)} [test_index, source_index] pairs got replace_nan="
                        f"{self.replace_nan} and are listed under 'zero_acts-{layer}'.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    influences[f"zero_acts-{layer}"] = zero[torch.argsort(zero[:, 0] * self.n_src + zero[:, 1])]
        return influences
