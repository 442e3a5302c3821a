r"""Influence functions (Koh & Liang 2017) on the shared engine: Captum's ``NaiveInfluenceFunction``
and ``ArnoldiInfluenceFunction``, with a damping chosen from the training data.

The influence of training example z_i on a test example z is

    tau(z, z_i) = grad L_test(z)^T M grad L(z_i),     M ~ (H + lambda I)^{-1},

with H the Hessian of the training loss summed over the Hessian examples (Captum's convention:
``hessian_dataset``, by default the training set), lambda the damping (Captum's ``hessian_reg``)
and L_test the test loss (``test_loss_fn``, default ``loss_fn``). Positive: upweighting z_i
lowers the test loss. M is kept as directions and weights, M = V diag(w) V^T (+ a complement,
below), so that each example has an embedding psi(z) = diag(w)^{1/2} V^T grad L(z) and the scores
are dot products psi(z) . psi(z_i), computed blockwise (``GradientFeatureInfluence``).

* :class:`NaiveInfluenceFunction` forms H explicitly, a chunk of columns at a time (vmapped
  forward-over-reverse Hessian-vector products, ``_backend/hvp.py``), in float64, and takes its
  eigendecomposition.
* :class:`ArnoldiInfluenceFunction` never forms H: the (block) Arnoldi iteration builds a Krylov
  basis from Hessian-vector products, and the Ritz pairs of H restricted to it stand for the top
  eigenpairs (Schioppa et al. 2022).

Per-example gradients come from the engine (``LayerGrads``: hooks, then vmap, then a loop).

**Which directions, which weights.** An eigenpair (l, v) of H is kept when l + lambda >
``hessian_inverse_tol`` (Captum's rule; the "auto" tolerance equals lambda, which keeps exactly
the directions of positive curvature), at most ``projection_dim`` of them, the largest, each
with weight 1 / (l + lambda). With ``complement=True`` (default) every other direction, the
directions not kept and for Arnoldi those outside the Krylov subspace, gets the weight 1 / lambda
of zero curvature: M = V diag(1/(l + lambda)) V^T + (I - V V^T) / lambda, which is
(H_+ + lambda I)^{-1} for the positive part H_+ of H when every positive direction is kept. A
low-rank M without it (Captum's, ``complement=False``) drops whatever the kept directions miss,
and on digits that costs more LDS than the eigenvectors add (0.44 against 0.57 with 50
eigenvectors, 0.55 against 0.58 with a 200-dimensional Krylov subspace: benchmarks/lds.py setup,
one model, damping of the order of the "auto" one).

**damping="auto".** ``hessian_reg="auto"`` is

    lambda = sum_i sum_j c_ij^2 / sum_i sum_j c_ij,        c_ij = v_j^T G_i v_j,

where G_i = J_i^T Lambda_i J_i is training example i's Gauss-Newton matrix (J_i the Jacobian of
the model's output, Lambda_i the loss's Hessian in the output) and v_j the directions of the
method's own eigenbasis (the Hessian's eigenvectors for the naive method, the Ritz vectors for
Arnoldi, the Kronecker eigenbasis of each layer for EK-FAC). c_ij is the curvature that example i
contributes along direction j (sum_j c_ij = tr(G_i)), and lambda its mean weighted by itself:
one example's worth of curvature along one direction. It uses the training examples and the
model alone: no test labels, no retrained models. The sum over j runs over the top 256
directions, which hold nearly all of the numerator (the denominator is exact).

Why it finds the good window: the influence function is a first-order expansion in the weights of
the training examples. Along direction j the curvature is l_j = sum_i c_ij, and removing example i
takes c_ij of it away. Where l_j is many times a single example's contribution, many examples
determine the direction and the linear response is accurate: lambda barely changes its weight
1 / (l_j + lambda). Where l_j is comparable to one example's contribution (the flat directions,
and those where the Hessian is indefinite: it has hundreds of small negative eigenvalues on the
digits MLPs), one or two examples set the parameters, retraining does not respond linearly and
the undamped inverse extrapolates noise; lambda caps their weight near 1 / lambda. The rule
adapts to how each example's curvature spreads over the basis: it never exceeds the
curvature-weighted mean of tr(G_i), which TRAK's "auto" (tr(G) / n) approximates and which it
reaches when each example's curvature lies along one direction, and an approximation whose basis
spreads an example's curvature thinner (EK-FAC's Kronecker basis) gets a smaller damping, as its
LDS optimum is. Measured with one model, default settings: LDS 0.69 on the benchmarks/lds.py
setup (undamped: 0.10; the exact influence function's best over a damping sweep: 0.70) and 0.69
on the 64-128-10 digits MLP (seed 0). Captum's own rule (fixed ``hessian_reg``, keep l + lambda >
tol) is fragile where H is indefinite: directions with l just above -lambda get weights far above
1 / lambda (LDS 0.29 at lambda = tr(G) / n on the first setup). The "auto" tolerance keeps only
directions of positive curvature, which avoids that.

With numbers for ``hessian_reg`` and ``hessian_inverse_tol`` and ``complement=False`` the
directions and weights are exactly Captum's (see the tests), and so are the scores.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._backend import FeatureStore, LayerGrads, Projector, param_shapes, select_param_names
from ._backend.hvp import HessianVectorProducts, ParamLayout, arnoldi, column_chunk, ritz_pairs, symmetric_eigh
from ._backend.hvp_gauss_newton import output_hessians, probe_columns, softmax_cross_entropy_hessians
from ._backend.sharding import _all_reduce_sum, barrier, iter_loader_shard, rank_and_world, shard_range, shared_array
from ._backend.store import data_fingerprint, model_fingerprint
from ._checkpoints import LoadFunc
from ._data import as_loader, call_model, check_labelled, logits_of, split_batch, to_device
from ._influence import GradientFeatureInfluence, check_scores, keeps_model_state
from ._progress import progress
from .tasks import ClassificationOutput, ModelOutput, get_task
from .tracin import _check_flag, _check_loss_fn, _example_losses
from .trak import _check_seed, _checkpoint_identity, _task_identity

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Task losses that are cross-entropy of logits / temperature (closed-form output Hessians).
_CROSS_ENTROPY_TASK_LOSSES = (ClassificationOutput.loss,)
# The complement (I - V V^T) g of Arnoldi is kept exactly up to this many parameters, else it is
# projected to _COMPLEMENT_PROJECTION_DIM dimensions by the engine's seeded Projector.
_COMPLEMENT_EXACT_DIM = 16384
_COMPLEMENT_PROJECTION_DIM = 4096
# Gauss-Newton probes per example: exact up to this many output dimensions, else a sketch.
_MAX_PROBES = 32
# The loss's Hessians in the model's output by autograd (B x C x C float64) are refused beyond it.
_AUTOGRAD_HESSIAN_BYTES = 2**31
# "auto" damping: the top eigenvectors on which each example's curvature is measured.
_SHARE_DIRECTIONS = 256


def _describe_callable(fn: Any) -> dict:
    """A loss function's identity for the store: its class or qualified name, its settings, and
    the source of a function or class defined outside torch."""
    target = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    entry = {"name": f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"}
    if isinstance(fn, nn.Module):
        entry["settings"] = fn.extra_repr()
        entry["reduction"] = str(getattr(fn, "reduction", None))
    if not str(getattr(target, "__module__", "")).startswith("torch."):
        try:
            entry["source_sha256"] = hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]
        except (OSError, TypeError):
            pass
    return entry


class _Objective:
    """The training loss, the test function and the model output the influence functions use.

    Two forms, as in TRAK and TracIn: ``loss_fn`` (and ``test_loss_fn``), a loss of the model's
    outputs and the labels (TracIn's and Captum's form; default cross-entropy of the logits), or
    ``task``, a ``ModelOutput``: the training loss is ``task.loss`` and the test side is the
    task's output f, whose influence is that of the "test loss" -f (positive: raises f).
    """

    def __init__(self, loss_fn: Optional[LossFn], test_loss_fn: Optional[LossFn], task: Any):
        if task is not None and (loss_fn is not None or test_loss_fn is not None):
            raise ValueError(
                "task: pass either task (a ModelOutput: its loss is the training loss, its output f the "
                "test side) or loss_fn / test_loss_fn, not both."
            )
        self.task: Optional[ModelOutput] = get_task(task) if task is not None else None
        if self.task is not None and type(self.task).loss is ModelOutput.loss:
            raise ValueError(
                f"task: {type(self.task).__name__} defines no loss(model, batch); influence functions "
                "differentiate the training loss twice. Define loss in the task, or pass loss_fn."
            )
        self.default = loss_fn is None
        self.loss_fn = _check_loss_fn(loss_fn)
        self.default_test = test_loss_fn is None and loss_fn is None
        self.test_loss_fn = self.loss_fn if test_loss_fn is None else _check_loss_fn(test_loss_fn, arg="test_loss_fn")

    # --- per-example functions for the engine: fn(model, *batch) -> Tensor[B] ---------------

    def train_loss(self, model: nn.Module, *batch: Any) -> torch.Tensor:
        if self.task is not None:
            return self.task.loss(model, batch)
        return self._losses(model, batch, self.loss_fn, self.default)

    def test_loss(self, model: nn.Module, *batch: Any) -> torch.Tensor:
        if self.task is not None:
            return -self.task.output(model, batch)
        return self._losses(model, batch, self.test_loss_fn, self.default_test)

    @staticmethod
    def _losses(model: nn.Module, batch: tuple, loss_fn: LossFn, default: bool) -> torch.Tensor:
        inputs, labels = split_batch(batch)
        outputs = call_model(model, inputs)
        if default:
            outputs = logits_of(outputs)
        return _example_losses(loss_fn, outputs, labels)

    # --- the model output and the loss as a function of it (Gauss-Newton) -------------------

    def model_output(self, model: nn.Module, batch: tuple) -> Any:
        """What the model returns for the batch, as the loss sees it: a tensor, a dict or a
        transformers output (for a task, captured from the task's one model call)."""
        if self.task is None:
            inputs, _ = split_batch(batch)
            return call_model(model, inputs)
        captured: list = []
        handle = model.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.task.output(model, batch)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ValueError(
                f"task: {type(self.task).__name__}.output calls the model {len(captured)} times; the Gauss-Newton "
                "curvature (damping 'auto', EKFACInfluence) needs one call. Pass a float damping, or loss_fn "
                "instead of task."
            )
        return captured[0]

    @staticmethod
    def logits(raw: Any) -> torch.Tensor:
        """The output tensor y of a model's return value: itself, or its ``logits``."""
        if isinstance(raw, torch.Tensor):
            return raw
        try:
            return logits_of(raw)
        except ValueError:
            raise ValueError(
                f"model: forward returns a {type(raw).__name__}; the Gauss-Newton curvature (damping 'auto', "
                "EKFACInfluence) needs a tensor output or one with a 'logits' tensor."
            ) from None

    def output(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """The model's output y for the batch, flattened to (B, C), differentiable."""
        y = self.logits(self.model_output(model, batch))
        return y.reshape(y.shape[0], -1)

    def loss_of_output(self, model: nn.Module, batch: tuple, raw: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        """``o -> per-example losses`` when the model's output y is replaced by o (B, C): o takes
        y's shape and y's place in what the model returns (``raw``, from :meth:`model_output`)."""
        _, labels = split_batch(batch)
        shape = self.logits(raw).shape
        if self.task is None:
            default = self.default
            return lambda o: _example_losses(
                self.loss_fn, o.reshape(shape) if default else _with_logits(raw, o.reshape(shape)), labels
            )
        task = self.task

        def loss(o: torch.Tensor) -> torch.Tensor:
            handle = model.register_forward_hook(lambda module, args, out: _with_logits(out, o.reshape(shape)))
            try:
                return task.loss(model, batch)
            finally:
                handle.remove()

        return loss

    def output_hessians(self, model: nn.Module, batch: tuple, raw: Any) -> torch.Tensor:
        """Lambda (B, C, C): each example's Hessian of its training loss in the model's output y
        (flattened), for the model's return value ``raw``; in closed form for cross-entropy of
        logits (the default loss, ``nn.CrossEntropyLoss`` without class weights or label smoothing,
        ``ClassificationOutput``), else by autograd."""
        y = self.logits(raw)
        out = y.reshape(y.shape[0], -1)
        task = self.task
        if task is not None and type(task).loss in _CROSS_ENTROPY_TASK_LOSSES:
            return softmax_cross_entropy_hessians(out, cast(ClassificationOutput, task).temperature).to(out.dtype)
        loss_fn = self.loss_fn
        if (
            task is None
            and isinstance(loss_fn, nn.CrossEntropyLoss)
            and loss_fn.weight is None
            and loss_fn.label_smoothing == 0
            and y.dim() == 2
        ):
            _, labels = split_batch(batch)
            if isinstance(labels, torch.Tensor) and not labels.dtype.is_floating_point and labels.dim() == 1:
                hessians = softmax_cross_entropy_hessians(out).to(out.dtype)
                ignored = labels == loss_fn.ignore_index  # no loss there: no curvature
                return hessians * (~ignored).to(hessians.dtype)[:, None, None]
        need = 8 * out.shape[0] * out.shape[1] ** 2
        if need > _AUTOGRAD_HESSIAN_BYTES:
            raise ValueError(
                f"loss_fn: the Gauss-Newton curvature (damping 'auto', EKFACInfluence) needs each example's Hessian "
                f"of its loss in the model's output, here {out.shape[1]} x {out.shape[1]} (the output flattened) "
                f"by autograd, {need / 2**30:.1f} GiB for this batch of {out.shape[0]}; use a smaller batch_size, "
                "or with NaiveInfluenceFunction / ArnoldiInfluenceFunction a float hessian_reg."
            )
        return output_hessians(out, self.loss_of_output(model, batch, raw))

    def identity(self) -> dict:
        if self.task is not None:
            return {"task": _task_identity(self.task)}
        return {"loss_fn": _describe_callable(self.loss_fn), "test_loss_fn": _describe_callable(self.test_loss_fn)}


def _with_logits(raw: Any, logits: torch.Tensor) -> Any:
    """A model's return value with its output tensor replaced: ``logits`` for a tensor, else a
    copy of the dict or transformers output with ``logits`` in place of its own."""
    if isinstance(raw, torch.Tensor):
        return logits
    if isinstance(raw, Mapping):
        fields = dict(raw)
        fields["logits"] = logits
        return type(raw)(**fields)
    new = copy.copy(raw)
    new.logits = logits
    return new


def _check_reg(value: Any, arg: str, why: str = "") -> Union[float, str]:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{arg}: expected a float >= 0 or 'auto'; got {value!r}{why}.")
    return float(value)


def _check_tol(value: Any, arg: str) -> Union[float, str]:
    return _check_reg(value, arg, " (an eigenvalue of H + hessian_reg I at or below it is not inverted)")


def _check_count(value: Any, arg: str) -> Optional[int]:
    return None if value is None else _check_positive(value, arg, " or None")


def _check_positive(value: Any, arg: str, alternative: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{arg}: expected a positive int{alternative}; got {value!r}.")
    return value


def _checkpoint_list(model: nn.Module, checkpoint: Any) -> list:
    """The one checkpoint as the base class's list; None: the model's weights now (copied)."""
    if checkpoint is None:
        return [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    if isinstance(checkpoint, (list, tuple)):
        if len(checkpoint) != 1:
            raise ValueError(
                f"checkpoint: influence functions use one checkpoint (a path or a state dict); got a list of "
                f"{len(checkpoint)}. Use TRAK or TracInCP for several."
            )
        return list(checkpoint)
    return [checkpoint]


def _memory_limit() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


@dataclass
class _Solve:
    """M = V diag(w) V^T [+ (I - V V^T) / damping]: psi(g) = [w^{1/2} * (V^T g), complement]."""

    vectors: torch.Tensor  # V (p, r), float64
    weights: torch.Tensor  # w (r,), float64
    damping: float
    layout: ParamLayout
    complement: bool = False
    projector: Optional[Projector] = None  # of the complement, when p is large

    @property
    def dim(self) -> int:
        extra = 0
        if self.complement:
            extra = self.projector.projection_dim if self.projector is not None else self.vectors.shape[0]
        return self.vectors.shape[1] + extra

    def embed(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, dim) float64 embeddings of per-example gradients ``{name: (B, *shape)}``."""
        flat = self.layout.flatten(grads, 1, torch.float64)
        vectors = self.vectors.to(flat.device)
        coords = flat @ vectors
        parts = [coords * self.weights.to(flat.device).sqrt()]
        if self.complement:
            rest = (flat - coords @ vectors.T) / math.sqrt(self.damping)
            if self.projector is not None:
                rest = self.projector.project(rest.to(self.projector.dtype)).to(torch.float64)
            parts.append(rest)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class _CurvatureInfluence(GradientFeatureInfluence):
    """What the three influence functions share: the objective, the checkpoint, the engine, the
    Hessian examples (sharded under torch.distributed), the "auto" damping, the embeddings of the
    training set (in the store when there is one) and Captum's method signatures."""

    _method = "influence function"

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoint: Any,
        checkpoints_load_func: Optional[LoadFunc],
        *,
        layers: Any,
        loss_fn: Optional[LossFn],
        batch_size: Optional[int],
        hessian_dataset: Optional[Union[Dataset, DataLoader]],
        test_loss_fn: Optional[LossFn],
        sample_wise_grads_per_batch: bool,
        task: Any,
        device: Union[str, torch.device, None],
        store_dir: Union[str, os.PathLike, None],
        show_progress: bool,
        timeout: Optional[float],
    ):
        if batch_size is None:  # Captum allows None when both datasets are DataLoaders
            batch_size = 64
        super().__init__(
            model,
            train_dataset,
            _checkpoint_list(model, checkpoint),
            checkpoints_load_func,
            batch_size=batch_size,
            device=device,
            show_progress=show_progress,
            timeout=timeout,
        )
        self.checkpoint = checkpoint
        self.objective = _Objective(loss_fn, test_loss_fn, task)
        self.loss_fn, self.test_loss_fn, self.task = (
            self.objective.loss_fn,
            self.objective.test_loss_fn,
            self.objective.task,
        )
        self.sample_wise_grads_per_batch = _check_flag(sample_wise_grads_per_batch, "sample_wise_grads_per_batch")
        self.layers = layers
        self.param_names = select_param_names(model, layers, arg="layers")
        self.layout = ParamLayout(model, self.param_names)
        self._engine = LayerGrads(model, self.param_names)
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if hessian_dataset is None:
            self.hessian_loader = self.train_loader
        else:
            self.hessian_loader = as_loader(hessian_dataset, batch_size, arg="hessian_dataset")
            check_labelled(self.hessian_loader, arg="hessian_dataset")
        self.hessian_dataset = hessian_dataset
        self.n_hessian = len(self.hessian_loader.dataset)  # type: ignore[arg-type]
        self._store_dir = store_dir
        self._solve: Any = None
        self._keys: Any = None
        #: the damping used once fitted ("auto" resolved from the training data): a float, or for
        #: EKFACInfluence a dict of floats by layer
        self.damping_: Union[float, dict, None] = None

    def _the_store(self) -> FeatureStore:
        """The store (for the methods that only run when there is one)."""
        assert self.store is not None
        return self.store

    def _open_store(self) -> None:
        """The store is opened once the subclass's settings are set (they enter its metadata)."""
        if self._store_dir is not None:
            self.store = FeatureStore(self._store_dir, self._metadata())

    # --- settings and their identity ---------------------------------------------------------

    def _settings(self) -> dict:
        raise NotImplementedError

    def _metadata(self) -> dict:
        meta = {
            "method": type(self).__name__,
            "model": model_fingerprint(self.model),
            "data": data_fingerprint(self.train_loader),
            "layers": self.param_names,
            "checkpoints": [_checkpoint_identity(c) for c in self.checkpoints],
            "objective": self.objective.identity(),
            "settings": self._settings(),
            "n_train": self.n_train,
            "batch_size": self.batch_size,
        }
        if self.hessian_loader is not self.train_loader:
            meta["hessian_data"] = data_fingerprint(self.hessian_loader)
        return meta

    @property
    def _score_dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def _key_dtype(self) -> torch.dtype:
        return torch.float64 if self._dtype == torch.float64 else torch.float32

    # --- batches ----------------------------------------------------------------------------

    def _hessian_batches(self, desc: str) -> Iterator[tuple[int, tuple]]:
        """``(start, batch)`` of this rank's share of the Hessian examples, on the device."""
        rank, world = rank_and_world()
        loader = self.hessian_loader
        mine = shard_range(len(loader), rank, world)
        bar = progress(total=len(mine), desc=desc, show=self.show_progress)
        for start, batch in iter_loader_shard(loader, mine):
            if self._example_shapes is None:
                self._check_shapes(batch)
            yield start, to_device(batch, self.device)
            bar.update()
        bar.close()

    @property
    def _hessian_arg(self) -> str:
        """The argument the Hessian examples came from, for error messages."""
        return "hessian_dataset" if self.hessian_dataset is not None else "train_dataset"

    @staticmethod
    def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
        return _all_reduce_sum(tensor) if rank_and_world()[1] > 1 else tensor

    def _check_forward(self, fn: Callable, batch: tuple, start: int, arg: str) -> None:
        """A plain forward of ``fn`` first: a batch the model or the loss cannot take (labels out
        of range, wrong shapes) fails clearly, naming the argument and the examples."""
        n = len(batch[-1]) if hasattr(batch[-1], "__len__") else 1
        try:
            with torch.no_grad():
                out = fn(self.model, *batch)
        except ValueError as err:
            raise ValueError(f"{arg}: the loss fails on examples {start}..{start + n - 1}: {err}") from err
        except (AttributeError, IndexError, RuntimeError, TypeError) as err:
            raise ValueError(
                f"{arg}: the loss fails on examples {start}..{start + n - 1} ({type(err).__name__}: {err}); "
                "expected inputs of the shape the model takes and labels the loss accepts (a batch "
                "(*tensors, labels) calls model(*tensors) positionally, ({name: tensor}, labels) with keywords)."
            ) from err
        if not isinstance(out, torch.Tensor) or out.shape != (n,):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss_fn: must give one loss per example, shape ({n},); got {got} for {arg}.")

    def _grads(self, fn: Callable, batch: tuple, start: int, arg: str) -> dict[str, torch.Tensor]:
        """Per-example gradients of ``fn`` for a batch, from the engine, checked to be finite."""
        self._check_forward(fn, batch, start, arg)
        grads = self._engine.collect(fn, batch).grads
        bad = torch.zeros(len(batch[-1]), dtype=torch.bool, device=next(iter(grads.values())).device)
        for g in grads.values():
            bad |= ~torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            indices = (bad.nonzero().flatten() + start).tolist()
            raise ValueError(
                f"{arg}: the gradient of the loss is NaN or inf for example indices {indices[:20]}"
                f"{' ...' if len(indices) > 20 else ''}; these examples (or the checkpoint) need fixing before "
                "influence can be computed."
            )
        return grads

    # --- the "auto" damping: one example's worth of Gauss-Newton curvature --------------------

    def _probe_fn(self, model: nn.Module, *chunk: Any) -> torch.Tensor:
        """u . y for the probe u carried as the chunk's last tensor (sliced with the examples)."""
        batch, probe = tuple(chunk[:-1]), chunk[-1]
        return (self.objective.output(model, batch) * probe).sum(-1)

    def _probes(self, batch: tuple, seed: int) -> torch.Tensor:
        """The Gauss-Newton probe columns U (B, C, r) of a batch (``hvp_gauss_newton``)."""
        with torch.no_grad():
            raw = self.objective.model_output(self.model, batch)
        hessians = self.objective.output_hessians(self.model, batch, raw)
        generator = torch.Generator().manual_seed(seed)
        return probe_columns(hessians, max_probes=_MAX_PROBES, generator=generator).to(self.objective.logits(raw).dtype)

    def _curvature_share(self, directions: torch.Tensor) -> float:
        """The "auto" damping for the orthonormal ``directions`` (p, k) of the curvature's top
        eigenbasis: sum_i sum_j c_ij^2 / sum_i tr(G_i), with c_ij = v_j^T G_i v_j the Gauss-Newton
        curvature example i puts on direction j (module docstring). Directions beyond the top k
        hold little of the numerator; the denominator is the exact trace."""
        square = torch.zeros(2, dtype=torch.float64)  # sum c^2, sum tr(G_i)
        arg = self._hessian_arg
        basis = directions.to(self.device, torch.float32 if self._dtype != torch.float64 else torch.float64)
        for start, batch in self._hessian_batches("damping: curvature per example and direction"):
            self._check_forward(self.objective.train_loss, batch, start, arg)
            probes = self._probes(batch, start)
            share = torch.zeros(len(batch[-1]), basis.shape[1], dtype=torch.float64, device=self.device)
            for c in range(probes.shape[2]):
                grads = self._engine.collect(self._probe_fn, (*batch, probes[:, :, c])).grads
                flat = self.layout.flatten(grads, 1).to(basis.dtype)
                share += (flat @ basis).to(torch.float64).pow(2)
                square[1] += float(flat.to(torch.float64).pow(2).sum())
            square[0] += float(share.pow(2).sum())
        square = self._sum_over_ranks(square)
        return float(square[0] / square[1]) if float(square[1]) > 0 else 0.0

    def _resolve_damping(self, damping: Union[float, str], values: torch.Tensor, vectors: torch.Tensor) -> float:
        """``damping``, or for "auto" the curvature share of the top (at most 256) eigenvectors."""
        if damping != "auto":
            return float(damping)
        top = vectors[:, torch.argsort(values, descending=True)[: min(_SHARE_DIRECTIONS, len(values))]]
        value = self._curvature_share(top)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                "hessian_reg: 'auto' found no Gauss-Newton curvature in the Hessian examples (every example's "
                "loss is flat in the model's output); pass a float hessian_reg > 0."
            )
        return value

    # --- fitting and embeddings ---------------------------------------------------------------

    def _fit_curvature(self) -> Any:
        """The preconditioner at the loaded checkpoint (an object with ``dim`` and ``embed``)."""
        raise NotImplementedError

    def _stored_solve(self) -> Any:
        return None

    def _save_solve(self, solve: Any) -> None:
        pass

    def _fit(self) -> tuple[Any, Any]:
        if self._keys is not None:
            return self._solve, self._keys
        for _ in self._iter_checkpoints(f"{self.get_name()}: checkpoint"):
            solve = self._solve or (self._stored_solve() if self.store is not None else None)
            if solve is None:
                solve = self._fit_curvature()
                if self.store is not None:
                    self._save_solve(solve)
                    self._forget_keys()
            self._solve = solve
            self.damping_ = float(solve.damping) if not isinstance(solve.damping, dict) else solve.damping

            def compute(item: tuple) -> torch.Tensor:
                start, batch = item
                return solve.embed(self._grads(self.objective.train_loss, batch, start, "train_dataset"))

            self._keys = self._featurise_train(
                self.n_train, solve.dim, compute, name="keys", desc="training set", dtype=self._key_dtype
            )
        return self._solve, self._keys

    def _forget_keys(self) -> None:
        """A new solve: every stored embedding of the training set is computed again (its batches
        marked unfinished on every rank, which then wait for each other before featurising)."""
        store = self._the_store()
        if (store.path / "keys.done.npy").exists():
            done = shared_array(store, "keys.done", (len(self.train_loader),), np.uint8)
            for name in ("keys", "keys.done", "keys.sums"):
                store.unfinish(name)
            done[:] = 0
            done.flush()
        barrier()

    def _train_features(self):
        return self._fit()[1]

    def _embed(self, inputs: Any, test: bool) -> torch.Tensor:
        """psi of the examples of ``inputs`` (a batch tuple, Dataset or DataLoader), of the test loss
        (``test``) or the training loss: (n, dim) in the model's dtype."""
        solve, _ = self._fit()
        batches, n = self._test_batches(inputs)
        fn = self.objective.test_loss if test else self.objective.train_loss
        out = torch.empty(n, solve.dim, dtype=self._dtype)
        for _ in self._iter_checkpoints(f"{self.get_name()}: checkpoint"):
            for start, batch in progress(batches, desc="inputs", show=self.show_progress):
                rows = solve.embed(self._grads(fn, batch, start, "inputs"))
                out[start : start + rows.shape[0]] = rows.to("cpu", self._dtype)
        return out

    def _test_features(self, inputs: Any) -> torch.Tensor:
        return self._embed(inputs, test=True)

    # --- Captum's methods ------------------------------------------------------------------------

    @keeps_model_state
    def compute_intermediate_quantities(
        self,
        inputs_dataset: Any,
        aggregate: bool = False,
        show_progress: bool = False,
        return_on_cpu: bool = True,
        test: bool = False,
    ) -> torch.Tensor:
        """The embeddings psi(z) (n, dim), whose dot products are the scores: ``influence(z)[:, i]``
        is ``psi_test(z) . psi(z_i)``. ``test``: of the test loss (else the training loss), as in
        Captum; ``aggregate``: their sum (1, dim); ``return_on_cpu``: else on the model's device."""
        with self._progress(show_progress):
            psi = self._embed(inputs_dataset, test=bool(test))
        if aggregate:
            psi = psi.sum(0, keepdim=True)
        return psi if return_on_cpu else psi.to(self.device)

    @keeps_model_state
    def self_influence(self, inputs_dataset: Any = None, show_progress: bool = False) -> torch.Tensor:
        """grad L(z)^T M grad L(z) = |psi(z)|^2 of the training loss for each example of
        ``inputs_dataset`` (the training set when None): Tensor[n]."""
        with self._progress(show_progress):
            if inputs_dataset is None:
                _, keys = self._fit()
                scores = self._rowwise_scores(keys, keys, None, dtype=self._dtype)
            else:
                psi = self._embed(inputs_dataset, test=False)
                scores = self._rowwise_scores(psi, psi, None, dtype=self._dtype)
        check_scores(scores[:, None], "self_influence", "")
        return scores


def _select(values: torch.Tensor, damping: float, tol: Union[float, str], count: Optional[int]) -> torch.Tensor:
    """Indices (ascending eigenvalue) of the eigenpairs kept: l + damping > tol ("auto": tol =
    damping, so l > 0), the largest ``count`` of them when given."""
    threshold = damping if tol == "auto" else float(tol)
    index = (values + damping > threshold).nonzero().flatten()
    return index[-count:] if count is not None else index


def _no_positive_error(what: str) -> ValueError:
    return ValueError(
        f"hessian_reg: {what} has no eigenvalue above hessian_inverse_tol after damping, so there is nothing to "
        "invert; use a larger hessian_reg, a smaller hessian_inverse_tol, or complement=True."
    )


class _EigenInfluence(_CurvatureInfluence):
    """Naive and Arnoldi: M from eigenpairs of H (directions V, weights w), Captum's options for
    choosing them, and the solve kept in the store as two tensors."""

    def _set_solve_options(
        self,
        projection_dim: Optional[int],
        hessian_reg: Union[float, str],
        hessian_inverse_tol: Union[float, str],
        projection_on_cpu: bool,
        complement: bool,
    ) -> None:
        self.projection_dim = _check_count(projection_dim, "projection_dim")
        self.hessian_reg = _check_reg(hessian_reg, "hessian_reg")
        self.hessian_inverse_tol = _check_tol(hessian_inverse_tol, "hessian_inverse_tol")
        self.projection_on_cpu = _check_flag(projection_on_cpu, "projection_on_cpu")
        self.complement = _check_flag(complement, "complement")
        if self.complement and self.hessian_reg == 0:
            raise ValueError(
                "complement: the complement's weight is 1 / hessian_reg; pass hessian_reg > 0 or complement=False."
            )

    @property
    def _solve_device(self) -> torch.device:
        return torch.device("cpu") if self.projection_on_cpu else self.device

    def _make_solve(self, vectors: torch.Tensor, weights: torch.Tensor, damping: float) -> _Solve:
        return _Solve(vectors.to(self._solve_device), weights, damping, layout=self.layout)

    def _stored_solve(self) -> Optional[_Solve]:
        vectors, rest = self._the_store().load_tensor("solve_vectors"), self._the_store().load_tensor("solve_weights")
        if vectors is None or rest is None:
            return None
        return self._make_solve(vectors, rest[1:], float(rest[0]))

    def _save_solve(self, solve: _Solve) -> None:
        store = self._the_store()
        store.save_tensor("solve_vectors", solve.vectors)
        store.save_tensor(
            "solve_weights", torch.cat([torch.tensor([solve.damping], dtype=torch.float64), solve.weights])
        )


class NaiveInfluenceFunction(_EigenInfluence):
    r"""Influence functions from the explicit Hessian, as Captum's ``NaiveInfluenceFunction``.

    H, the Hessian of the training loss summed over ``hessian_dataset`` (default the training
    set) with respect to the parameters of ``layers``, is formed in float64 from vmapped
    forward-over-reverse Hessian-vector products, a bounded chunk of columns at a time (p^2 x 8
    bytes; refused up front when that exceeds half the machine's memory), and decomposed. The
    scores are grad L_test(z)^T M grad L(z_i) with M = V diag(w) V^T as described in the module
    docstring; ``compute_intermediate_quantities`` returns psi = diag(w)^{1/2} V^T grad L.

    Captum's constructor arguments and methods, with these defaults and differences:

    * ``hessian_reg="auto"`` (Captum 1e-6): one training example's worth of Gauss-Newton
      curvature, tr(G) / n (module docstring); a float is used as given.
    * ``hessian_inverse_tol="auto"`` (Captum 1e-5): keep the directions of positive curvature; a
      float keeps the eigenpairs with l + hessian_reg > tol, as Captum.
    * ``projection_dim=None`` (Captum 50): all the kept eigenpairs; an int keeps the largest.
    * ``complement=True``: the directions not kept get the weight 1 / hessian_reg (so M is
      (H_+ + lambda I)^{-1}); ``complement=False`` drops them, as Captum.
    * ``checkpoint``: a path or a state dict, or None for the model's weights as they are now;
      ``checkpoints_load_func(model, checkpoint)`` loads it (default: a state dict). The work is
      done at the first call, not in the constructor, and the caller's model is restored after
      each call (weights, device, train/eval modes).
    * ``loss_fn``: a loss with reduction "none", "sum" or "mean" or a callable; each example's
      gradient is that of its own loss whatever the reduction (default: cross-entropy of the
      logits; Captum's default is a model that returns its loss). ``task`` (a ``ModelOutput`` or
      its name) instead of ``loss_fn``: the training loss is ``task.loss`` and the test side the
      task's output, as TRAK attributes. ``sample_wise_grads_per_batch`` is accepted and changes
      nothing (the engine always computes per-example gradients); ``batch_size`` defaults to 64
      (Captum 1), which changes speed, not the results.
    * ``seed`` and ``projection_on_cpu`` are accepted; the eigendecomposition is deterministic.
    * Bad inputs raise ``ValueError``/``TypeError`` naming the argument, and no NaN comes out.
    * ``store_dir``: the directions, weights and training embeddings are kept there (identity and
      resume as TRAK's store); under ``torch.distributed`` each rank sums the Hessian of its share
      of the batches (one all-reduce) and embeds its share of the training set.

    Example::

        >>> naive = NaiveInfluenceFunction(model, train_set, "model.pt", loss_fn=nn.CrossEntropyLoss(reduction="none"))
        >>> scores = naive.influence((x_test, y_test))             # (n_test, n_train)
        >>> naive.damping_                                         # the damping "auto" chose
    """

    _method = "naive influence function"

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoint: Any = None,
        checkpoints_load_func: Optional[LoadFunc] = None,
        layers: Any = None,
        loss_fn: Optional[LossFn] = None,
        batch_size: Optional[int] = 64,
        hessian_dataset: Optional[Union[Dataset, DataLoader]] = None,
        test_loss_fn: Optional[LossFn] = None,
        sample_wise_grads_per_batch: bool = False,
        projection_dim: Optional[int] = None,
        seed: int = 42,
        hessian_reg: Union[float, str] = "auto",
        hessian_inverse_tol: Union[float, str] = "auto",
        projection_on_cpu: bool = True,
        show_progress: bool = False,
        *,
        complement: bool = True,
        task: Any = None,
        device: Union[str, torch.device, None] = None,
        store_dir: Union[str, os.PathLike, None] = None,
        timeout: Optional[float] = None,
    ):
        super().__init__(
            model,
            train_dataset,
            checkpoint,
            checkpoints_load_func,
            layers=layers,
            loss_fn=loss_fn,
            batch_size=batch_size,
            hessian_dataset=hessian_dataset,
            test_loss_fn=test_loss_fn,
            sample_wise_grads_per_batch=sample_wise_grads_per_batch,
            task=task,
            device=device,
            store_dir=store_dir,
            show_progress=show_progress,
            timeout=timeout,
        )
        self.seed = seed
        self._set_solve_options(projection_dim, hessian_reg, hessian_inverse_tol, projection_on_cpu, complement)
        need = 2 * 8 * self.layout.dim**2
        if need > _memory_limit():
            raise ValueError(
                f"layers: the explicit Hessian of {self.layout.dim} parameters and its eigenvectors take "
                f"{need / 2**30:.1f} GiB, more than half of this machine's memory; select fewer parameters with "
                "layers=[...], or use ArnoldiInfluenceFunction or EKFACInfluence."
            )
        self._open_store()

    def _settings(self) -> dict:
        return {
            "projection_dim": self.projection_dim,
            "hessian_reg": self.hessian_reg,
            "hessian_inverse_tol": self.hessian_inverse_tol,
            "complement": self.complement,
        }

    def hessian(self) -> torch.Tensor:
        """H (p, p), float64: the Hessian of the training loss summed over the Hessian examples,
        with respect to the selected parameters (in ``param_names`` order, flattened), at the
        checkpoint. Under ``torch.distributed`` each rank sums its share; all get the total."""
        with self._progress(False):
            return self._with_checkpoint(self._explicit_hessian)

    @keeps_model_state
    def _with_checkpoint(self, fn: Callable[[], Any]) -> Any:
        for _ in self._iter_checkpoints(f"{self.get_name()}: checkpoint"):
            return fn()

    def _explicit_hessian(self) -> torch.Tensor:
        p = self.layout.dim
        hvp = HessianVectorProducts(self.model, self.objective.train_loss, self.param_names)
        hessian = torch.zeros(p, p, dtype=torch.float64)
        chunk = column_chunk(p)
        arg = self._hessian_arg
        for start, batch in self._hessian_batches("Hessian: batches"):
            self._check_forward(self.objective.train_loss, batch, start, arg)
            n = len(batch[-1])
            for col in range(0, p, chunk):
                stop = min(col + chunk, p)
                eye = torch.zeros(stop - col, p, dtype=self._dtype, device=self.device)
                eye[torch.arange(stop - col), torch.arange(col, stop)] = 1
                hessian[col:stop] += hvp.hessian_columns(batch, eye, n).to("cpu", torch.float64)
        hessian = self._sum_over_ranks(hessian)
        if not bool(torch.isfinite(hessian).all()):
            raise ValueError("model: the Hessian of the training loss has NaN or inf entries at this checkpoint.")
        return (hessian + hessian.T) / 2

    def _fit_curvature(self) -> _Solve:
        hessian = self._explicit_hessian()
        values, vectors = symmetric_eigh(hessian)
        del hessian
        damping = self._resolve_damping(self.hessian_reg, values, vectors)
        index = _select(values, damping, self.hessian_inverse_tol, self.projection_dim)
        weights = 1.0 / (values[index] + damping)
        if self.complement:
            rest = torch.ones(len(values), dtype=torch.bool)
            rest[index] = False
            index = torch.cat([index, rest.nonzero().flatten()])
            weights = torch.cat([weights, torch.full((int(rest.sum()),), 1.0 / damping, dtype=torch.float64)])
        elif len(index) == 0:
            raise _no_positive_error("the Hessian")
        return self._make_solve(vectors[:, index], weights, damping)


class ArnoldiInfluenceFunction(_EigenInfluence):
    r"""Influence functions from the top eigenpairs of the Hessian found by the Arnoldi iteration,
    as Captum's ``ArnoldiInfluenceFunction`` (Schioppa et al. 2022), without forming the Hessian.

    Starting from seeded random vectors, the (block) Arnoldi iteration (``_backend/hvp.py``)
    builds an orthonormal basis Q of ``arnoldi_dim`` vectors of the Krylov subspace of H from
    Hessian-vector products summed over ``hessian_dataset`` (forward-over-reverse by
    ``torch.func``, ``arnoldi_block`` tangents vmapped per pass over the data, one pass per
    block), and the eigenpairs of T = Q H Q^T give the Ritz pairs, H's top eigenpairs. The
    basis is kept in float64 ((arnoldi_dim + arnoldi_block) x p x 8 bytes, on the CPU with
    ``projection_on_cpu``; refused up front beyond half the machine's memory). Directions and
    weights are chosen as in the module docstring; with ``complement=True`` (default) the
    embedding is psi = [w^{1/2} V^T g, (g - V V^T g) / sqrt(lambda)], exactly for models of up to
    16,384 selected parameters, else the second part projected to 4,096 dimensions by the
    engine's seeded ``Projector`` (its dot products then unbiased estimates).
    ``compute_intermediate_quantities`` returns psi: (n, r) with ``complement=False``, as
    Captum, (n, r + p) (or r + 4096) with it.

    Captum's arguments and methods, with these defaults and differences (see also
    :class:`NaiveInfluenceFunction`):

    * ``hessian_reg="auto"`` (Captum 1e-3), ``hessian_inverse_tol="auto"`` (Captum 1e-4),
      ``complement=True``: as in the module docstring.
    * ``projection_dim=None`` (Captum 50): every kept Ritz pair; an int keeps the largest.
    * ``arnoldi_dim=1024`` (Captum 200): the Krylov dimension. With the complement, what matters
      is that the subspace holds the directions of curvature above the damping (several hundred
      on the digits MLPs): on the benchmarks/lds.py setup LDS is 0.62 at 512, 0.67 at 768 and
      0.69 at 1024 (the naive method: 0.69), on the 64-128-10 MLP 0.60 at 512, 0.67 at 1024 and
      0.69 at 2048. ``arnoldi_block=None`` (Captum: 1): min(32, arnoldi_dim // 32) vectors per
      step, at least 1. A block of b gives about the same subspace per dimension as b = 1
      (measured on an explicit Hessian at arnoldi_dim=1024, b=32) with b times fewer passes over
      the data, the b products of a pass vmapped together, as long as the iteration takes enough
      steps: the subspace holds polynomials in H of degree arnoldi_dim / b, and with too few
      steps the top Ritz pairs are poor (arnoldi_dim=48 on a 111-parameter MLP: the top five
      Ritz values are up to 9% off with b=32, exact to 1e-14 with b=1). An int is used as given.
    * ``arnoldi_tol=1e-6`` (Captum 1e-1, absolute): relative to the largest entry of T, a new
      direction below it ends the iteration (an invariant subspace); Captum's absolute threshold
      depends on the loss's scale and can stop a converging iteration.
    * ``seed=0`` seeds the starting vectors (a generator of its own: the global random state is
      not touched).

    Example::

        >>> arnoldi = ArnoldiInfluenceFunction(model, train_set, "model.pt", layers=["fc1", "fc2"])
        >>> top = arnoldi.influence((x_test, y_test), k=10)        # proponents
    """

    _method = "Arnoldi influence function"

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoint: Any = None,
        checkpoints_load_func: Optional[LoadFunc] = None,
        layers: Any = None,
        loss_fn: Optional[LossFn] = None,
        batch_size: Optional[int] = 64,
        hessian_dataset: Optional[Union[Dataset, DataLoader]] = None,
        test_loss_fn: Optional[LossFn] = None,
        sample_wise_grads_per_batch: bool = False,
        projection_dim: Optional[int] = None,
        seed: int = 0,
        arnoldi_dim: int = 1024,
        arnoldi_tol: float = 1e-6,
        hessian_reg: Union[float, str] = "auto",
        hessian_inverse_tol: Union[float, str] = "auto",
        projection_on_cpu: bool = True,
        show_progress: bool = False,
        *,
        arnoldi_block: Optional[int] = None,
        complement: bool = True,
        task: Any = None,
        device: Union[str, torch.device, None] = None,
        store_dir: Union[str, os.PathLike, None] = None,
        timeout: Optional[float] = None,
    ):
        super().__init__(
            model,
            train_dataset,
            checkpoint,
            checkpoints_load_func,
            layers=layers,
            loss_fn=loss_fn,
            batch_size=batch_size,
            hessian_dataset=hessian_dataset,
            test_loss_fn=test_loss_fn,
            sample_wise_grads_per_batch=sample_wise_grads_per_batch,
            task=task,
            device=device,
            store_dir=store_dir,
            show_progress=show_progress,
            timeout=timeout,
        )
        self.seed = _check_seed(seed)
        self.arnoldi_dim: int = _check_positive(arnoldi_dim, "arnoldi_dim")
        # The default block keeps at least 32 steps of the iteration (class docstring).
        self.arnoldi_block: int = (
            max(1, min(32, self.arnoldi_dim // 32))
            if arnoldi_block is None
            else _check_positive(arnoldi_block, "arnoldi_block", " or None")
        )
        if (
            isinstance(arnoldi_tol, bool)
            or not isinstance(arnoldi_tol, (int, float))
            or not (math.isfinite(arnoldi_tol) and 0 <= arnoldi_tol < 1)
        ):
            raise ValueError(f"arnoldi_tol: expected a float in [0, 1); got {arnoldi_tol!r}.")
        self.arnoldi_tol = float(arnoldi_tol)
        self._set_solve_options(projection_dim, hessian_reg, hessian_inverse_tol, projection_on_cpu, complement)
        p = self.layout.dim
        vectors = min(self.arnoldi_dim, p) + self.arnoldi_block
        need = 2 * 8 * vectors * p
        if need > _memory_limit():
            raise ValueError(
                f"arnoldi_dim: a basis of {vectors} vectors of {p} parameters and the Ritz vectors take "
                f"{need / 2**30:.1f} GiB in float64, more than half of this machine's memory; pass a smaller "
                "arnoldi_dim or select fewer parameters with layers=[...]."
            )
        self._open_store()

    def _settings(self) -> dict:
        return {
            "projection_dim": self.projection_dim,
            "hessian_reg": self.hessian_reg,
            "hessian_inverse_tol": self.hessian_inverse_tol,
            "complement": self.complement,
            "arnoldi_dim": self.arnoldi_dim,
            "arnoldi_block": self.arnoldi_block,
            "arnoldi_tol": self.arnoldi_tol,
            "seed": self.seed,
        }

    def _matmat(self, hvp: HessianVectorProducts, arg: str) -> Callable[[torch.Tensor], torch.Tensor]:
        checked: set = set()

        def matmat(rows: torch.Tensor) -> torch.Tensor:
            total = torch.zeros(rows.shape, dtype=torch.float64)
            tangents = rows.to(self.device, self._dtype)
            for start, batch in self._hessian_batches("Hessian-vector products"):
                if start not in checked:
                    self._check_forward(self.objective.train_loss, batch, start, arg)
                    checked.add(start)
                total += hvp.hessian_columns(batch, tangents, len(batch[-1])).to("cpu", torch.float64)
            return self._sum_over_ranks(total).to(rows.device)

        return matmat

    def _fit_curvature(self) -> _Solve:
        p = self.layout.dim
        where = self._solve_device
        hvp = HessianVectorProducts(self.model, self.objective.train_loss, self.param_names)
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randn(min(self.arnoldi_block, p), p, dtype=torch.float64, generator=generator).to(where)
        arg = self._hessian_arg
        basis, t = arnoldi(
            self._matmat(hvp, arg), start, self.arnoldi_dim, self.arnoldi_tol, show_progress=self.show_progress
        )
        values, vectors = ritz_pairs(basis, t)
        del basis
        damping = self._resolve_damping(self.hessian_reg, values, vectors)
        index = _select(values, damping, self.hessian_inverse_tol, self.projection_dim)
        if len(index) == 0 and not self.complement:
            raise _no_positive_error("the Hessian restricted to the Krylov subspace")
        return self._make_solve(vectors[:, index].contiguous(), 1.0 / (values[index] + damping), damping)

    def _complement_projector(self) -> Optional[Projector]:
        if not self.complement or self.layout.dim <= _COMPLEMENT_EXACT_DIM:
            return None
        return Projector(
            param_shapes(self.model, self.param_names),
            _COMPLEMENT_PROJECTION_DIM,
            seed=self.seed,
            device=self.device,
            dtype=torch.float32,
        )

    def _make_solve(self, vectors: torch.Tensor, weights: torch.Tensor, damping: float) -> _Solve:
        """The Ritz directions kept; the complement is applied to each gradient (projected when p is large)."""
        solve = _Solve(vectors.to(self._solve_device), weights, damping, complement=self.complement, layout=self.layout)
        solve.projector = self._complement_projector()
        return solve
