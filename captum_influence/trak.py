"""TRAK (Park et al., 2023): data attribution from projected gradients of an ensemble of models.

For checkpoints m = 1..M, the model output function f (the margin for classification), a seeded
projection P_m and damping lambda_m:

    phi_m(z) = P_m^T grad_theta f(z; theta_m)                   (k,)
    Phi_m    = [phi_m(z_1); ...; phi_m(z_n)],  G_m = Phi_m^T Phi_m   (n_train, k), (k, k)
    Q_m(i)   = -dL/df at z_i                                    (1 - p_i for classification)
    tau(z, z_i) = [1/M sum_m phi_m(z)^T (G_m + lambda_m I)^{-1} phi_m(z_i)] * [1/M sum_m Q_m(i)]

G_m is accumulated in float64 and factored by Cholesky, L_m L_m^T = G_m + lambda_m I. With
psi_m(z) = L_m^{-1} phi_m(z) / sqrt(M), the bracket is the dot product <psi(z), psi(z_i)> of the
concatenated psi_m: these are the intermediate quantities, and the training side is stored once.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

import numpy as np
import torch
from captum.influence._utils.common import KMostInfluentialResults
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._backend import (
    FeatureStore,
    LayerGrads,
    Projector,
    damped_cholesky,
    gram,
    param_shapes,
    select_param_names,
    shared_array,
)
from ._backend.factored_projection import FactoredProjector, factorable
from ._backend.grads import slice_batch
from ._backend.layer_grads import exact_by_construction
from ._backend.solve import Features, as_tensor_block
from ._backend.store import data_fingerprint, file_digest, model_fingerprint
from ._checkpoints import LoadFunc
from ._influence import GradientFeatureInfluence, check_scores, keeps_model_state
from ._progress import progress
from .tasks import ClassificationOutput, ModelOutput, RegressionOutput, get_task

# "auto" damping: lambda = _AUTO_DAMPING * trace(G) / n_train, the mean squared norm of the features
# (the mean eigenvalue of the n x n kernel Phi Phi^T). Unlike trace(G) / k it does not shrink as the
# projection grows, so k >= n_train stays well posed; on digits LDS is flat for 1 <= factor <= 3.
_AUTO_DAMPING = 1.0
# "auto" projection, set by cost. Exact gradients up to _AUTO_EXACT_DIM parameters: a projection
# would save at most half the features at P k work per example. Above, k = P / 16 rounded down to a
# power of two in [512, 2048]: on small models the k x k Gram matrix, its factor and the P k
# products dominate, and along the ensemble the LDS bought per second is the same at any k, so a
# small k gives a fast first model and more models buy the rest. On digits (500 train, 100 targets,
# LDS over 40 retrained models): an MLP of 2,410 parameters has LDS 0.647 in 1.17 s with exact
# gradients, 0.620 in 1.10 s projected to 2048; one of 9,610 parameters 0.630 in 1.6 s at k = 512
# (0.659 in 2.7 s with 2 models), 0.664 in 3.3 s at 1024, 0.682 in 5.9 s at 2048 (0.684 in 5.7 s
# at 1024 with 2 models).
_AUTO_PROJECTION_DIM = 2048
_AUTO_MIN_DIM = 512
_AUTO_COMPRESSION = 16
_AUTO_EXACT_DIM = 2 * _AUTO_PROJECTION_DIM
_INVERSE_SCALINGS = ("none", "mean_abs")
_PROJECTIONS = ("dense", "factored")
# Default batch: as many examples as keep the largest layer's (B, |theta|) gradient block near
# 2^24 floats (64 MiB), a power of two in [64, 1024]: per-batch overhead is then amortised.
_BATCH_FLOATS = 2**24
_BATCH_RANGE = (64, 1024)


@dataclass
class _Solve:
    """The per-checkpoint solve: ``psi = coef * L^{-1} phi`` with L L^T = G + damping I."""

    factor: torch.Tensor  # L, lower triangular, float64 (k, k)
    damping: float
    coef: float

    def whiten(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, k) features -> (B, k) whitened features in float64."""
        factor = self.factor.to(phi.device)
        psi = torch.linalg.solve_triangular(factor, phi.to(factor.dtype).T, upper=False).T
        return psi * self.coef


def _solve_for(
    features: Features,
    damping: Union[float, str],
    *,
    n_checkpoints: int = 1,
    inverse_scaling: str = "none",
    device=None,
) -> _Solve:
    """Gram matrix (float64), damping and Cholesky factor of one checkpoint's features (n, k).

    ``inverse_scaling="mean_abs"`` divides (G + lambda I)^{-1} by the mean absolute value of its
    entries, the weighting used by the reference TRAK library; "none" follows the paper.
    """
    g = gram(features, dtype=torch.float64, device=device)
    lam = float(damping) if damping != "auto" else _AUTO_DAMPING * float(torch.diagonal(g).sum()) / features.shape[0]
    if damping == "auto" and lam == 0:
        raise ValueError("train_dataset: every per-example gradient is zero, so there is nothing to attribute.")
    factor = damped_cholesky(g, lam)
    scale = 1.0
    if inverse_scaling == "mean_abs":
        scale = 1.0 / float(torch.cholesky_inverse(factor).abs().mean())
    return _Solve(factor, lam, math.sqrt(scale / n_checkpoints))


def _auto_projection_dim(grad_dim: int) -> Optional[int]:
    """The "auto" rule: None (exact gradients) for at most 4096 parameters, else grad_dim / 16
    rounded down to a power of two, clamped to [512, 2048] (see the constants' comment)."""
    if grad_dim <= _AUTO_EXACT_DIM:
        return None
    k = 2 ** int(math.log2(grad_dim // _AUTO_COMPRESSION))
    return min(max(k, _AUTO_MIN_DIM), _AUTO_PROJECTION_DIM)


def _check_seed(value: Any) -> int:
    """``seed`` as given when it is a non-negative int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seed: expected a non-negative int; got {value!r}.")
    return value


def _non_finite_rows(rows: torch.Tensor) -> torch.Tensor:
    """Indices of the rows holding a NaN or inf. A row's sum is finite when all its entries are
    (one pass, no temporaries the size of ``rows``); only rows whose sum is not, from a non-finite
    entry or from overflow, are checked entry by entry."""
    suspect = (~torch.isfinite(rows.sum(dim=1))).nonzero().flatten()
    if len(suspect) == 0:
        return suspect
    return suspect[~torch.isfinite(rows[suspect]).all(dim=1)]


def _auto_batch_size(model: nn.Module, names: list[str]) -> int:
    """The default batch size: 2^24 floats over the largest module's selected parameter count,
    rounded down to a power of two and clamped to [64, 1024]."""
    table = dict(model.named_parameters())
    largest = max(
        (sum(table[n].numel() for n in names if n.rpartition(".")[0] == path) for path, _ in model.named_modules()),
        default=1,
    )
    size = 2 ** int(math.log2(max(1, _BATCH_FLOATS // max(largest, 1))))
    return min(max(size, _BATCH_RANGE[0]), _BATCH_RANGE[1])


class _TaskFailure(ValueError):
    """The task refused a batch (a ValueError of its own, such as labels out of range); kept
    apart from the engine's errors so that TRAK can name the examples."""


class _OutputAndQ:
    """The task's f as the engine's output function, keeping the Q that the same forward gives
    for the ``n`` examples of the batch being featurised (``q``: None until such a call)."""

    def __init__(self, task: ModelOutput, n: int, fused: bool):
        self.task, self.n, self.fused = task, n, fused
        self.q: Optional[torch.Tensor] = None

    def __call__(self, model: nn.Module, *batch: Any) -> torch.Tensor:
        try:
            if not self.fused:
                return self.task.output(model, batch)
            f, q = self.task.output_and_out_to_loss_grad(model, batch)
        except ValueError as err:
            raise _TaskFailure(err) from err
        if len(q) == self.n:
            self.q = q
        return f

    def out_to_loss_grad(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        """Q of ``batch`` from a forward of its own."""
        try:
            with torch.no_grad():
                return self.task.out_to_loss_grad(model, batch).reshape(-1)
        except ValueError as err:
            raise _TaskFailure(err) from err


def _checkpoint_seed(seed: int, index: int) -> int:
    """An independent projection seed per (seed, checkpoint)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _checkpoint_identity(checkpoint: Any) -> Any:
    """A checkpoint's contents: the SHA-256 of a state dict's names and tensors, or of a file's bytes."""
    if isinstance(checkpoint, dict):
        h = hashlib.sha256()
        for name, value in checkpoint.items():
            h.update(str(name).encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
        return {"state_dict_sha256": h.hexdigest()}
    return {"size": os.stat(checkpoint).st_size, "sha256": file_digest(Path(checkpoint))}


def _task_identity(task: ModelOutput) -> dict:
    """The task's class and scalar settings (tensors it derives per checkpoint are left out)."""
    settings = {k: v for k, v in vars(task).items() if isinstance(v, (int, float, str, bool, type(None), tuple))}
    return {"class": f"{type(task).__module__}.{type(task).__qualname__}", "settings": settings}


class TRAK(GradientFeatureInfluence):
    r"""TRAK scores of training examples for test examples, ensembled over checkpoints.

    .. math::
        \tau(z, z_i) = \Big[\tfrac1M \sum_m \phi_m(z)^\top (\Phi_m^\top\Phi_m + \lambda_m I)^{-1}
        \phi_m(z_i)\Big] \cdot \tfrac1M \sum_m Q_m(z_i)

    with phi_m the projected per-example gradient of the task's output function f at checkpoint
    m and Q_m = -dL/df (see the module docstring). Positive: z_i raises f(z).

    Args:
        model (nn.Module): the network; ``model(*batch[:-1])`` gives its output.
        train_dataset (Dataset or DataLoader): a Dataset or fixed-order DataLoader of
            ``(*inputs, labels)`` tuples.
        checkpoints (str, list of str or list of dict): a directory, paths or state dicts (the
            M models of the ensemble, weighted equally: the weight returned by
            ``checkpoints_load_func`` is not used by TRAK).
        checkpoints_load_func (callable, optional): ``(model, checkpoint) -> float`` loading in
            place. Default: load a state dict.
        task (ModelOutput, type or str, optional): the model output function f and its Q (an
            instance, subclass or name, see ``captum_influence.tasks``). Default: "classification".
        projection_dim (int, str or None, optional): int k, None (exact gradients, no
            projection), or "auto": exact gradients for models with at most 4096 parameters (in
            ``layers``), where a projection would cost more than it saves, else P / 16 rounded
            down to a power of two in [512, 2048] (2048 from 32,768 parameters). On small models
            the LDS bought per second is the same at any k, so the default starts cheap: add
            checkpoints for a higher LDS (benchmarks/lds_time.py). Default: "auto".
        projection (str, optional): "dense" (one random matrix over all parameters) or
            "factored": each Linear and Conv layer's input and output gradient are projected
            separately and their outer product kept (as LoGra does), about sqrt(P k) work per
            layer instead of P k, so that large models can be projected; the other parameters
            are projected densely. Default: "dense".
        damping (float or str, optional): lambda >= 0, or "auto": per checkpoint,
            trace(G_m) / n_train (the mean squared feature norm), which keeps the solve well
            posed when k >= n_train, where G_m is singular. Default: "auto".
        layers (list of str or nn.Module, optional): parameter names, module paths or modules to
            differentiate. Default: every trainable parameter.
        batch_size (int, optional): examples per gradient batch; None picks it from the model's
            size (2^24 floats over the largest layer's parameter count, a power of two in
            [64, 1024]). A DataLoader keeps its own batches; batch_size then batches the
            queries. Default: None.
        store_dir (str or PathLike, optional): directory for the features, factors and keys
            (memory-mapped); a killed run resumes there, and a store made with other settings is
            refused. Under ``torch.distributed`` (torchrun) each rank featurises its shard of the
            training batches into this directory, which all ranks must share, and scores are
            gathered. Default: None (in memory).
        device (str or torch.device, optional): where gradients are computed. Default: the
            model's.
        seed (int, optional): projection seed; checkpoint m uses an independent projection
            derived from (seed, m). Default: 0.
        show_progress (bool, optional): tqdm bars over checkpoints and batches. Default: False.
        inverse_scaling (str, optional): "none" (the paper) or "mean_abs": divide each
            (G_m + lambda I)^{-1} by the mean absolute value of its entries before averaging, as
            the reference library does. Default: "none".
        timeout (float, optional): under ``torch.distributed``, the longest wait (seconds) for
            the other ranks at a collective; then a TimeoutError names the ranks that did not
            answer. Default: None (the process group's timeout).

    Example::

        >>> trak = TRAK(model, train_set, ["ckpt0.pt", "ckpt1.pt"], projection_dim=512)
        >>> scores = trak.influence((x_test, y_test))          # (n_test, n_train)
        >>> top = trak.influence((x_test, y_test), k=5)        # KMostInfluentialResults
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoints: Any,
        checkpoints_load_func: Optional[LoadFunc] = None,
        *,
        task: Any = "classification",
        projection_dim: Union[int, str, None] = "auto",
        damping: Union[float, str] = "auto",
        layers: Any = None,
        batch_size: Optional[int] = None,
        store_dir: Union[str, os.PathLike, None] = None,
        device: Union[str, torch.device, None] = None,
        seed: int = 0,
        show_progress: bool = False,
        inverse_scaling: str = "none",
        timeout: Optional[float] = None,
        projection: str = "dense",
    ):
        if batch_size is None:
            # From the model's size (a model that is not an nn.Module is refused by the base class);
            # with a DataLoader it batches the queries, the loader keeping its own batches.
            batch_size = (
                _auto_batch_size(model, select_param_names(model, layers, arg="layers"))
                if isinstance(model, nn.Module)
                else _BATCH_RANGE[0]
            )
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
        self.task = get_task(task)
        self.param_names = select_param_names(model, layers, arg="layers")
        # The hooks' check (single-example passes) where it can fail: not for a plain stack of
        # per-example layers with a per-example output function.
        plain = type(self.task) in (ClassificationOutput, RegressionOutput) and exact_by_construction(model)
        self._layer_grads = LayerGrads(model, self.param_names, check=not plain)
        self.param_shapes = param_shapes(model, self.param_names)
        if projection not in _PROJECTIONS:
            raise ValueError(f"projection: expected one of {_PROJECTIONS}; got {projection!r}.")
        self.projection = projection
        grad_dim = sum(math.prod(s) for s in self.param_shapes.values())
        self.seed = _check_seed(seed)
        self.projection_dim = self._asked_dim = self._check_projection_dim(projection_dim, grad_dim, damping)
        if projection == "factored" and self.projection_dim is not None:
            self.projection_dim = self._factored(0).projection_dim  # the k made: products per layer
        self.feature_dim = self.projection_dim or grad_dim
        if not (
            damping == "auto"
            or (
                isinstance(damping, (int, float))
                and not isinstance(damping, bool)
                and math.isfinite(damping)
                and damping >= 0
            )
        ):
            raise ValueError(f"damping: expected a float >= 0 or 'auto'; got {damping!r}.")
        self.damping = damping if damping == "auto" else float(damping)
        if inverse_scaling not in _INVERSE_SCALINGS:
            raise ValueError(f"inverse_scaling: expected one of {_INVERSE_SCALINGS}; got {inverse_scaling!r}.")
        self.inverse_scaling = inverse_scaling
        self._check_memory(store_dir is not None)
        if store_dir is not None:
            self.store = FeatureStore(store_dir, self._metadata())
        self._solves: Optional[list[_Solve]] = None
        self._keys: Optional[Features] = None
        self._projectors: dict[int, Union[Projector, FactoredProjector]] = {}

    def _check_memory(self, stored: bool) -> None:
        """Refuse up front what cannot fit: the k x k float64 Gram matrix and its factor of one
        checkpoint (2 x 8 k^2 bytes), and without a store the (n_train, M k) float32 keys."""
        k, n, m = self.feature_dim, self.n_train, len(self.checkpoints)
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        gram = 16 * k * k
        if gram > available // 2:
            raise ValueError(
                f"projection_dim: {k} features need {gram / 2**30:.1f} GiB for one checkpoint's Gram matrix and its "
                f"factor, more than half of this machine's {available / 2**30:.1f} GiB; pass a smaller projection_dim."
            )
        keys = 4 * n * m * k
        if not stored and keys > available // 2:
            raise ValueError(
                f"store_dir: the keys of {n} training examples x {m} checkpoints x {k} features take "
                f"{keys / 2**30:.1f} GiB, more than half of this machine's {available / 2**30:.1f} GiB; pass a "
                "store_dir (memory-mapped on disk) or a smaller projection_dim."
            )

    def _check_projection_dim(self, projection_dim: Any, grad_dim: int, damping: Any) -> Optional[int]:
        if projection_dim == "auto":
            projection_dim = _auto_projection_dim(grad_dim)
        elif projection_dim is not None and (
            isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0
        ):
            raise ValueError(f"projection_dim: expected a positive int, None or 'auto'; got {projection_dim!r}.")
        if projection_dim is not None and projection_dim >= grad_dim:
            warnings.warn(
                f"projection_dim: {projection_dim} is not below the {grad_dim} dimensions of the gradient of the "
                "selected parameters; exact gradients are cheaper and exact, so no projection is used (pass an "
                f"int < {grad_dim} to project, or None to silence this).",
                stacklevel=3,
            )
            projection_dim = None
        k = projection_dim or grad_dim
        if k > self.n_train and damping != "auto":
            warnings.warn(
                f"projection_dim: {k} features for {self.n_train} training examples: Phi^T Phi is "
                f"singular and the scores rest on damping={damping!r} (damping='auto' is scaled for this)."
            )
        return projection_dim

    def _metadata(self) -> dict:
        """Everything that changes the stored features, factors or keys: the model's architecture,
        a fingerprint of the training data, the checkpoints' contents, the task and the settings."""
        return {
            "method": "TRAK",
            "model": model_fingerprint(self.model),
            "data": data_fingerprint(self.train_loader),
            "layers": self.param_names,
            "checkpoints": [_checkpoint_identity(c) for c in self.checkpoints],
            "task": _task_identity(self.task),
            "projection": {
                "kind": (self.projection if self.projection == "factored" else "rademacher")
                if self.projection_dim
                else "identity",
                "dim": self.feature_dim,
                "seed": self.seed,
            },
            "damping": self.damping,
            "inverse_scaling": self.inverse_scaling,
            "n_train": self.n_train,
            "batch_size": self.batch_size,  # the resumable unit of work
        }

    # --- features of one checkpoint ---------------------------------------------------------

    def _factored(self, index: int) -> FactoredProjector:
        """Checkpoint ``index``'s factored projector: Linear and Conv layers whose parameters the
        hooks alone compute are factored, every other selected parameter projected densely."""
        engine = self._layer_grads
        layers = {path: m for path, m in engine.covered_modules().items() if factorable(m)}
        held = {name for m in layers.values() for name in engine.module_params(m)}
        dense = {name: shape for name, shape in self.param_shapes.items() if name not in held}
        assert self._asked_dim is not None
        return FactoredProjector(
            layers, dense, self._asked_dim, seed=_checkpoint_seed(self.seed, index), device=self.device
        )

    def _projector(self, index: int) -> Union[Projector, FactoredProjector]:
        """Checkpoint ``index``'s projector. Kept between calls when the matrices of all checkpoints
        fit the projector's own cache budget (each then holds its whole matrix once generated), so
        later influence() calls do not generate them again; otherwise made anew each time. A
        factored projector's matrices are small and always kept."""
        if index in self._projectors:
            return self._projectors[index]
        if self.projection_dim is None:
            projector: Union[Projector, FactoredProjector] = Projector(
                self.param_shapes, None, kind="identity", device=self.device
            )
        elif self.projection == "factored":
            projector = self._factored(index)
            if projector.projection_dim != self.projection_dim:
                raise ValueError(
                    "projection: the engine's check moved layers off the hook path, so the factored layout "
                    f"differs from the one planned ({projector.projection_dim} != {self.projection_dim} "
                    "features); use projection='dense' for this model."
                )
        else:
            projector = Projector(
                self.param_shapes, self.projection_dim, seed=_checkpoint_seed(self.seed, index), device=self.device
            )
        if not isinstance(projector, FactoredProjector):
            element = torch.finfo(projector.dtype).bits // 8
            total = len(self.checkpoints) * projector.grad_dim * projector.projection_dim * element
            if projector.kind != "identity" and total > projector.cache_bytes:
                return projector
        self._projectors[index] = projector
        return projector

    def _grads_and_q(
        self, projector: Union[Projector, FactoredProjector], start: int, batch: tuple, index: int, arg: str
    ) -> torch.Tensor:
        """Rows ``[phi(z), Q(z)]`` of a batch, (B, k + 1), checked to be finite. f and Q come from
        one forward where the engine runs the task's output once on the whole batch."""
        n = len(batch[-1])
        engine = self._layer_grads
        output = _OutputAndQ(self.task, n, fused=not engine.vmap_names)
        try:
            rows = engine.project(output, batch, projector, extra_columns=1)
            q = output.q
            if q is None or engine.coupled:  # the forward couples the examples: Q of each alone
                parts = [batch] if not engine.coupled else [slice_batch(batch, b, b + 1) for b in range(n)]
                q = torch.cat([output.out_to_loss_grad(self.model, part) for part in parts])
        except _TaskFailure as failure:
            assert failure.__cause__ is not None  # raised from the task's ValueError
            self._task_failed(failure.__cause__, start, n, index, arg)
        except (IndexError, RuntimeError) as err:  # a batch the model cannot take
            self._task_failed(err, start, n, index, arg)
        rows[:, -1] = q.reshape(-1).to(rows)
        bad = _non_finite_rows(rows)
        if len(bad):
            indices = (bad + start).tolist()
            raise ValueError(
                f"{arg}: the gradient of the model output (or dL/df) at checkpoint {index} is NaN or inf "
                f"for example indices {indices[:20]}{' ...' if len(indices) > 20 else ''}; "
                "these examples (or the checkpoint) need fixing before scores can be computed."
            )
        return rows

    @staticmethod
    def _task_failed(err: BaseException, start: int, n: int, index: int, arg: str) -> NoReturn:
        if isinstance(err, ValueError):
            raise ValueError(
                f"{arg}: the task's output fails on examples {start}..{start + n - 1} (the batch starting "
                f"at {start}) at checkpoint {index}: {err}"
            ) from err
        raise ValueError(
            f"{arg}: the task's output fails on examples {start}..{start + n - 1} at checkpoint {index} "
            f"({type(err).__name__}: {err}); expected inputs of the shape the model takes."
        ) from err

    def _prepare(self) -> None:
        """Let the task see the training set at the loaded checkpoint (e.g. contrastive negatives)."""
        self.task.prepare(self.model, (batch for _, batch in self._train_batches()))

    # --- training side: solves and keys -----------------------------------------------------

    def _fit(self, visit: Optional[Callable[[int, Any, _Solve], None]] = None) -> tuple[list[_Solve], Features]:
        """Featurise the training set at every checkpoint, factor G_m + lambda I, write the keys.
        ``visit(index, projector, solve)`` is called at each checkpoint while it is loaded, so that
        queries are featurised with the same projector (generated once per checkpoint).

        With a store, finished batches are not redone and a checkpoint whose keys are written
        keeps its stored solve; a damaged file's work is redone (bit-identical) with a warning."""
        if self._solves is not None:
            assert self._keys is not None  # set with the solves
            return self._solves, self._keys
        n, k, count = self.n_train, self.feature_dim, len(self.checkpoints)
        keys: Features
        done: np.ndarray  # the store's memmap, flushed as each checkpoint is done, or in memory
        if self.store is not None:  # opened by every rank under torch.distributed
            keys = shared_array(self.store, "keys", (n, count * k), finite=True)
            done = shared_array(self.store, "keys.done", (count,), np.uint8)
        else:
            keys, done = torch.empty(n, count * k), np.zeros(count, dtype=np.uint8)
        q_sum = torch.zeros(n, dtype=torch.float64)
        solves = []
        for index, _ in self._iter_checkpoints("TRAK: checkpoints"):
            prepared: list[bool] = []
            projector = self._projector(index)

            def compute(item, p=projector, i=index):
                if not prepared:  # only when a batch is featurised: finished batches are skipped
                    self._prepare()
                    prepared.append(True)
                return self._grads_and_q(p, item[0], item[1], i, "train_dataset")

            rows = self._featurise_train(
                n, k + 1, compute, name=f"grads_{index}", desc=f"checkpoint {index}: training set"
            )
            solve = self._stored_solve(index) if done[index] else None
            if solve is None:
                solve = _solve_for(
                    rows[:, :k],
                    self.damping,
                    n_checkpoints=count,
                    inverse_scaling=self.inverse_scaling,
                    device=self.device,
                )
                if self.store is not None:
                    self.store.unfinish("keys")
                self._write_keys(rows, keys, solve, index)
                if self.store is not None:
                    self.store.save_tensor(f"factor_{index}", solve.factor)
                    self.store.save_tensor(
                        f"solve_{index}", torch.tensor([solve.damping, solve.coef], dtype=torch.float64)
                    )
                    done[index] = 1
                    if isinstance(done, np.memmap):
                        done.flush()
            q_sum += as_tensor_block(rows[:, k:], 0, n, torch.float64).flatten()
            solves.append(solve)
            if visit is not None:
                if not prepared:
                    self._prepare()
                visit(index, projector, solve)
        if self.store is not None and done.all():
            self.store.finish("keys")
        self._train_weights = (q_sum / count).to(torch.float32)
        self._solves, self._keys = solves, keys
        return solves, keys

    def _stored_solve(self, index: int) -> Optional[_Solve]:
        """Checkpoint ``index``'s solve from the store, or None when a file of it is damaged."""
        assert self.store is not None  # called for checkpoints the store marks done
        factor = self.store.load_tensor(f"factor_{index}")
        settings = self.store.load_tensor(f"solve_{index}")
        if factor is None or settings is None:
            return None
        return _Solve(factor.to(self.device), *settings.tolist())

    def _write_keys(self, rows: Features, keys: Features, solve: _Solve, index: int, block: int = 8192) -> None:
        k = self.feature_dim
        for start in range(0, self.n_train, block):
            stop = min(start + block, self.n_train)
            psi = solve.whiten(as_tensor_block(rows, start, stop, torch.float64, self.device)[:, :k]).float().cpu()
            if isinstance(keys, np.ndarray):
                keys[start:stop, index * k : (index + 1) * k] = psi.numpy()
            else:
                keys[start:stop, index * k : (index + 1) * k] = psi
        if isinstance(keys, np.memmap):
            keys.flush()

    def _train_features(self) -> Features:
        return self._fit()[1]

    # --- query side --------------------------------------------------------------------------

    def _featurise_inputs(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """psi(z) (n, M k) and the mean out-to-loss weight Q(z) (n,) of the examples in ``inputs``.
        Before the first fit, each checkpoint's queries are featurised right after its training
        set, with the same projector and without loading the checkpoint again."""
        batches, n = self._test_batches(inputs)
        k, count = self.feature_dim, len(self.checkpoints)
        psi = torch.empty(n, count * k)
        q_sum = torch.zeros(n, dtype=torch.float64)

        def featurise(index: int, projector: Any, solve: _Solve) -> None:
            for start, batch in progress(batches, desc=f"checkpoint {index}: inputs", show=self.show_progress):
                rows = self._grads_and_q(projector, start, batch, index, "inputs")
                stop = start + rows.shape[0]
                psi[start:stop, index * k : (index + 1) * k] = solve.whiten(rows[:, :k]).float().cpu()
                q_sum[start:stop] += rows[:, k].cpu().to(torch.float64)

        if self._solves is None:
            self._fit(featurise)
        else:
            for index, _ in self._iter_checkpoints("TRAK: checkpoints"):
                self._prepare()
                featurise(index, self._projector(index), self._solves[index])
        return psi, (q_sum / count).to(torch.float32)

    def _test_features(self, inputs: Any) -> torch.Tensor:
        return self._featurise_inputs(inputs)[0]

    def influence(
        self,
        inputs: Any,
        k: Optional[int] = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Union[torch.Tensor, KMostInfluentialResults]:
        """TRAK scores of the training examples for the examples in ``inputs``:
        tau(z, z_i) = psi(z) . psi(z_i) * Q(z_i), with psi from :meth:`compute_intermediate_quantities`.
        The training set is featurised on the first call and kept (in ``store_dir`` if given).

        Args:
            inputs (tuple, Dataset or DataLoader): the test examples, a batch ``(*model_inputs,
                labels)`` or a dataset of such tuples.
            k (int, optional): return only the top ``k`` training examples per test example,
                clamped to n_train. Default: None (every score).
            proponents (bool, optional): with ``k``, the highest scores (True) or the lowest,
                the opponents (False). Default: True.
            show_progress (bool, optional): tqdm bars over checkpoints and batches.
                Default: False.
            aggregate (bool, optional): score the sum of the test examples' outputs,
                sum_z tau(z, z_i), instead of each test example. Default: False.

        Returns:
            Tensor or KMostInfluentialResults: without ``k``, the scores (n_test, n_train)
            ((1, n_train) with ``aggregate``), positive where z_i raises f(z); with ``k``,
            ``KMostInfluentialResults(indices, influence_scores)``, each (n_test, k).
        """
        return super().influence(inputs, k, proponents, show_progress, aggregate)

    @keeps_model_state
    def compute_intermediate_quantities(
        self, inputs: Any, aggregate: bool = False, *, as_train: bool = False
    ) -> torch.Tensor:
        """psi(z) = [L_m^{-1} phi_m(z) / sqrt(M)]_m, with L_m the Cholesky factor of
        Phi_m^T Phi_m + lambda_m I: ``influence(z)[:, i]`` equals ``psi(z) . psi(z_i) * Q(z_i)``.

        Args:
            inputs (tuple, Dataset or DataLoader): the examples, a batch ``(*model_inputs,
                labels)`` or a dataset of such tuples.
            aggregate (bool, optional): return the rows summed, (1, M k). Default: False.
            as_train (bool, optional): multiply each row by its example's mean out-to-loss weight
                Q, so that ``psi(z) @ psi_train(x).T`` are the scores of the examples x as
                training examples for z. Default: False.

        Returns:
            Tensor: psi, (n, M k) with M checkpoints and k features each ((1, M k) with
            ``aggregate``).
        """
        psi, q = self._featurise_inputs(inputs)
        rows = psi * q[:, None] if as_train else psi
        return rows.sum(0, keepdim=True) if aggregate else rows

    @keeps_model_state
    def self_influence(
        self, inputs: Any = None, show_progress: bool = False, outer_loop_by_checkpoints: bool = False
    ) -> torch.Tensor:
        """Each example's score for itself: tau(z, z) = |psi(z)|^2 Q(z).

        Args:
            inputs (tuple, Dataset or DataLoader, optional): the examples, a batch
                ``(*model_inputs, labels)`` or a dataset of such tuples. Default: None, the
                training set.
            show_progress (bool, optional): tqdm bars over checkpoints and batches.
                Default: False.
            outer_loop_by_checkpoints (bool, optional): Captum's choice of loop order; here
                checkpoints are always the outer loop, and the value changes nothing.
                Default: False.

        Returns:
            Tensor: the self-influence scores, (n,).
        """
        with self._progress(show_progress):
            scores = self._self_influence(inputs)
        check_scores(scores[:, None], "self_influence", "")
        return scores

    def _self_influence(self, inputs: Any) -> torch.Tensor:
        if inputs is None:
            _, keys = self._fit()
            return self._rowwise_scores(keys, keys, self._train_weights)
        psi, q = self._featurise_inputs(inputs)
        return self._rowwise_scores(psi, psi, q)
