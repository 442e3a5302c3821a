"""TracIn with checkpoints (Pruthi et al. 2020): TracInCP over any parameters, and TracInCPFast,
the exact shortcut for a final Linear layer.

    TracInCP(z, z') = sum_c eta_c <g_c(z), g_c(z')>,    g_c(z) = d loss(z; theta_c) / d theta,

with eta_c the weight (learning rate) returned by ``checkpoints_load_func`` for checkpoint c.
Stacking v(z) = [sqrt(eta_1) g_1(z), ..., sqrt(eta_C) g_C(z)] turns the sum into one dot
product, TracInCP(z, z') = <v(z), v(z')>, so the scores, the top-k and the self-influence
||v(z)||^2 are all computed on the stacked vectors, each checkpoint loaded once per pass.

Every gradient comes from the backend's per-layer engine (``LayerGrads``: hooks, then vmap, then a
loop). A Linear layer's part of g is kept as factors (its inputs a and output gradients d, see
``_backend/layer_rules.py``) whenever their inner products cost less than explicit gradients:
(d . d')(a . a' + 1) instead of a dot product over out x (in + 1) entries.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional, Union, cast

import torch
from captum.influence._utils.common import KMostInfluentialResults
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, Dataset

from ._backend import (
    LayerGrads,
    Projector,
    VmapUnsupportedError,
    batch_size_of,
    fill_rows,
    param_shapes,
    select_param_names,
)
from ._backend.layer_rules import factorised_norms, factorised_scores, rule_for
from ._backend.sharding import iter_loader_shard, scores_sharded, topk_sharded
from ._checkpoints import LoadFunc
from ._data import call_model, logits_of, split_batch, to_device
from ._influence import Features, GradientFeatureInfluence, check_scores, keeps_model_state

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProjectionDim = Union[int, str, None]

# "auto" keeps explicit gradients exact up to this many dimensions per checkpoint, else projects
# them to _AUTO_PROJECTION_DIM (inner products then keep a relative error near 1/sqrt(4096) ~ 1.6%).
_AUTO_EXACT_DIM = 8192
_AUTO_PROJECTION_DIM = 4096
# Score-block budget in elements: factorised blocks hold n_q x n_k x T^2 position pairs.
_BLOCK_ELEMENTS = 2**24
_QUERY_BLOCK = 1024
_ARGS = {"train": "train_dataset", "inputs": "inputs"}  # the argument each role's data came from


def _check_loss_fn(loss_fn: Optional[LossFn], arg: str = "loss_fn") -> LossFn:
    if loss_fn is None:
        return nn.CrossEntropyLoss(reduction="none")
    if not callable(loss_fn):
        raise TypeError(
            f"{arg}: expected a loss module or a callable loss(outputs, labels); got {type(loss_fn).__name__}."
        )
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"{arg}: reduction must be 'none', 'sum' or 'mean'; got {reduction!r}.")
    return loss_fn


def _example_losses(loss_fn: LossFn, outputs: Any, labels: Any) -> torch.Tensor:
    """Each example's own loss, ``loss_fn(outputs[b:b+1], labels[b:b+1])`` summed: Tensor[B].

    ``outputs`` is what the model returned (a tensor, or a ModelOutput / dict of tensors). A loss
    with reduction "none" is called once on the batch (its values summed over all but the batch
    dimension); a reducing loss ("sum", "mean" or a plain callable) is applied to each example
    alone (vmap), so "sum" and "mean" give the same per-example loss, as in Captum."""
    n = batch_size_of((labels,), arg="labels")
    if getattr(loss_fn, "reduction", None) == "none" or n == 1:
        losses = loss_fn(outputs, labels)
        if not isinstance(losses, torch.Tensor) or losses.numel() % n or (losses.dim() and losses.shape[0] != n):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn: with reduction 'none' it must return per-example losses (shape ({n}, ...)); got {shape}."
            )
        return losses.reshape(n, -1).sum(1)
    leaves, spec = tree_flatten((outputs, labels))
    dims = tuple(0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else None for x in leaves)

    def one(*example: Any) -> torch.Tensor:
        o, y = tree_unflatten([x.unsqueeze(0) if d == 0 else x for x, d in zip(example, dims)], spec)
        return loss_fn(o, y).sum()

    return vmap(one, in_dims=dims)(*leaves)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def _check_flag(value: Any, arg: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{arg}: expected a bool; got {value!r}.")
    return value


def _check_projection_dim(projection_dim: ProjectionDim) -> None:
    if projection_dim is None or projection_dim == "auto":
        return
    if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0:
        raise ValueError(f"projection_dim: expected a positive int, 'auto' or None; got {projection_dim!r}.")


def _gradient_vectors(grads: dict[str, torch.Tensor], projector: Optional[Projector]) -> torch.Tensor:
    """Per-example gradients ``{name: (B, *shape)}`` flattened and concatenated, or projected: (B, d)."""
    if projector is not None:
        return projector.project(grads)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


@dataclass
class _Layout:
    """One checkpoint's row: ``[A, D]`` of each factored layer, then the explicit gradients of the
    other parameters (from the engine), maybe projected."""

    factored: list[tuple[str, int, int, int]] = field(default_factory=list)  # (layer, T, in [+ 1], out)
    projector: Optional[Projector] = None  # of the explicit gradients
    explicit_dim: int = 0  # the explicit gradients' width before projection

    def width(self, explicit: bool = False) -> int:
        """Entries of one checkpoint's row (``explicit``: factored layers as explicit gradients)."""
        factored = sum(w_in * w_out if explicit else t * (w_in + w_out) for _, t, w_in, w_out in self.factored)
        return factored + (self.projector.projection_dim if self.projector is not None else self.explicit_dim)


class _TracInBase(GradientFeatureInfluence):
    """Stacked per-checkpoint vectors, checkpoint-major (each checkpoint loaded once per pass), and
    their scores; subclasses say which matrix layers may be kept as factors (``_candidates``)."""

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Any,
        checkpoints_load_func: Optional[LoadFunc],
        *,
        loss_fn: Optional[LossFn],
        test_loss_fn: Optional[LossFn],
        params: Any,
        batch_size: int,
        projection_dim: ProjectionDim,
        device: Union[str, torch.device, None],
        show_progress: bool,
        seed: int,
        timeout: Optional[float],
    ):
        super().__init__(
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            batch_size=batch_size,
            device=device,
            show_progress=show_progress,
            timeout=timeout,
        )
        self._default_loss = loss_fn is None
        self.loss_fn = _check_loss_fn(loss_fn)
        self._default_test_loss = test_loss_fn is None and loss_fn is None
        self.test_loss_fn = self.loss_fn if test_loss_fn is None else _check_loss_fn(test_loss_fn, arg="test_loss_fn")
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        _check_projection_dim(projection_dim)
        self.param_names = select_param_names(model, params, arg="layers")
        grad_dim = sum(math.prod(shape) for shape in param_shapes(model, self.param_names).values())
        if isinstance(projection_dim, int) and projection_dim > grad_dim:
            warnings.warn(
                f"projection_dim: {projection_dim} is more than the {grad_dim} dimensions of the gradient of the "
                "selected parameters; exact gradients are cheaper and exact, so no projection is used "
                f"(pass an int <= {grad_dim} to project, or None to silence this).",
                stacklevel=3,
            )
            projection_dim = None
        self._engine = LayerGrads(model, self.param_names)
        self.projection_dim = projection_dim
        self.seed = seed
        self._layout: Optional[_Layout] = None
        self._train_cache: Optional[torch.Tensor] = None
        self._bars: dict[str, tuple[str, str]] = {}  # progress bar texts by role: (checkpoints, batches)

    @contextlib.contextmanager
    def _bar_texts(self, **roles: tuple[str, str]) -> Iterator[None]:
        """Captum's progress bar texts for one call: ``role=(checkpoints bar, batches bar)``."""
        before = self._bars
        self._bars = {**before, **roles}
        try:
            yield
        finally:
            self._bars = before

    # --- the layout of a row, chosen on the first batch -------------------------------------

    @property
    def projector(self) -> Optional[Projector]:
        """The Projector of the explicit gradients (None: exact), set on the first pass over data."""
        return self._layout.projector if self._layout is not None else None

    @property
    def _chosen_layout(self) -> _Layout:
        """The layout, once the first pass over data (``_stack``) has chosen it."""
        assert self._layout is not None, "the layout is chosen on the first pass over data"
        return self._layout

    def _candidates(self) -> list[str]:
        """Matrix layers (Linear) whose gradients may be kept as factors."""
        raise NotImplementedError

    def _not_factorable(self, layer: str) -> None:
        """A candidate the engine does not compute from its hooks alone (``engine.reasons`` says why)."""

    def _loss(self, model: nn.Module, *batch) -> torch.Tensor:
        """Each training example's own loss, Tensor[B]."""
        return self._losses(model, batch, self.loss_fn, self._default_loss)

    def _test_loss(self, model: nn.Module, *batch) -> torch.Tensor:
        """Each test example's own loss (``test_loss_fn``, else ``loss_fn``), Tensor[B]."""
        return self._losses(model, batch, self.test_loss_fn, self._default_test_loss)

    @staticmethod
    def _losses(model: nn.Module, batch: tuple, loss_fn: LossFn, default: bool) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        outputs = call_model(model, inputs)
        if default:  # cross-entropy of the logits, also of a ModelOutput's
            outputs = logits_of(outputs)
        return _example_losses(loss_fn, outputs, labels)

    @property
    def _score_dtype(self) -> torch.dtype:
        """Scores in the model's floating dtype (float64 in, float64 out), as in Captum."""
        return self._dtype

    def _layer_params(self, layer: str) -> dict[str, str]:
        """``{"weight": full name, "bias": full name}`` of a layer's own parameters."""
        prefix = f"{layer}." if layer else ""
        return {attr: prefix + attr for attr, _ in self.model.get_submodule(layer).named_parameters(recurse=False)}

    def _choose_layout(self, batch: tuple) -> _Layout:
        """Factor a candidate layer when exact (no ``projection_dim`` int), computed by the engine's
        hooks alone (after its check on this batch) and cheaper: T^2 (in + out) < out x in."""
        self._engine.check(self._loss, batch)
        candidates = []
        for layer in self._candidates():
            if self._engine.hooks_cover(self.model.get_submodule(layer)):
                candidates.append(layer)
            else:
                self._not_factorable(layer)
        modules = [self.model.get_submodule(layer) for layer in candidates]
        factors = self._engine.collect(self._loss, batch, factored=modules).factors if modules else {}
        layout = _Layout()
        for layer in candidates:
            a, d = factors[self._engine_path(layer)]
            t, width_in, width_out = a.shape[1], a.shape[2], d.shape[2]
            if not isinstance(self.projection_dim, int) and t * t * (width_in + width_out) < width_in * width_out:
                layout.factored.append((layer, t, width_in, width_out))
        in_factors = {n for layer, *_ in layout.factored for n in self._layer_params(layer).values()}
        explicit = [n for n in self.param_names if n not in in_factors]
        shapes = param_shapes(self.model, explicit)
        layout.explicit_dim = sum(math.prod(s) for s in shapes.values())
        k = self.projection_dim
        if k == "auto":
            k = _AUTO_PROJECTION_DIM if layout.explicit_dim > _AUTO_EXACT_DIM else None
        assert not isinstance(k, str)  # _check_projection_dim lets "auto" be the only string
        if k is not None and explicit:
            layout.projector = Projector(shapes, k, seed=self.seed, device=self.device)
        return layout

    def _engine_path(self, layer: str) -> str:
        """The engine's name for a layer (its first path in the model, the same module)."""
        return self._engine.path_of(self.model.get_submodule(layer))

    # --- rows ------------------------------------------------------------------------------

    def _rows(
        self,
        item: tuple[int, tuple],
        *,
        weight: float,
        index: int,
        arg: str,
        explicit: bool = False,
        loss: Optional[Callable] = None,
    ) -> torch.Tensor:
        """The vectors of the batch ``item = (start, batch)`` of ``arg`` at the loaded checkpoint
        ``index``, the gradients of ``loss`` (default: the training loss) scaled by sqrt(weight).
        ``explicit``: factored layers as explicit (flattened) gradients too. Raises, naming the
        examples, when a gradient is NaN or inf."""
        start, batch = item
        layout, root = self._chosen_layout, math.sqrt(weight)
        loss = loss or self._loss
        self._check_labels(batch, self.test_loss_fn if loss == self._test_loss else self.loss_fn, arg, start)
        modules = [self.model.get_submodule(layer) for layer, *_ in layout.factored]
        with self._failures(arg, start, batch, index):
            chunk = self._engine.collect(loss, batch, factored=modules)
        self._check_finite(
            [x for pair in chunk.factors.values() for x in pair] + list(chunk.grads.values()), arg, start, index
        )
        parts = []
        for (layer, t, _, _), module in zip(layout.factored, modules):
            a, d = chunk.factors[self._engine_path(layer)]
            if a.shape[1] != t:
                raise ValueError(
                    f"inputs: layer {layer!r} sees {a.shape[1]} positions in this batch and {t} in the first "
                    "one; factored scores need the same number in every batch (pad to one length, or pass "
                    "projection_dim=...)."
                )
            if explicit:
                rule, _ = rule_for(module)
                # _choose_layout factors only layers whose rule the engine's hooks cover
                assert rule is not None and rule.from_factors is not None
                grads = rule.from_factors(module, a, d)
                parts.append(_gradient_vectors({attr: grads[attr] for attr in self._layer_params(layer)}, None) * root)
            else:
                parts += [a.flatten(1), (d * root).flatten(1)]
        if chunk.grads:
            parts.append(_gradient_vectors(chunk.grads, layout.projector) * root)
        return torch.cat(parts, dim=1)

    # --- stacking over checkpoints ----------------------------------------------------------

    def _checkpoint_weights(self, desc: str) -> Iterator[tuple[int, float]]:
        for index, weight in self._iter_checkpoints(desc):
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"checkpoints_load_func: returned the weight {weight!r} for checkpoint {index}; TracIn "
                    "expects a finite non-negative learning rate (each checkpoint contributes eta_c * <g, g'>)."
                )
            tensors = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
            bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                raise ValueError(
                    f"checkpoints: checkpoint {index} holds NaN or inf in {bad[:10]}{' ...' if len(bad) > 10 else ''}; "
                    "every gradient and score at it would be NaN. Expected finite weights: drop or fix that checkpoint."
                )
            yield index, weight

    @staticmethod
    def _check_finite(parts: list[torch.Tensor], arg: str, start: int, index: int) -> None:
        """Refuse a batch whose per-example gradients (``parts``, (B, ...) each) are NaN or inf."""
        finite = torch.stack([torch.isfinite(p.reshape(p.shape[0], -1)).all(dim=1) for p in parts]).all(dim=0)
        if bool(finite.all()):
            return
        bad = ((~finite).nonzero().flatten() + start).tolist()
        raise ValueError(
            f"{arg}: the gradient of the loss at checkpoint {index} is NaN or inf for example indices "
            f"{bad[:20]}{' ...' if len(bad) > 20 else ''}; these examples (NaN or inf inputs, or labels the loss "
            "cannot take) need fixing before scores can be computed."
        )

    @staticmethod
    def _check_labels(batch: tuple, loss_fn: LossFn, arg: str, start: int) -> None:
        """Labels a cross-entropy (or NLL) loss cannot take, refused before any gradient: float
        labels of shape (B,) and negative class indices (indices past the last class are found
        when the loss fails, see :meth:`_failures`)."""
        labels = batch[-1]
        if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or not isinstance(labels, torch.Tensor):
            return
        if labels.is_floating_point():
            if labels.dim() == 1:
                raise TypeError(
                    f"{arg}: labels of dtype {labels.dtype} and shape {tuple(labels.shape)} for "
                    f"{type(loss_fn).__name__}; expected integer class indices (torch.long), or class "
                    "probabilities of shape (B, n_classes)."
                )
            return
        bad = ((labels < 0) & (labels != loss_fn.ignore_index)).nonzero().flatten()
        if len(bad):
            raise ValueError(
                f"{arg}: labels {labels[bad[:5]].tolist()} at example indices {(bad[:20] + start).tolist()} are "
                "negative; expected class indices in [0, n_classes)."
            )

    @contextlib.contextmanager
    def _failures(self, arg: str, start: int, batch: tuple, index: int) -> Iterator[None]:
        """A torch error of the model or loss on a batch of ``arg`` as a clear one: which examples,
        what they are (shapes and dtypes) against what the model holds."""
        try:
            yield
        except (RuntimeError, IndexError) as err:
            if isinstance(err, (VmapUnsupportedError, torch.OutOfMemoryError)):
                raise
            n = len(batch[-1]) if hasattr(batch[-1], "__len__") else 1
            given = ", ".join(_describe(x) for x in batch[:-1])
            text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            expected = "inputs of the shapes and dtype the model takes"
            if "Target" in text and "out of bounds" in text:  # cross-entropy's message
                expected = f"labels that are class indices in [0, {self._n_classes(batch)})"
            kind = TypeError if "dtype" in text or "scalar type" in text else ValueError
            raise kind(
                f"{arg}: the model or loss fails on examples {start}..{start + n - 1} at checkpoint {index} "
                f"({type(err).__name__}: {text}); given inputs {given} and labels {_describe(batch[-1])} for a "
                f"model of dtype {self._dtype}; expected {expected}."
            ) from err

    def _n_classes(self, batch: tuple) -> Any:
        """The model's number of outputs on ``batch`` ("n_classes" when the forward itself fails)."""
        try:
            with torch.no_grad():
                return logits_of(call_model(self.model, split_batch(batch)[0])).shape[-1]
        except Exception:  # only for a message: the original error is raised anyway
            return "n_classes"

    def _stack(
        self,
        featurise: Callable[[Callable, int, str], torch.Tensor],
        first_batch: Callable[[], tuple],
        n_rows: int,
        role: str,
        explicit: bool = False,
        loss: Optional[Callable] = None,
    ) -> torch.Tensor:
        """``[rows at checkpoint 1, ..., rows at checkpoint C]`` for every example: (n_rows, C * width).

        ``featurise(compute, width, desc)`` gives one checkpoint's (n_rows, width) rows of
        ``compute(batch)``; the layout, when not yet fixed, is chosen on ``first_batch()`` at the
        first checkpoint (the data's first batch, whichever rank asks, so that all ranks agree)."""
        out: Optional[torch.Tensor] = None
        checkpoints_desc, batches_desc = self._bars.get(role, (f"{role}: checkpoints", f"{role}: checkpoint"))
        for index, weight in self._checkpoint_weights(checkpoints_desc):
            if self._layout is None:
                batch = first_batch()
                self._check_labels(batch, self.loss_fn, _ARGS.get(role, role), 0)  # the layout's loss
                with self._failures(_ARGS.get(role, role), 0, batch, index):
                    self._layout = self._choose_layout(batch)
            width = self._layout.width(explicit)
            compute = partial(
                self._rows, weight=weight, index=index, arg=_ARGS.get(role, role), explicit=explicit, loss=loss
            )
            rows = featurise(compute, width, batches_desc)
            if out is None:
                out = torch.empty(n_rows, len(self.checkpoints), width, dtype=self._dtype)
            out[:, index] = rows
        assert out is not None
        return out.reshape(n_rows, -1)

    def _first_train_batch(self) -> tuple:
        _, batch = next(iter_loader_shard(self.train_loader, range(1)))
        if self._example_shapes is None:
            self._check_shapes(batch)
        return to_device(batch, self.device)

    def _train_features(self) -> torch.Tensor:
        """Stacked training rows, computed on first use and kept. Under ``torch.distributed`` each
        rank computes its shard of the batches and every rank gets all the rows (an all-reduce)."""
        if self._train_cache is None:

            def featurise(compute: Callable, width: int, desc: str) -> torch.Tensor:
                rows = self._featurise_train(self.n_train, width, compute, "train", desc, dtype=self._dtype)
                assert isinstance(rows, torch.Tensor)  # TracIn keeps no store, so no memmap
                return rows

            self._train_cache = self._stack(featurise, self._first_train_batch, self.n_train, "train")
        return self._train_cache

    def _test_features(self, inputs: Any, explicit: bool = False, loss: Optional[Callable] = None) -> torch.Tensor:
        """Stacked rows of ``inputs`` for the gradients of ``loss`` (default: the test loss)."""
        batches, n = self._test_batches(inputs)

        def featurise(compute: Callable, width: int, desc: str) -> torch.Tensor:
            rows = fill_rows(
                [(start, (start, batch)) for start, batch in batches],
                compute,
                n_rows=n,
                dim=width,
                n_batches=len(batches),
                show_progress=self.show_progress,
                desc=desc,
                dtype=self._dtype,
            )
            assert isinstance(rows, torch.Tensor)  # no store, so no memmap
            return rows

        return self._stack(featurise, lambda: batches[0][1], n, "inputs", explicit, loss or self._test_loss)

    @keeps_model_state
    def compute_intermediate_quantities(self, inputs: Any, aggregate: bool = False) -> torch.Tensor:
        """Stacked gradients v(z) = [sqrt(eta_c) g_c(z)]_c of the test loss, (n, C * d), whose dot
        products are the scores (the gradients in parameter order, factored layers first;
        projected ones last); ``aggregate``: their sum over the examples, (1, C * d).

        Args:
            inputs (tuple, Dataset or DataLoader): the examples, a batch ``(*model_inputs,
                labels)`` or a dataset of such tuples.
            aggregate (bool, optional): return the sum of the vectors over the examples.
                Default: False.

        Returns:
            Tensor: the vectors (n, C * d), with d the explicit (flattened, maybe projected)
            gradient width of one checkpoint; (1, C * d) with ``aggregate``.
        """
        vectors = self._test_features(inputs, explicit=True)
        return vectors.sum(0, keepdim=True) if aggregate else vectors

    # --- scores ------------------------------------------------------------------------------

    def _pair_scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores between rows: factored layers by factorised products, the rest by a dot product."""
        nq, nk, n_ckpt = queries.shape[0], keys.shape[0], len(self.checkpoints)
        q, k = queries.reshape(nq, n_ckpt, -1), keys.reshape(nk, n_ckpt, -1)
        out = queries.new_zeros(nq, nk)
        offset = 0
        for _, t, width_in, width_out in self._chosen_layout.factored:
            mid, stop = offset + t * width_in, offset + t * (width_in + width_out)
            for c in range(n_ckpt):
                out += factorised_scores(
                    q[:, c, offset:mid].reshape(nq, t, width_in),
                    q[:, c, mid:stop].reshape(nq, t, width_out),
                    k[:, c, offset:mid].reshape(nk, t, width_in),
                    k[:, c, mid:stop].reshape(nk, t, width_out),
                )
            offset = stop
        if offset < q.shape[2]:
            out += q[:, :, offset:].reshape(nq, -1) @ k[:, :, offset:].reshape(nk, -1).T
        return out

    def _key_block(self, n_queries: int) -> int:
        """Keys per score block for ``n_queries`` queries (within the element budget)."""
        positions = max([t for _, t, _, _ in self._chosen_layout.factored], default=1)
        return max(1, _BLOCK_ELEMENTS // (n_queries * positions**2))

    def _score_blocks(self, queries: torch.Tensor, keys: Features) -> Iterator[tuple[int, torch.Tensor]]:
        assert isinstance(keys, torch.Tensor)  # TracIn keeps no store: its keys are a tensor
        step = self._key_block(queries.shape[0])
        for start in range(0, keys.shape[0], step):
            yield start, self._pair_scores(queries, keys[start : start + step].to(queries.device))

    def _influence(
        self, inputs: Any, k: Optional[int], proponents: bool, aggregate: bool
    ) -> Union[torch.Tensor, KMostInfluentialResults]:
        """Scores and top-k found block by block without the full matrix; factored layers by their
        factorised products. Under ``torch.distributed`` the key blocks are split over the ranks and
        gathered, exactly as one process computes them."""
        name = self.get_name()
        goal = (
            "compute influence"
            if k is None
            else f"perform computation for getting {'proponents' if proponents else 'opponents'}"
        )
        batches = (
            f"Using {name} to compute influence for training batches"
            if k is None
            else f"Using {name} to {goal}. Processing training batches"
        )
        with self._bar_texts(train=(f"Using {name} to {goal}. Processing checkpoint", batches)):
            keys = self._train_features()  # also fixes the layout
        if not self._chosen_layout.factored:
            return super()._influence(inputs, k, proponents, aggregate)
        queries = self._test_features(inputs).to(self.device)
        blocks = [queries[qs : qs + _QUERY_BLOCK] for qs in range(0, queries.shape[0], _QUERY_BLOCK)] or [queries]

        def scores_of(q: torch.Tensor) -> torch.Tensor:
            return scores_sharded(
                q, keys, block_size=self._key_block(q.shape[0]), score_blocks=self._score_blocks, dtype=self._dtype
            )

        if aggregate:  # factorised scores are not linear in the factors: sum the score blocks
            # blocks is not empty, so the sum is a tensor, never the start value 0
            total = cast(torch.Tensor, sum(scores_of(q).sum(0, keepdim=True) for q in blocks))
            if k is None:
                return total
            order = torch.sort(total, dim=1, descending=bool(proponents), stable=True).indices[:, :k]
            return KMostInfluentialResults(order, total.gather(1, order))
        if k is None:
            parts = [scores_of(q) for q in blocks]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        top = [
            topk_sharded(
                q,
                keys,
                k,
                largest=bool(proponents),
                query_block_size=_QUERY_BLOCK,
                block_size=self._key_block(q.shape[0]),
                score_blocks=self._score_blocks,
                dtype=self._dtype,
            )
            for q in blocks
        ]
        return KMostInfluentialResults(torch.cat([i for _, i in top]), torch.cat([v for v, _ in top]))

    @keeps_model_state
    def self_influence(
        self, inputs: Any = None, show_progress: bool = False, outer_loop_by_checkpoints: bool = False
    ) -> torch.Tensor:
        """sum_c eta_c ||g_c(z)||^2 of the training loss for every example of ``inputs`` (the
        training set when None): Tensor[n]. Checkpoints are always the outer loop here (each loaded
        once), so ``outer_loop_by_checkpoints`` (Captum's choice of loop order) changes nothing.

        Args:
            inputs (tuple, Dataset or DataLoader, optional): the examples, a batch
                ``(*model_inputs, labels)`` or a dataset of such tuples. Default: None (the
                training set, whose rows are then kept).
            show_progress (bool, optional): tqdm bars over checkpoints and batches.
                Default: False.
            outer_loop_by_checkpoints (bool, optional): accepted for Captum's signature; changes
                nothing. Default: False.

        Returns:
            Tensor: the self-influence scores (n,), in the model's floating dtype.
        """
        with self._progress(show_progress):
            scores = self._self_influence(inputs)
        check_scores(scores[:, None], "self_influence", "")
        return scores

    def _self_influence(self, inputs: Any) -> torch.Tensor:
        what = f"Using {self.get_name()} to compute self influence. Processing"
        texts = (f"{what} checkpoint", f"{what} batch")
        with self._bar_texts(train=texts, inputs=texts):
            features = self._train_features() if inputs is None else self._test_features(inputs, loss=self._loss)
        if not self._chosen_layout.factored:
            return self._rowwise_scores(features, features, None, dtype=self._dtype)
        n, n_ckpt = features.shape[0], len(self.checkpoints)
        out = torch.empty(n, dtype=self._dtype)
        for start in range(0, n, _QUERY_BLOCK):
            rows = (
                features[start : start + _QUERY_BLOCK]
                .to(self.device, torch.float64)
                .reshape(-1, n_ckpt, features.shape[1] // n_ckpt)
            )
            total = rows.new_zeros(rows.shape[0])
            offset = 0
            for _, t, width_in, width_out in self._chosen_layout.factored:
                mid, stop = offset + t * width_in, offset + t * (width_in + width_out)
                for c in range(n_ckpt):
                    total += factorised_norms(
                        rows[:, c, offset:mid].reshape(-1, t, width_in), rows[:, c, mid:stop].reshape(-1, t, width_out)
                    )
                offset = stop
            total += rows[:, :, offset:].pow(2).sum((1, 2))
            out[start : start + rows.shape[0]] = total.cpu().to(self._dtype)
        return out


class TracInCP(_TracInBase):
    """TracInCP: sum over checkpoints of eta_c <grad loss(z'), grad loss(z)> over any parameters.

    Gradients are taken with respect to the parameters of ``layers`` only (names, module paths or
    modules; default every trainable parameter, BatchNorm, LayerNorm and Embedding ones included:
    nothing is left out). Every gradient comes from the backend's per-layer engine (hooks for
    Linear, Conv, norm and embedding layers, vmap then a loop for the rest, each fallback with a
    warning; checked once against single-example autograd). Each Linear (or transformers Conv1D)
    whose parameters are all selected, belong to it alone and come from its hooks is kept as
    factors (inputs a and output gradients d, scored by (d . d')(a . a' + 1) summed over
    positions) when that is cheaper than its explicit gradient. ``projection_dim`` (an int) projects
    every checkpoint's whole gradient with a seeded random Projector, scores then being unbiased
    estimates; "auto" factors what pays and projects the rest only when it exceeds 8192 dimensions;
    None keeps everything exact.

    ``loss_fn`` is a loss module with reduction "none", "sum" or "mean", or a callable
    loss(outputs, labels); each example's gradient is that of its own loss, whatever the
    reduction (default: cross-entropy); ``test_loss_fn`` (default ``loss_fn``) is the loss of the
    test side of ``influence`` and of ``compute_intermediate_quantities``, as in Captum.
    ``compute_intermediate_quantities`` returns the stacked vectors v(z) = [sqrt(eta_c) g_c(z)]_c,
    whose dot products are the scores. Training rows are kept after the first call (n_train x C x
    row width floats; use ``projection_dim`` for big models). Scores keep the model's dtype.

    Deliberate differences from Captum: the vectors are scaled by sqrt(eta_c) (Captum: eta_c), so
    that their dot products are the scores; ``compute_intermediate_quantities`` uses the test loss.
    Captum's ``sample_wise_grads_per_batch`` only chooses its faster path for per-example
    gradients; here they always come from the per-layer engine, so it is accepted and changes
    nothing. Unlike Captum, bad input raises ``ValueError``/``TypeError`` (not ``AssertionError``),
    and no NaN comes out: a NaN or inf gradient raises with the example indices and the argument
    (``train_dataset`` or ``inputs``), a checkpoint with NaN or inf weights raises with its index.

    Args:
        model (nn.Module): the network; ``model(*batch[:-1])`` gives its output.
        train_dataset (Dataset or DataLoader): a Dataset or fixed-order DataLoader of
            ``(*inputs, labels)`` tuples.
        checkpoints (str, list of str or list of dict): a directory (its files in natural order), a
            path, a list of paths or state dicts: the checkpoints c = 1..C.
        checkpoints_load_func (callable, optional): ``(model, checkpoint) -> float`` loading the
            checkpoint in place and returning its weight eta_c (the learning rate), which must be
            finite and non-negative. Default: load a state dict (also under "state_dict" or
            "model_state_dict"), weight 1.0.
        loss_fn (callable, optional): a loss module with reduction "none", "sum" or "mean", or a
            callable ``loss(outputs, labels)``; each example's gradient is that of its own loss.
            Default: None (``nn.CrossEntropyLoss(reduction="none")`` on the logits).
        layers (list of str or nn.Module, optional): parameter names, module paths or modules
            whose parameters are differentiated. Default: None (every trainable parameter).
        batch_size (int, optional): examples per gradient batch (a DataLoader keeps its own
            batches). Default: 64.
        test_loss_fn (callable, optional): the loss of the test side of ``influence`` and of
            ``compute_intermediate_quantities``, in the same forms as ``loss_fn``. Default: None
            (``loss_fn``).
        sample_wise_grads_per_batch (bool, optional): Captum's choice of per-example gradient
            path; accepted (a bool) and changes nothing. Default: False.
        projection_dim (int, str or None, optional): int k (project every checkpoint's explicit
            gradients with a seeded random Projector to k dimensions; a k larger than the gradient
            warns and keeps exact gradients), "auto" (project only when the explicit gradients
            exceed 8192 dimensions, to 4096) or None (exact). Default: None.
        device (str or torch.device, optional): where gradients are computed. Default: the
            model's.
        show_progress (bool, optional): tqdm bars over checkpoints and batches. Default: False.
        seed (int, optional): the projection's seed. Default: 0.
        timeout (float, optional): under ``torch.distributed``, the longest wait (seconds) for
            the other ranks at a collective; then a TimeoutError names the ranks that did not
            answer. Default: None (the process group's timeout).

    Example::

        >>> tracin = TracInCP(model, train_set, "checkpoints/", load_with_lr, layers=["fc"])
        >>> scores = tracin.influence((x_test, y_test))              # (n_test, n_train)
        >>> top = tracin.influence((x_test, y_test), k=5)            # indices, influence_scores
        >>> suspicious = tracin.self_influence().argsort(descending=True)
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Any,
        checkpoints_load_func: Optional[LoadFunc] = None,
        *,
        loss_fn: Optional[LossFn] = None,
        layers: Any = None,
        batch_size: int = 64,
        test_loss_fn: Optional[LossFn] = None,
        sample_wise_grads_per_batch: bool = False,
        projection_dim: ProjectionDim = None,
        device: Union[str, torch.device, None] = None,
        show_progress: bool = False,
        seed: int = 0,
        timeout: Optional[float] = None,
    ):
        super().__init__(
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn=loss_fn,
            test_loss_fn=test_loss_fn,
            params=layers,
            batch_size=batch_size,
            projection_dim=projection_dim,
            device=device,
            show_progress=show_progress,
            seed=seed,
            timeout=timeout,
        )
        self.layers = layers
        self.sample_wise_grads_per_batch = _check_flag(sample_wise_grads_per_batch, "sample_wise_grads_per_batch")

    def _candidates(self) -> list[str]:
        if isinstance(self.projection_dim, int):
            return []
        owners = Counter(id(p) for m in self.model.modules() for p in m.parameters(recurse=False))
        selected = set(self.param_names)
        candidates = []
        for name, module in self.model.named_modules():
            rule, _ = rule_for(module)
            own = list(module.parameters(recurse=False))
            if (
                rule is not None
                and rule.factors is not None
                and own
                and all(owners[id(p)] == 1 for p in own)
                and set(self._layer_params(name).values()) <= selected
            ):
                candidates.append(name)
        return candidates


class TracInCPFast(_TracInBase):
    """TracInCP restricted to a Linear layer, from its inputs and output gradients alone.

    For y = W a + b the gradient is dL/dW = d a^T and dL/db = d, with d = dL/dy, so

        <g, g'> = (d . d') (a . a' + 1)          (the "+ 1" is the bias; without bias: (d . d')(a . a'))

    and when the layer sees positions t (inputs (B, T, in), or several calls), g = sum_t d_t [a_t, 1]^T
    and <g, g'> = sum_{t,s} (d_t . d'_s)(a_t . a'_s + 1). Scores sum eta_c times this over checkpoints.
    Captum's TracInCPFast computes (d . d')(a . a') only: it omits the bias term, so its scores
    differ from the exact ones by sum_c eta_c (d . d'); these are exact.

    ``a`` is captured by a forward hook on ``final_fc_layer`` (the module or its name) and d for
    the whole batch by one backward pass from the loss to the layer output, so the layer need not
    be the model's last operation (checked once against autograd: its parameters must not be used
    outside its forward). Without projection the scores are computed factorised,
    n_test x n_train x T^2 x (in + out) operations instead of n_test x n_train x out x (in + 1),
    whenever that is cheaper; otherwise (or with ``projection_dim``) from the explicit gradients
    d a^T, which ``compute_intermediate_quantities`` returns (weight then bias, stacked over checkpoints).
    The gradients use the weight's actual shape (also after ``fc.weight.data`` was replaced).
    ``test_loss_fn`` as in :class:`TracInCP`; Captum's ``vectorize`` (its Jacobian option) is
    accepted and changes nothing.

    Args:
        model (nn.Module): the network; ``model(*batch[:-1])`` gives its output.
        final_fc_layer (nn.Module or str): an ``nn.Linear`` of ``model``, or its module path.
        train_dataset (Dataset or DataLoader): a Dataset or fixed-order DataLoader of
            ``(*inputs, labels)`` tuples.
        checkpoints (str, list of str or list of dict): a directory (its files in natural order), a
            path, a list of paths or state dicts: the checkpoints c = 1..C.
        checkpoints_load_func (callable, optional): ``(model, checkpoint) -> float`` loading the
            checkpoint in place and returning its weight eta_c (the learning rate), which must be
            finite and non-negative. Default: load a state dict (also under "state_dict" or
            "model_state_dict"), weight 1.0.
        loss_fn (callable, optional): a loss module with reduction "none", "sum" or "mean", or a
            callable ``loss(outputs, labels)``; each example's gradient is that of its own loss.
            Default: None (``nn.CrossEntropyLoss(reduction="none")`` on the logits).
        batch_size (int, optional): examples per gradient batch (a DataLoader keeps its own
            batches). Default: 64.
        test_loss_fn (callable, optional): the loss of the test side of ``influence`` and of
            ``compute_intermediate_quantities``, in the same forms as ``loss_fn``. Default: None
            (``loss_fn``).
        vectorize (bool, optional): Captum's Jacobian option; accepted (a bool) and changes
            nothing. Default: False.
        projection_dim (int, str or None, optional): int k (project every checkpoint's explicit
            gradients with a seeded random Projector to k dimensions; a k larger than the gradient
            warns and keeps exact gradients), "auto" (project only when the explicit gradients
            exceed 8192 dimensions, to 4096) or None (exact). Default: None.
        device (str or torch.device, optional): where gradients are computed. Default: the
            model's.
        show_progress (bool, optional): tqdm bars over checkpoints and batches. Default: False.
        seed (int, optional): the projection's seed. Default: 0.
        timeout (float, optional): under ``torch.distributed``, the longest wait (seconds) for
            the other ranks at a collective; then a TimeoutError names the ranks that did not
            answer. Default: None (the process group's timeout).

    Example::

        >>> fast = TracInCPFast(model, model.fc, train_set, checkpoints, load_with_lr)
        >>> fast.influence((x_test, y_test), k=10, proponents=False)   # opponents
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: Union[nn.Module, str],
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Any,
        checkpoints_load_func: Optional[LoadFunc] = None,
        *,
        loss_fn: Optional[LossFn] = None,
        batch_size: int = 64,
        test_loss_fn: Optional[LossFn] = None,
        vectorize: bool = False,
        projection_dim: ProjectionDim = None,
        device: Union[str, torch.device, None] = None,
        show_progress: bool = False,
        seed: int = 0,
        timeout: Optional[float] = None,
    ):
        layer_name = _linear_layer_name(model, final_fc_layer)
        super().__init__(
            model,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn=loss_fn,
            test_loss_fn=test_loss_fn,
            params=model.get_submodule(layer_name),
            batch_size=batch_size,
            projection_dim=projection_dim,
            device=device,
            show_progress=show_progress,
            seed=seed,
            timeout=timeout,
        )
        self.vectorize = _check_flag(vectorize, "vectorize")
        self.layer_name = layer_name
        self.final_fc_layer = model.get_submodule(layer_name)

    def _candidates(self) -> list[str]:
        return [self.layer_name]

    def _not_factorable(self, layer: str) -> None:
        """A layer whose weight is also used outside its forward has no gradient d a^T: refuse it.
        (Shared with another layer, or a forward that couples the examples: explicit gradients.)"""
        if set(self.param_names) & self._engine.used_outside:  # the layer's own parameters, tied names too
            raise ValueError(
                f"final_fc_layer: {layer!r} does not give its per-example gradients from its inputs and "
                f"output gradients ({self._engine.reasons[self._engine_path(layer)]}); use TracInCP with "
                "layers=[...] instead."
            )


def _linear_layer_name(model: nn.Module, layer: Union[nn.Module, str]) -> str:
    """The module path of ``layer`` (a module of ``model`` or its name), which must be an nn.Linear."""
    if isinstance(layer, str):
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(
                f"final_fc_layer: {layer!r} names no module of the model; its Linear layers are {names}."
            ) from None
        name = layer
    elif isinstance(layer, nn.Module):
        found = [n for n, m in model.named_modules() if m is layer]
        if not found:
            raise ValueError(
                f"final_fc_layer: the {type(layer).__name__} given is not a module of the model; "
                "pass the model's own layer (for example model.fc) or its name."
            )
        name, module = found[0], layer
    else:
        raise TypeError(f"final_fc_layer: expected an nn.Linear of the model or its name; got {type(layer).__name__}.")
    if not isinstance(module, nn.Linear):
        raise TypeError(f"final_fc_layer: expected an nn.Linear; {name or 'the model'!r} is a {type(module).__name__}.")
    return name
