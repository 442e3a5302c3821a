"""Right for the Right Reasons (Ross et al., 2017): cross-entropy plus a penalty on input gradients.

    L = CE(f(x), y) + l2_grads * sum_{b,d} (A_bd * d/dx_bd t(f(x_b)))^2

where A is the mask of features that must not matter and t is the explained output, by default
sum_k log p_k with log p = log_softmax(logits). The input gradient comes from one
``torch.autograd.grad`` call for the whole batch with ``create_graph=True`` (double backprop), and
the cross-entropy reuses the same forward pass, so ``loss.backward()`` reaches the parameters
through both terms and a zero mask gives exactly plain training, dropout draws included.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._attr_args import check_finite
from ._backend import batch_size_of, input_grads

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]
MaskSpec = Union[torch.Tensor, Sequence[Optional[torch.Tensor]]]

# t(logits, labels) -> Tensor[B]: the scalar per example whose input gradient is penalised.
_TARGETS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # Ross et al.: sum_k log p_k, the gradient of every class's log-probability at once.
    "log_probs": lambda logits, labels: F.log_softmax(logits, dim=1).sum(dim=1),
    # log p_y (sum_k y_k log p_k for soft labels): the explanation of the labelled class only.
    "true_log_prob": lambda logits, labels: -F.cross_entropy(logits, labels, reduction="none"),
    # sum_k z_k: the raw scores, before the softmax couples the classes.
    "logits": lambda logits, labels: logits.sum(dim=1),
}


class RRRTerms(NamedTuple):
    """The two terms of the last loss, detached: ``loss = cross_entropy + l2_grads * penalty``."""

    cross_entropy: torch.Tensor
    penalty: torch.Tensor


class RRRLoss(nn.Module):
    r"""Cross-entropy plus ``l2_grads`` times the squared input gradients inside a mask.

    ``loss(model, inputs, labels, mask)`` returns the scalar

        CE + l2_grads * R,   R = sum_{b,i,d} (mask_i[b,d] * d t_b / d inputs_i[b,d])^2,

    both terms averaged over the batch (``reduction="mean"``, the default, so that ``l2_grads``
    does not depend on the batch size) or summed (``reduction="sum"``, Ross et al.'s objective).
    The explained output t_b is chosen by ``target``:

    - ``"log_probs"``: sum_k log p_k(x_b), with log p = log_softmax(logits) (Ross et al.);
    - ``"true_log_prob"``: log p_{y_b}(x_b), the labelled class only;
    - ``"logits"``: sum_k z_k(x_b), the model's raw outputs.

    ``model(*inputs)`` must return logits of shape (B, K); ``labels`` are class indices (B,) or
    class probabilities (B, K), as for ``F.cross_entropy``. ``inputs`` is a tensor or a tuple of
    tensors and ``mask`` a tensor or a tuple with one entry per input (``None``: that input is not
    penalised); each mask broadcasts to its input (e.g. (H, W) for images (B, C, H, W)) and may be
    boolean or real-valued (finite per-feature weights). NaN or inf in the inputs or a mask, and
    labels outside [0, K), are refused, and so is a NaN or inf loss (naming the examples; this
    reads the loss back, one device sync per step: ``check_finite=False`` skips it). Weight decay
    belongs to the optimiser.

    After each call, ``last_terms`` holds the two terms (detached) for logging.

    The penalty is local: saturating units (tanh, sigmoid) can flatten the gradient at the
    training points while the output still depends on the masked features; piecewise-linear
    activations (ReLU) leave no such way out.

    BatchNorm in training mode couples the examples of a batch, so the batched input gradient is
    then not the per-example one; a warning says so once.

    Args:
        l2_grads (float): weight of the penalty, finite and >= 0 (0 gives plain cross-entropy).
        target (str, optional): the explained output t, ``"log_probs"``, ``"true_log_prob"`` or
            ``"logits"``. Default: ``"log_probs"``.
        reduction (str, optional): ``"mean"`` or ``"sum"`` over the batch, for both terms.
            Default: ``"mean"``.
        check_finite (bool, optional): refuse a NaN or inf loss, naming the examples (one device
            sync per call). Default: True.

    Example::

        >>> loss_fn = ci.RRRLoss(l2_grads=10.0)
        >>> loss = loss_fn(model, x, y, mask)   # mask: 1 on the pixels that must not matter
        >>> loss.backward(); optimizer.step()
        >>> loss_fn.last_terms.penalty
    """

    def __init__(
        self, l2_grads: float, target: str = "log_probs", *, reduction: str = "mean", check_finite: bool = True
    ) -> None:
        super().__init__()
        self.l2_grads = _finite_nonnegative(l2_grads, "l2_grads")
        if target not in _TARGETS:
            raise ValueError(f"target: expected one of {sorted(_TARGETS)}; got {target!r}.")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: expected 'mean' or 'sum'; got {reduction!r}.")
        self.target = target
        self.reduction = reduction
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite: expected a bool; got {check_finite!r}.")
        self.check_finite = check_finite
        self.last_terms: Optional[RRRTerms] = None
        self._warned_batchnorm = False
        self._checked_output = False

    def extra_repr(self) -> str:
        return f"l2_grads={self.l2_grads}, target={self.target!r}, reduction={self.reduction!r}"

    def forward(
        self,
        model: Callable[..., torch.Tensor],
        inputs: TensorOrTuple,
        labels: torch.Tensor,
        mask: MaskSpec,
    ) -> torch.Tensor:
        r"""The loss CE(f(x), y) + l2_grads * sum (mask * d t / d x)^2 on one batch.

        Args:
            model (nn.Module or callable): ``model(*inputs)`` returns logits of shape (B, K).
            inputs (Tensor or tuple[Tensor, ...]): the batch, each tensor with first dimension B;
                a penalised input must be floating point.
            labels (Tensor): class indices of shape (B,) or class probabilities of shape (B, K).
            mask (Tensor or tuple[Tensor or None, ...]): one per input, broadcastable to it, True
                (or a finite weight) on the features whose input gradient is penalised; None
                leaves that input out of the penalty.

        Returns:
            Tensor: the scalar loss, differentiable in the model's parameters through both terms
            (``loss.backward()``); ``last_terms`` then holds the two terms, detached.
        """
        if not callable(model):
            raise TypeError(f"model: expected an nn.Module or callable returning logits; got {type(model).__name__}.")
        inputs = _as_tuple(inputs, "inputs")
        n = _check_labels(labels, inputs)
        masks = _check_masks(inputs, mask)
        check_finite(inputs, "inputs", "expected finite inputs (the loss and its gradient would be NaN)")
        self._warn_batchnorm(model)

        penalised = [(i, m) for i, m in enumerate(masks) if m is not None]  # (input index, its mask)
        outputs: list[torch.Tensor] = []

        def explained(*xs: torch.Tensor) -> torch.Tensor:
            full = list(inputs)
            for (i, _), x in zip(penalised, xs):
                full[i] = x
            logits = model(*full)
            _check_logits(logits, n, labels)
            outputs.append(logits)  # one forward serves both terms
            return _TARGETS[self.target](logits, labels)

        grads = input_grads(explained, [inputs[i] for i, _ in penalised], create_graph=True)
        (logits,) = outputs
        self._warn_probabilities(logits)
        cross_entropy = F.cross_entropy(logits, labels, reduction=self.reduction)
        masked = [m * g for (_, m), g in zip(penalised, grads)]
        penalty = torch.stack([(mg**2).sum() for mg in masked]).sum()
        if self.reduction == "mean":
            penalty = penalty / n
        self.last_terms = RRRTerms(cross_entropy.detach(), penalty.detach())
        loss = cross_entropy + self.l2_grads * penalty
        if self.check_finite and not bool(torch.isfinite(loss)):
            _refuse_nonfinite_loss(logits, labels, masked)
        return loss

    def _warn_batchnorm(self, model: Callable) -> None:
        if self._warned_batchnorm or not isinstance(model, nn.Module):
            return
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                warnings.warn(
                    f"RRRLoss: module {name!r} ({type(module).__name__}) is in training mode; batch "
                    "statistics couple the examples, so the batched input gradient is not each "
                    "example's own. Use eval-mode normalisation (or GroupNorm/LayerNorm) for an exact penalty.",
                    stacklevel=3,
                )
                self._warned_batchnorm = True
                return

    def _warn_probabilities(self, logits: torch.Tensor) -> None:
        # Checked on the first call only: it reads values back, which costs a device sync.
        if self._checked_output:
            return
        self._checked_output = True
        out = logits.detach()
        if bool((out >= 0).all()) and torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-4):
            warnings.warn(
                "RRRLoss: the model's outputs are non-negative and sum to 1, so they look like "
                "probabilities; RRRLoss applies log_softmax itself and expects logits "
                "(ci.select_output(model, 'logits') removes a final softmax).",
                stacklevel=3,
            )


def _finite_nonnegative(value: object, arg: str) -> float:
    """``value`` as a float, or an error naming ``arg`` unless it is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{arg}: expected a non-negative real number; got {type(value).__name__}.")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{arg}: expected a finite non-negative number; got {value!r}.")
    return number


def _refuse_nonfinite_loss(logits: torch.Tensor, labels: torch.Tensor, masked_grads: list) -> None:
    """Name the examples whose cross-entropy or masked input gradient is NaN or inf."""
    n = logits.shape[0]
    per_example = F.cross_entropy(logits.detach(), labels, reduction="none").reshape(n, -1)
    rows = torch.cat([per_example] + [g.detach().reshape(n, -1) for g in masked_grads], dim=1)
    bad = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
    raise ValueError(
        f"model: the loss is NaN or inf for examples {bad[:20]}{' ...' if len(bad) > 20 else ''} of the batch "
        "(their logits or input gradients are not finite: check the model's weights, or its outputs for "
        "these inputs); pass check_finite=False to skip this check, which costs one device sync per step."
    )


def _as_tuple(value: TensorOrTuple, arg: str) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(x, torch.Tensor) for x in value):
        return tuple(value)
    given = type(value).__name__ if not isinstance(value, (tuple, list)) else [type(x).__name__ for x in value]
    raise TypeError(f"{arg}: expected a tensor or a non-empty tuple of tensors; got {given}.")


def _check_masks(inputs: tuple, mask: MaskSpec) -> list[Optional[torch.Tensor]]:
    """One mask (or None) per input, each broadcastable to its input and cast to its dtype."""
    if isinstance(mask, torch.Tensor):
        masks: list = [mask]
    elif isinstance(mask, (tuple, list)):
        masks = list(mask)
    else:
        raise TypeError(f"mask: expected a tensor or a tuple of tensors (or None); got {type(mask).__name__}.")
    if len(masks) != len(inputs):
        raise ValueError(f"mask: expected one mask per input tensor ({len(inputs)}); got {len(masks)}.")
    if all(m is None for m in masks):
        raise ValueError("mask: every entry is None, so nothing would be penalised; pass a zero mask for that.")
    checked: list[Optional[torch.Tensor]] = []
    for i, (m, x) in enumerate(zip(masks, inputs)):
        where = "mask" if len(inputs) == 1 else f"mask[{i}]"
        if m is None:
            checked.append(None)
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{where}: expected a tensor or None; got {type(m).__name__}.")
        if not x.is_floating_point():
            raise TypeError(
                f"inputs{'' if len(inputs) == 1 else f'[{i}]'}: has dtype {x.dtype}, which has no input "
                "gradient; give it a mask of None or pass a floating-point tensor."
            )
        try:
            fits = torch.broadcast_shapes(m.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{where}: shape {tuple(m.shape)} does not broadcast to the input's shape {tuple(x.shape)}."
            )
        if m.is_floating_point() and not bool(torch.isfinite(m).all()):
            raise ValueError(
                f"{where}: NaN or inf at {_first_bad(m)}; expected finite per-feature weights (or a boolean mask)."
            )
        checked.append(m.to(device=x.device, dtype=x.dtype))
    return checked


def _first_bad(t: torch.Tensor) -> str:
    """Where a tensor is not finite, for a message: the first few positions."""
    bad = (~torch.isfinite(t)).nonzero()
    return f"positions {[tuple(p) for p in bad[:5].tolist()]}{' ...' if len(bad) > 5 else ''}"


def _check_labels(labels: torch.Tensor, inputs: tuple) -> int:
    n = batch_size_of(inputs)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"labels: expected a tensor of class indices (B,) or probabilities (B, K); got {type(labels).__name__}."
        )
    ok = (labels.dim() == 1 and not labels.is_floating_point()) or (labels.dim() == 2 and labels.is_floating_point())
    if not ok or labels.shape[0] != n:
        raise ValueError(
            f"labels: expected integer class indices of shape ({n},) or class probabilities of shape "
            f"({n}, K); got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    return n


def _check_logits(logits: torch.Tensor, n: int, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model: expected logits of shape ({n}, K) with K >= 2 classes; it returned {got}.")
    if labels.dim() == 2 and labels.shape != logits.shape:
        raise ValueError(
            f"labels: class probabilities of shape {tuple(labels.shape)} do not match the logits' shape "
            f"{tuple(logits.shape)}."
        )
    if labels.dim() == 1:
        bad = ((labels < 0) | (labels >= logits.shape[1])).nonzero().flatten()
        if len(bad):
            raise ValueError(
                f"labels: {labels[bad[:5]].tolist()} at examples {bad[:20].tolist()} are not class indices of "
                f"the model's {logits.shape[1]} classes; expected values in [0, {logits.shape[1]})."
            )
