"""How good are the scores: linear datamodeling score, mislabel detection and Spearman correlation.

Plain numpy (no scipy needed at run time); ties get average ranks, as in ``scipy.stats.rankdata``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._arrays import as_array, as_mask, check_length

__all__ = ["lds", "mislabel_detection_auc", "spearman"]


def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values share the average of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_group = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    # positions start..end-1 hold ranks start+1..end, whose mean is (start + 1 + end) / 2
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(starts_group) - 1]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float(xc @ yc / np.sqrt((xc @ xc) * (yc @ yc)))


def _is_constant(x: np.ndarray) -> bool:
    return bool((x == x[0]).all())


def spearman(x: Any, y: Any) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (average) ranks of ``x`` and ``y``.

    Args:
        x (array-like): n >= 2 values (a list, numpy array or tensor), not all equal.
        y (array-like): n values, paired with ``x``, not all equal.

    Returns:
        float: the rank correlation, in [-1, 1].

    Example::

        >>> spearman([1, 2, 3], [10, 30, 20])
        0.5
    """
    a, b = as_array(x, "x", ndim=1), as_array(y, "y", ndim=1)
    check_length(b, "y", a.size, "entry of x")
    if a.size < 2:
        raise ValueError(f"x: expected at least 2 values; got {a.size}.")
    for name, v in (("x", a), ("y", b)):
        if _is_constant(v):
            raise ValueError(f"{name}: all {v.size} values equal {v[0]!r}; the rank correlation is undefined.")
    return _pearson(_rankdata(a), _rankdata(b))


def lds(scores: Any, subset_masks: Any, subset_outputs: Any, *, on_constant: str = "raise") -> float:
    """Linear datamodeling score (Park et al. 2023, TRAK).

    For training subsets S_1..S_m (``subset_masks`` (m, n_train), booleans) and models retrained on
    them with outputs ``subset_outputs`` (m, n_test), the scores (n_test, n_train) predict
    g_t(S_j) = sum_{i in S_j} scores[t, i]; LDS = mean over test examples t of
    Spearman_j(g_t(S_j), actual[j, t]).

    A test example whose predicted or actual outputs are the same for every subset has no rank
    correlation: ``on_constant="raise"`` (default) names such examples, ``"skip"`` averages over the rest.

    Args:
        scores (array-like): attribution scores of shape (n_test, n_train), as returned by
            ``influence(test)``.
        subset_masks (array-like): booleans of shape (m, n_train), m >= 3: row j marks the
            training examples in subset S_j.
        subset_outputs (array-like): shape (m, n_test): the output (e.g. TRAK's margin) of the
            model retrained on S_j, on each test example.
        on_constant (str, optional): ``"raise"`` or ``"skip"``, for test examples whose predicted
            or actual outputs do not vary over the subsets. Default: ``"raise"``.

    Returns:
        float: the mean over test examples of the Spearman correlation, in [-1, 1].

    Example::

        >>> masks = rng.random((100, n_train)) < 0.5        # 100 random halves
        >>> outputs = retrain_and_evaluate(masks)           # (100, n_test)
        >>> ci.metrics.lds(trak.influence(test), masks, outputs)
    """
    if on_constant not in ("raise", "skip"):
        raise ValueError(f"on_constant: expected 'raise' or 'skip'; got {on_constant!r}.")
    s = as_array(scores, "scores", ndim=2)
    masks = as_mask(subset_masks, "subset_masks", ndim=2)
    actual = as_array(subset_outputs, "subset_outputs", ndim=2)
    n_test, n_train = s.shape
    if masks.shape[1] != n_train:
        raise ValueError(
            f"subset_masks: expected shape (m, n_train={n_train}) to match scores {s.shape}; got {masks.shape}."
        )
    m = masks.shape[0]
    if actual.shape != (m, n_test):
        raise ValueError(
            f"subset_outputs: expected shape (m={m}, n_test={n_test}) from subset_masks {masks.shape} and "
            f"scores {s.shape}; got {actual.shape}."
        )
    if m < 3:
        raise ValueError(f"subset_masks: expected at least 3 subsets for a rank correlation; got {m}.")
    predicted = masks.astype(np.float64) @ s.T
    constant = [t for t in range(n_test) if _is_constant(predicted[:, t]) or _is_constant(actual[:, t])]
    if constant and on_constant == "raise":
        shown = ", ".join(map(str, constant[:10])) + (", ..." if len(constant) > 10 else "")
        raise ValueError(
            f"subset_outputs/scores: {len(constant)} of {n_test} test examples have the same predicted or actual "
            f"output on every subset (test indices {shown}), so their rank correlation is undefined; "
            "pass on_constant='skip' to average over the others."
        )
    keep = sorted(set(range(n_test)) - set(constant))
    if not keep:
        raise ValueError("subset_outputs/scores: every test example has a constant predicted or actual output.")
    return float(np.mean([_pearson(_rankdata(predicted[:, t]), _rankdata(actual[:, t])) for t in keep]))


def mislabel_detection_auc(self_influence: Any, is_mislabeled: Any) -> float:
    """ROC AUC of finding mislabelled examples by ranking on self-influence (higher = more suspect).

    AUC = P(score of a mislabelled example > score of a clean one), ties counting 1/2:
    (sum of the mislabelled examples' average ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).

    Args:
        self_influence (array-like): one score per training example, shape (n,), as returned by
            ``self_influence()`` (for regression, pass its absolute value).
        is_mislabeled (array-like): booleans of shape (n,), True for the mislabelled examples;
            both classes must occur.

    Returns:
        float: the ROC AUC, in [0, 1] (0.5: no better than chance).

    Example::

        >>> ci.metrics.mislabel_detection_auc(tracin.self_influence(), flipped)
    """
    si = as_array(self_influence, "self_influence", ndim=1)
    mis = as_mask(is_mislabeled, "is_mislabeled", ndim=1)
    check_length(mis, "is_mislabeled", si.size, "self-influence value")
    n_pos = int(mis.sum())
    n_neg = mis.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"is_mislabeled: expected both mislabelled and clean examples; got {n_pos} mislabelled of {mis.size}."
        )
    return float((_rankdata(si)[mis].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
