import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

import captum_influence as ci
from captum_influence.metrics import lds, mislabel_detection_auc, spearman


def test_exported_at_top_level():
    assert ci.metrics.lds is lds
    assert ci.metrics.mislabel_detection_auc is mislabel_detection_auc


def test_spearman_by_hand_and_against_scipy_with_ties():
    # ranks (1, 2, 3) against (1, 3, 2): 1 - 6 * (0 + 1 + 1) / (3 * (9 - 1)) = 0.5
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 40), rng.integers(0, 6, 40)  # many ties
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(torch.tensor(x), torch.tensor(y, dtype=torch.float32)) == pytest.approx(spearmanr(x, y).statistic)
    with pytest.raises(ValueError, match="y: .*undefined"):
        spearman([1, 2, 3], [5, 5, 5])
    with pytest.raises(ValueError, match="y"):
        spearman([1, 2, 3], [1, 2])


def test_lds_by_hand():
    scores = np.array([[1.0, 2.0, 4.0], [4.0, 2.0, 1.0]])
    masks = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    # predicted sums: test 0 -> 1, 2, 4, 3; test 1 -> 4, 2, 1, 6
    outputs = np.array([[10.0, 0.0], [20.0, 1.0], [40.0, 2.0], [30.0, 3.0]])
    # test 0 ranks agree exactly (+1); test 1: ranks (3, 2, 1, 4) vs (1, 2, 3, 4): d^2 = 4 + 0 + 4 + 0,
    # rho = 1 - 6 * 8 / (4 * 15) = 0.2
    assert lds(scores, masks, outputs) == pytest.approx((1.0 + 0.2) / 2)
    assert lds(scores[:1], masks, -outputs[:, :1]) == pytest.approx(-1.0)


def test_lds_matches_scipy_per_test_example():
    rng = np.random.default_rng(1)
    n_test, n_train, m = 6, 40, 25
    scores = rng.standard_normal((n_test, n_train))
    masks = rng.random((m, n_train)) < 0.5
    predicted = masks.astype(float) @ scores.T
    outputs = predicted + rng.standard_normal((m, n_test))
    expected = np.mean([spearmanr(predicted[:, t], outputs[:, t]).statistic for t in range(n_test)])
    assert lds(torch.tensor(scores), torch.tensor(masks), torch.tensor(outputs)) == pytest.approx(expected, abs=1e-12)
    # 0/1 integer masks are read as booleans
    assert lds(scores, masks.astype(int), outputs) == pytest.approx(expected, abs=1e-12)


def test_lds_constant_outputs_raise_or_are_skipped():
    rng = np.random.default_rng(2)
    scores = rng.standard_normal((3, 10))
    masks = rng.random((8, 10)) < 0.5
    outputs = masks.astype(float) @ scores.T + rng.standard_normal((8, 3))
    outputs[:, 1] = 7.0
    with pytest.raises(ValueError, match=r"test indices 1\b.*on_constant='skip'"):
        lds(scores, masks, outputs)
    predicted = masks.astype(float) @ scores.T
    expected = np.mean([spearmanr(predicted[:, t], outputs[:, t]).statistic for t in (0, 2)])
    assert lds(scores, masks, outputs, on_constant="skip") == pytest.approx(expected)
    with pytest.raises(ValueError, match="every test example"):
        lds(scores, masks, np.ones((8, 3)), on_constant="skip")
    with pytest.raises(ValueError, match="on_constant"):
        lds(scores, masks, outputs, on_constant="ignore")


def test_lds_bad_shapes_name_the_argument():
    scores, masks, outputs = np.zeros((2, 5)), np.ones((4, 5), dtype=bool), np.zeros((4, 2))
    with pytest.raises(ValueError, match="subset_masks"):
        lds(scores, masks[:, :4], outputs)
    with pytest.raises(ValueError, match="subset_outputs"):
        lds(scores, masks, outputs.T)
    with pytest.raises(ValueError, match="subset_masks: expected booleans"):
        lds(scores, masks * 2, outputs)
    with pytest.raises(ValueError, match="scores: expected a 2-D"):
        lds(scores[0], masks, outputs)
    with pytest.raises(ValueError, match="scores: .*NaN"):
        lds(np.full((2, 5), np.nan), masks, outputs)


def test_mislabel_detection_auc_by_hand():
    # pairs (mislabelled, clean): (0.9, 0.8) and (0.9, 0.4) ranked right, (0.1, 0.8) and (0.1, 0.4) wrong
    assert mislabel_detection_auc([0.9, 0.8, 0.1, 0.4], [1, 0, 1, 0]) == pytest.approx(0.5)
    # a tie counts one half: (1 vs 1) = 0.5, (1 vs 0) = 1
    assert mislabel_detection_auc([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.75)


def test_mislabel_detection_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    mis = rng.random(300) < 0.1
    si = np.round(rng.standard_normal(300) + 1.5 * mis, 1)  # rounding makes ties
    expected = roc_auc_score(mis, si)
    assert mislabel_detection_auc(torch.tensor(si, dtype=torch.float64), torch.tensor(mis)) == pytest.approx(expected)


def test_mislabel_detection_auc_bad_input():
    with pytest.raises(ValueError, match="is_mislabeled: expected both"):
        mislabel_detection_auc([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="is_mislabeled: expected one entry"):
        mislabel_detection_auc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(ValueError, match="self_influence: expected a 1-D"):
        mislabel_detection_auc(np.ones((2, 2)), [True, False])
