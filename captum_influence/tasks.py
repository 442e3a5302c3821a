"""Model output functions: what TRAK's linearised model predicts, and how the loss weighs it.

A task maps a batch ``(*model_inputs, labels)`` to one scalar per example, the output f(z), and
to Q = -dL/df, the out-to-loss gradient that weighs each training example (Park et al. 2023,
Sec. 2-3). For classification f is the margin g_y - logsumexp_{j != y} g_j = log(p_y / (1 - p_y))
of the logits g; since the loss is L = -log p_y = log(1 + exp(-f)), Q = -dL/df = 1 - p_y > 0.

Outputs are written for a batch and work under ``torch.func.vmap``, so that TRAK takes their
per-example gradients with one call::

    >>> task = ci.tasks.get_task("classification")
    >>> grads = ci.per_example_grads(model, lambda m, *b: task.output(m, b), batch)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Iterable, Literal, Optional, Sequence, Union, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ._data import call_args, call_model, logits_of, split_batch
from .output_selection import _margins, _trace

Batch = Sequence[Any]


class ModelOutput(ABC):
    """A model output function f and its out-to-loss gradient Q = -dL/df, per example.

    Subclasses define :meth:`output` and either :meth:`out_to_loss_grad` or :meth:`loss`; with
    only a loss, Q is found by autograd (exact when the loss depends on the model's outputs
    through f alone, which is checked).
    """

    @abstractmethod
    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """f(z) for each example of ``batch``: Tensor[B], differentiable, written for a batch."""

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of each example, Tensor[B]; only the autograd fallback uses it."""
        raise NotImplementedError(f"{type(self).__name__} defines no loss.")

    def out_to_loss_grad(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Q = -dL/df for each example: Tensor[B], without gradient.

        This default finds it by autograd: the model's outputs o are made leaves, f(o) and L(o)
        are differentiated with respect to them, and Q_b = -<dL/do_b, df/do_b> / |df/do_b|^2.
        """
        if type(self).loss is ModelOutput.loss:
            raise TypeError(
                f"task: {type(self).__name__} defines neither out_to_loss_grad(model, batch) nor "
                "loss(model, batch); define one of them."
            )
        return _out_to_loss_grad_by_autograd(self, model, batch)

    def output_and_out_to_loss_grad(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f, Q)`` of a batch: f differentiable as :meth:`output`, Q without gradient as
        :meth:`out_to_loss_grad`. Here two calls; tasks that get both from one forward override it."""
        f = self.output(model, batch)
        with torch.no_grad():
            return f, self.out_to_loss_grad(model, batch)

    def prepare(self, model: nn.Module, data: Iterable[Batch]) -> None:  # noqa: B027 (an optional hook: no-op default)
        """Called once per checkpoint before featurising, with the training batches. Does nothing here."""


def _out_to_loss_grad_by_autograd(task: ModelOutput, model: nn.Module, batch: Batch) -> torch.Tensor:
    """-dL/df per example, with the model's outputs as leaves shared by f and L."""
    leaves: list[Any] = []

    def as_leaf(t: Any) -> Any:
        return t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def capture(module, args, result):
        leaves.append(tree_map(as_leaf, result))
        return leaves[-1]

    pending: list[Any] = []

    def replay(module, args, result):
        if not pending:
            raise ValueError(
                f"task: {type(task).__name__}.loss calls the model more often than output does; the "
                "autograd out-to-loss gradient needs both to use the same model calls."
            )
        return pending.pop(0)

    with torch.enable_grad():
        handle = model.register_forward_hook(capture)
        try:
            f = task.output(model, batch)
        finally:
            handle.remove()
        pending.extend(leaves)
        handle = model.register_forward_hook(replay)
        try:
            loss = task.loss(model, batch)
        finally:
            handle.remove()
        for name, value in (("output", f), ("loss", loss)):
            if not isinstance(value, torch.Tensor) or value.dim() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"task: {type(task).__name__}.{name} must return Tensor[B]; got {shape}.")
        n = f.shape[0]
        # Per-example outputs only; a leaf shared by the batch (a logit scale) is not one example's.
        wrt = [
            t
            for t in tree_flatten(leaves)[0]
            if isinstance(t, torch.Tensor) and t.requires_grad and t.dim() > 0 and t.shape[0] == n
        ]
        if not wrt:
            raise ValueError(
                f"task: {type(task).__name__}.output does not call model(...), so its outputs cannot "
                "be made leaves; define out_to_loss_grad(model, batch)."
            )
        df = torch.autograd.grad(f.sum(), wrt, allow_unused=True)
        dl = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)

    def rows(a, b):
        total = torch.zeros(n, dtype=torch.float64, device=f.device)
        for x, y in zip(a, b):
            if x is not None and y is not None:
                total += (x.double() * y.double()).reshape(n, -1).sum(1)
        return total

    ff, fl, ll = rows(df, df), rows(df, dl), rows(dl, dl)
    flat = (ff == 0).nonzero().flatten().tolist()
    if flat:
        raise ValueError(
            f"task: {type(task).__name__}.output does not depend on the model's outputs for examples "
            f"{flat[:10]}; the out-to-loss gradient is undefined there."
        )
    # dL/do = l'(f) df/do exactly when L depends on o through f; check the component left over.
    rtol = 10 * math.sqrt(torch.finfo(f.dtype).eps)
    off = (ll - fl**2 / ff).clamp(min=0)
    bad = (off > rtol**2 * ll).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"task: {type(task).__name__}.loss is not a function of its output f for examples "
            f"{bad[:10]} (dL/d(model output) is not parallel to df/d(model output)); define "
            "out_to_loss_grad(model, batch) instead."
        )
    return (-fl / ff).to(f.dtype)


@overload
def _check_temperature(temperature: Any, *, allow_none: Literal[False] = False) -> float: ...


@overload
def _check_temperature(temperature: Any, *, allow_none: bool) -> Optional[float]: ...


def _check_temperature(temperature: Any, *, allow_none: bool = False) -> Optional[float]:
    if temperature is None and allow_none:
        return None
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        expected = "a positive float or None" if allow_none else "a positive float"
        raise ValueError(f"temperature: expected {expected}; got {temperature!r}.")
    return float(temperature)


def _batch(batch: Any) -> tuple[tuple, torch.Tensor]:
    inputs, labels = split_batch(batch, arg="batch")
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"batch: the last element (labels) must be a Tensor; got {type(labels).__name__}.")
    return inputs, labels


class ClassificationOutput(ModelOutput):
    """Multiclass classification: f = g_y - logsumexp_{j != y} g_j = log(p_y / (1 - p_y)).

    g = model(*inputs) are logits (B, C), C >= 2 (a tensor, or a dict / output object with a
    ``logits`` field); labels are class indices (B,). Q = 1 - softmax(g / temperature)_y, computed
    as sigmoid(-m_y) of the tempered margin so that it stays exact when p_y is close to 1. As in
    TRAK, the temperature enters Q only. For a model ending in a softmax, pass
    ``select_output(model, "logits")``.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = _check_temperature(temperature)

    def _call(self, model: nn.Module, inputs: tuple) -> tuple[tuple, dict]:
        """The positional and keyword arguments of forward for a batch's model inputs."""
        return call_args(inputs)

    def logits_and_labels(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g, y)``: the logits (B, C) and labels (B,) of a batch."""
        inputs, labels = _batch(batch)
        args, kwargs = self._call(model, inputs)
        logits = logits_of(model(*args, **kwargs))
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(
                f"model: {type(self).__name__} needs logits of shape (batch, classes) with at least 2 "
                f"classes; got {tuple(logits.shape)}. "
                "For one binary logit z, return torch.cat([torch.zeros_like(z), z], 1)."
            )
        if (
            labels.dtype.is_floating_point
            or labels.dtype == torch.bool
            or labels.dim() != 1
            or (labels.shape[0] != logits.shape[0])
        ):
            raise ValueError(
                f"batch: labels must be class indices, an integer Tensor of shape ({logits.shape[0]},); "
                f"got dtype {labels.dtype} and shape {tuple(labels.shape)}."
            )
        return logits, labels

    @staticmethod
    def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Labels must lie in [0, C). The check reads the labels' values, which cannot be done
        under ``torch.func.vmap``: so ``output`` (vmapped for per-example gradients) leaves it to
        ``out_to_loss_grad`` and ``loss``, which run on the whole batch."""
        n_classes = logits.shape[1]
        bad = ((labels < 0) | (labels >= n_classes)).nonzero().flatten()
        if len(bad):
            more = " ..." if len(bad) > 10 else ""
            raise ValueError(
                f"labels: expected class indices in [0, {n_classes}) for the model's {n_classes} classes; "
                f"got {labels[bad[:10]].tolist()}{more} at positions {bad[:10].tolist()}{more} of the batch."
            )

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, labels = self.logits_and_labels(model, batch)
        return _margins(logits).gather(1, labels.unsqueeze(1)).squeeze(1)

    def out_to_loss_grad(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            logits, labels = self.logits_and_labels(model, batch)
            self._check_labels(logits, labels)
            return self._q(logits, labels)

    def _q(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        margin = _margins(logits.detach() / self.temperature).gather(1, labels.unsqueeze(1)).squeeze(1)
        return torch.sigmoid(-margin)  # = 1 - p_y

    def output_and_out_to_loss_grad(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """f and Q from one forward (the labels are checked as in :meth:`out_to_loss_grad`)."""
        logits, labels = self.logits_and_labels(model, batch)
        self._check_labels(logits, labels)
        return _margins(logits).gather(1, labels.unsqueeze(1)).squeeze(1), self._q(logits, labels)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, labels = self.logits_and_labels(model, batch)
        self._check_labels(logits, labels)
        return F.cross_entropy(logits / self.temperature, labels, reduction="none")

    def prepare(self, model: nn.Module, data: Iterable[Batch]) -> None:
        """Checks, on the first batch, that the model returns logits and not probabilities."""
        first = next(iter(data), None)
        if first is None:
            raise ValueError("data: no batches; expected the training batches (*model_inputs, labels).")
        inputs, _ = _batch(first)
        args, kwargs = self._call(model, inputs)
        with torch.no_grad():
            traced = _trace(model, args, kwargs)
        found = traced.output_call()
        if found is not None:
            raise ValueError(
                f"model: forward returns the result of {traced.describe(found[0])}, not logits; "
                f"{type(self).__name__} needs logits: pass ci.select_output(model, 'logits') instead."
            )


class TextClassificationOutput(ClassificationOutput):
    """Text classification, the same margin as :class:`ClassificationOutput`, dict or keyword inputs.

    Inputs reach the model exactly as the batch gives them: ``(encoding, labels)``, with
    ``encoding`` a dict of tensors (what a tokenizer returns), calls ``model(**encoding)``;
    ``(*tensors, labels)`` calls ``model(*tensors)`` in the batch's order. ``input_keys``, when
    given, names the positional tensors in order, which are then passed as keywords
    (``input_keys=("input_ids", "attention_mask")`` calls ``model(input_ids=..., attention_mask=...)``),
    or selects the keys of a dict. The model may return logits or an object / dict with ``logits``.

    Example::

        >>> task = ci.tasks.TextClassificationOutput()
        >>> f = task.output(bert, (input_ids, attention_mask, token_type_ids, labels))  # (B,)
    """

    def __init__(self, input_keys: Optional[Sequence[str]] = None, temperature: float = 1.0):
        super().__init__(temperature)
        if input_keys is not None and (
            isinstance(input_keys, str) or not all(isinstance(k, str) for k in input_keys) or not input_keys
        ):
            raise ValueError(f"input_keys: expected a non-empty sequence of names or None; got {input_keys!r}.")
        self.input_keys = tuple(input_keys) if input_keys is not None else None

    def _call(self, model: nn.Module, inputs: tuple) -> tuple[tuple, dict]:
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            encoding = dict(inputs[0])
            if self.input_keys is None:
                return (), encoding
            missing = [k for k in self.input_keys if k not in encoding]
            if missing:
                raise ValueError(f"batch: the encoding lacks {missing}; it has keys {sorted(encoding)}.")
            return (), {k: encoding[k] for k in self.input_keys}
        if self.input_keys is None:
            return inputs, {}
        if len(self.input_keys) != len(inputs):
            raise ValueError(
                f"batch: {len(inputs)} model inputs before the labels, but input_keys names "
                f"{len(self.input_keys)}: {list(self.input_keys)}; pass one name per input, in the batch's order."
            )
        return (), dict(zip(self.input_keys, inputs))


class RegressionOutput(ModelOutput):
    """Scalar regression with the squared loss L = (f - y)^2 / 2: f = model(*inputs), Q = y - f.

    The model returns (B,) or (B, 1); labels are floats of the same length.
    """

    def _prediction(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = _batch(batch)
        pred = logits_of(call_model(model, inputs))
        if pred.dim() not in (1, 2) or (pred.dim() == 2 and pred.shape[1] != 1):
            raise ValueError(
                f"model: RegressionOutput needs outputs of shape (batch,) or (batch, 1); got {tuple(pred.shape)}."
            )
        n = pred.shape[0]
        if not labels.dtype.is_floating_point or labels.numel() != n:
            raise ValueError(
                f"batch: labels must be floats, one per example ({n}); got dtype {labels.dtype} and "
                f"shape {tuple(labels.shape)}."
            )
        return pred.reshape(n), labels.reshape(n).to(pred.dtype)

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._prediction(model, batch)[0]

    def out_to_loss_grad(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            pred, labels = self._prediction(model, batch)
            return labels - pred

    def output_and_out_to_loss_grad(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """f and Q from one forward."""
        pred, labels = self._prediction(model, batch)
        return pred, (labels - pred).detach()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        pred, labels = self._prediction(model, batch)
        return 0.5 * (pred - labels) ** 2


class ContrastiveOutput(ModelOutput):
    """CLIP-style image-text pairs, TRAK's output function (Park et al. 2023, Sec. 5.1).

    A batch is ``(images, texts)``: the text is the image's label, and the model is called as
    ``model(images, texts)``, returning ``(u, v)`` or ``(u, v, logit_scale)`` (open_clip's
    order) or a dict with ``image_features``, ``text_features`` and optionally ``logit_scale``.
    With K fixed negatives (u_k, v_k), the output for a pair (u, v) is

        f = -log sum_k exp(u.v_k - u.v) - log sum_k exp(v.u_k - v.u),

    and Q = 1 - (p_i2t + p_t2i) / 2, p the softmax probability of the true pair among it and
    the negatives, of similarities multiplied by the model's logit scale (1 when the model
    returns none), or divided by ``temperature`` when given. The negatives are the features of
    the first ``n_negatives`` training pairs, found by :meth:`prepare` (once per checkpoint, as
    they depend on the weights), or fixed with ``negatives=(image_features, text_features)``.
    Unlike TRAK's CLIP output, the negatives are fixed rather than resampled at each call and Q
    is taken against them rather than against the batch, so neither depends on the batching.
    """

    def __init__(
        self,
        temperature: Optional[float] = None,
        *,
        negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        n_negatives: int = 300,
    ):
        self.temperature = _check_temperature(temperature, allow_none=True)
        if isinstance(n_negatives, bool) or not isinstance(n_negatives, int) or n_negatives <= 0:
            raise ValueError(f"n_negatives: expected a positive int; got {n_negatives!r}.")
        self.n_negatives = n_negatives
        self.negatives: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._fixed = negatives is not None
        if negatives is not None:
            self.negatives = self._check_negatives(negatives)

    @staticmethod
    def _check_negatives(negatives: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ok = (
            isinstance(negatives, (tuple, list))
            and len(negatives) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in negatives)
            and negatives[0].shape == negatives[1].shape
            and negatives[0].shape[0] > 0
        )
        if not ok:
            got = (
                [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in negatives]
                if isinstance(negatives, (tuple, list))
                else type(negatives).__name__
            )
            raise ValueError(
                "negatives: expected (image_features, text_features), two tensors of the same shape "
                f"(K, d) with K >= 1; got {got}."
            )
        return negatives[0].detach(), negatives[1].detach()

    def features(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(u, v, scale)``: image and text features (B, d) and the model's logit scale (or None)."""
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            got = (
                f"{type(batch).__name__} of length {len(batch)}"
                if isinstance(batch, (tuple, list))
                else type(batch).__name__
            )
            raise ValueError(f"batch: ContrastiveOutput expects (images, texts); got {got}.")
        out = model(*batch)
        if isinstance(out, Mapping):
            out = (out.get("image_features"), out.get("text_features"), out.get("logit_scale"))
        if (
            not isinstance(out, (tuple, list))
            or len(out) not in (2, 3)
            or not all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in out[:2])
            or out[0].shape != out[1].shape
        ):
            raise ValueError(
                "model: ContrastiveOutput needs forward(images, texts) to return (image_features, "
                "text_features[, logit_scale]) with features of the same shape (B, d), or a dict with "
                "those keys."
            )
        return out[0], out[1], out[2] if len(out) == 3 else None

    def _negatives(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.negatives is None:
            raise ValueError(
                "task: ContrastiveOutput has no negatives; call task.prepare(model, train_loader) "
                "first, or pass negatives=(image_features, text_features)."
            )
        images, texts = self.negatives
        if images.shape[1] != like.shape[1]:
            raise ValueError(f"negatives: features of dim {images.shape[1]}; the model returns dim {like.shape[1]}.")
        return images.to(like), texts.to(like)

    def _similarities(self, u, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, texts = self._negatives(u)
        return (u * v).sum(1, keepdim=True), u @ texts.T, v @ images.T

    def output(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        u, v, _ = self.features(model, batch)
        positive, to_texts, to_images = self._similarities(u, v)
        return -torch.logsumexp(to_texts - positive, dim=1) - torch.logsumexp(to_images - positive, dim=1)

    def out_to_loss_grad(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            u, v, scale = self.features(model, batch)
            if self.temperature is not None:
                scale = 1.0 / self.temperature
            elif scale is None:
                scale = 1.0
            positive, to_texts, to_images = self._similarities(u, v)
            # 1 - p of the true pair (column 0) = sigmoid(-margin), exact when p is close to 1.
            image_to_text = _margins(scale * torch.cat([positive, to_texts], 1))[:, 0]
            text_to_image = _margins(scale * torch.cat([positive, to_images], 1))[:, 0]
            return (torch.sigmoid(-image_to_text) + torch.sigmoid(-text_to_image)) / 2

    def prepare(self, model: nn.Module, data: Iterable[Batch]) -> None:
        """Features of the first ``n_negatives`` pairs of ``data``, as negatives (unless fixed)."""
        if self._fixed:
            return
        images, texts, count = [], [], 0
        with torch.no_grad():
            for batch in data:
                u, v, _ = self.features(model, tuple(batch))
                images.append(u.detach())
                texts.append(v.detach())
                count += u.shape[0]
                if count >= self.n_negatives:
                    break
        if not images:
            raise ValueError("data: no batches to take ContrastiveOutput's negatives from.")
        self.negatives = (torch.cat(images)[: self.n_negatives], torch.cat(texts)[: self.n_negatives])


_TASKS = {
    "classification": ClassificationOutput,
    "text_classification": TextClassificationOutput,
    "contrastive": ContrastiveOutput,
    "regression": RegressionOutput,
}


def get_task(task: Union[str, ModelOutput, type], *, arg: str = "task") -> ModelOutput:
    """A :class:`ModelOutput` from an instance, a subclass (built with no arguments) or a name:
    "classification", "text_classification", "contrastive" or "regression"."""
    if isinstance(task, ModelOutput):
        return task
    if isinstance(task, type) and issubclass(task, ModelOutput):
        return task()
    if isinstance(task, str) and task in _TASKS:
        return _TASKS[task]()
    raise (ValueError if isinstance(task, str) else TypeError)(
        f"{arg}: expected a ModelOutput instance or subclass, or one of {', '.join(map(repr, _TASKS))}; got {task!r}."
    )
