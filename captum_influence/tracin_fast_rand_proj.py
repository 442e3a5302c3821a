"""TracInCPFastRandProj: TracInCPFast's final-layer gradients, randomly projected, with fast top-k.

The stacked final-layer gradients v(z) = [sqrt(eta_c) g_c(z)]_c (g_c = d a^T with the bias column,
see :class:`~captum_influence.TracInCPFast`) are projected by the package's seeded
:class:`~captum_influence.Projector` when ``projection_dim`` is set, so that

    TracIn(z, z') ~= <P^T v(z), P^T v(z')>        (exact without projection)

and the top-k training examples of a test example are found among the projected training vectors:
by the exact blockwise top-k of the backend (the default), or by an approximate
nearest-neighbour index passed as ``nearest_neighbors`` (Captum's ``NearestNeighbors`` interface,
for example ``captum.influence._utils.nearest_neighbors.AnnoyNearestNeighbors`` where the
``annoy`` library is installed), whose ``setup`` gets the training vectors once and whose
``get_nearest_neighbors(query, k)`` returns ``(indices, dot products)``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from captum.influence._utils.common import KMostInfluentialResults
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._checkpoints import LoadFunc
from ._influence import keeps_model_state
from .tracin import LossFn, TracInCPFast


class TracInCPFastRandProj(TracInCPFast):
    """TracInCPFast on projected final-layer gradients, with an exact or approximate top-k.

    Captum's constructor and methods: ``projection_dim`` (an int: each checkpoint's gradient is
    projected to that many dimensions with a seeded Rademacher :class:`Projector`; None: exact
    gradients), ``seed``, and ``nearest_neighbors`` (None: the exact blockwise top-k, no index;
    else an object with Captum's ``NearestNeighbors`` methods ``setup(data)`` and
    ``get_nearest_neighbors(query, k) -> (indices, scores)`` searched by dot product).
    ``influence(inputs, k=5, proponents=True)`` returns the top-k as
    ``KMostInfluentialResults``, or all scores (n_test, n_train) with ``k=None``. Scores include
    the bias term (exact TracIn), which Captum's omits. Each checkpoint's vector has
    ``projection_dim`` entries from one dense projection of the whole layer gradient; Captum
    projects the layer's inputs and output gradients separately to int(sqrt(projection_dim))
    each, so its vectors are shorter (and its projected scores use other random matrices).

    Args:
        model (nn.Module): the network; ``model(*batch[:-1])`` gives its output.
        final_fc_layer (nn.Module or str): an ``nn.Linear`` of ``model``, or its module path.
        train_dataset (Dataset or DataLoader): a Dataset or fixed-order DataLoader of
            ``(*inputs, labels)`` tuples.
        checkpoints (str, list of str or list of dict): a directory (its files in natural order), a
            path, a list of paths or state dicts: the checkpoints c = 1..C.
        checkpoints_load_func (callable, optional): ``(model, checkpoint) -> float`` loading the
            checkpoint in place and returning its weight eta_c (the learning rate), which must be
            finite and non-negative. Default: load a state dict, weight 1.0.
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
        nearest_neighbors (object, optional): an index with ``setup(data)`` and
            ``get_nearest_neighbors(query, k) -> (indices, scores)`` searched by dot product
            (Captum's ``NearestNeighbors``); otherwise a TypeError. Default: None (the exact
            blockwise top-k).
        projection_dim (int, optional): a positive int k, the width of each checkpoint's projected
            gradient (a k larger than the gradient warns and keeps exact gradients), or None
            (exact gradients). Default: None.
        seed (int, optional): the projection's seed. Default: 0.
        device (str or torch.device, optional): where gradients are computed. Default: the
            model's.
        show_progress (bool, optional): tqdm bars over checkpoints and batches. Default: False.
        timeout (float, optional): under ``torch.distributed``, the longest wait (seconds) for
            the other ranks at a collective; then a TimeoutError names the ranks that did not
            answer. Default: None (the process group's timeout).

    Example::

        >>> tracin = TracInCPFastRandProj(model, model.fc, train_set, checkpoints, load_with_lr,
        ...                               projection_dim=128)
        >>> top = tracin.influence((x_test, y_test), k=10)
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
        nearest_neighbors: Any = None,
        projection_dim: Optional[int] = None,
        seed: int = 0,
        device: Union[str, torch.device, None] = None,
        show_progress: bool = False,
        timeout: Optional[float] = None,
    ):
        if projection_dim is not None and (
            isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0
        ):
            raise ValueError(f"projection_dim: expected a positive int or None; got {projection_dim!r}.")
        if nearest_neighbors is not None and not all(
            callable(getattr(nearest_neighbors, m, None)) for m in ("setup", "get_nearest_neighbors")
        ):
            raise TypeError(
                "nearest_neighbors: expected an object with setup(data) and get_nearest_neighbors(query, k) "
                f"(Captum's NearestNeighbors); got {type(nearest_neighbors).__name__}."
            )
        super().__init__(
            model,
            final_fc_layer,
            train_dataset,
            checkpoints,
            checkpoints_load_func,
            loss_fn=loss_fn,
            batch_size=batch_size,
            test_loss_fn=test_loss_fn,
            vectorize=vectorize,
            projection_dim=projection_dim,
            device=device,
            show_progress=show_progress,
            seed=seed,
            timeout=timeout,
        )
        self.nearest_neighbors = nearest_neighbors
        self._index_ready = False

    @keeps_model_state
    def influence(
        self,
        inputs: Any,
        k: Optional[int] = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Union[torch.Tensor, KMostInfluentialResults]:
        """Top-k proponents (or opponents) per test example (``k=5`` as in Captum), or every score
        with ``k=None``; from ``nearest_neighbors`` when one was given, else exactly.

        TracIn(z, z') = sum_c eta_c <g_c(z), g_c(z')> of the final layer (test loss for z, training
        loss for z'), on the projected vectors when ``projection_dim`` is set. The index, when
        given, is set up with the training vectors on the first top-k call and kept; it is not
        used with ``k=None`` or ``aggregate``.

        Args:
            inputs (tuple, Dataset or DataLoader): the test examples, a batch ``(*model_inputs,
                labels)`` or a dataset of such tuples.
            k (int, optional): the number of training examples per test example, clamped to
                n_train; None: every score. Default: 5.
            proponents (bool, optional): with ``k``, the highest scores (True) or the lowest,
                the opponents (False). Default: True.
            show_progress (bool, optional): tqdm bars over checkpoints and batches.
                Default: False.
            aggregate (bool, optional): score the sum of the test examples' losses instead of
                each test example (always exact). Default: False.

        Returns:
            Tensor or KMostInfluentialResults: with ``k=None``, the scores (n_test, n_train)
            ((1, n_train) with ``aggregate``), positive where the training example helps; with
            ``k``, ``KMostInfluentialResults(indices, influence_scores)``, each (n_test, k).
        """
        if self.nearest_neighbors is None or k is None or aggregate:
            return super().influence(inputs, k, proponents, show_progress, aggregate)
        k = self._clamp_k(k)
        with self._progress(show_progress):
            if not self._index_ready:
                self.nearest_neighbors.setup(self._explicit_train_vectors())
                self._index_ready = True
            sign = 1.0 if proponents else -1.0
            queries = self._test_features(inputs, explicit=True).to(self._dtype)
            indices, scores = self.nearest_neighbors.get_nearest_neighbors(sign * queries, k)
        return KMostInfluentialResults(indices, sign * scores)

    def _explicit_train_vectors(self) -> torch.Tensor:
        """The training set's stacked vectors with factored layers written out: (n_train, C * d)."""
        keys = self._train_features()  # fixes the layout
        if not self._chosen_layout.factored:
            return keys
        return self._test_features(self.train_dataset, explicit=True, loss=self._loss)
