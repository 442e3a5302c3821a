"""TracInCPFastRandProj: exact without projection (against Captum on a layer without bias, where
Captum's scores are exact too), projected scores close to the exact ones, and a nearest-neighbour
index used through Captum's interface."""

import pytest
import torch
from captum.influence import TracInCPFastRandProj as CaptumRandProj
from captum.influence._utils.nearest_neighbors import NearestNeighbors
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci

TracInCPFastRandProj = ci.TracInCPFastRandProj


class BruteForceDot(NearestNeighbors):
    """The largest dot products by a full sort: an index with Captum's interface, and exact."""

    def setup(self, data):
        self.data = data.reshape(data.shape[0], -1)

    def get_nearest_neighbors(self, query, k):
        scores = query.reshape(query.shape[0], -1) @ self.data.T
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        return order, scores.gather(1, order)


def _setup(bias=False, n_train=30, n_test=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4, bias=bias)).double()
    x, y = torch.randn(n_train + n_test, 5, dtype=torch.float64), torch.randint(0, 4, (n_train + n_test,))
    return model, TensorDataset(x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _load(model, path):
    model.load_state_dict(torch.load(path))
    return 0.7


def test_exact_without_projection_equals_captum(tmp_path):
    model, train, test = _setup()
    path = str(tmp_path / "ckpt.pt")
    torch.save(model.state_dict(), path)
    loss = nn.CrossEntropyLoss(reduction="sum")
    theirs = CaptumRandProj(
        model, model[2], train, [path], _load, loss_fn=loss, batch_size=8, nearest_neighbors=BruteForceDot()
    )
    ours = TracInCPFastRandProj(model, model[2], train, [path], _load, loss_fn=loss, batch_size=8)
    torch.testing.assert_close(ours.influence(test, k=None), theirs.influence(test, k=None), rtol=1e-9, atol=1e-11)
    top, their_top = ours.influence(test), theirs.influence(test)  # k=5 by default, as in Captum
    assert top.indices.shape == (6, 5) and torch.equal(top.indices, their_top.indices)
    torch.testing.assert_close(top.influence_scores, their_top.influence_scores, rtol=1e-9, atol=1e-11)
    with_index = TracInCPFastRandProj(
        model, model[2], train, [path], _load, loss_fn=loss, batch_size=8, nearest_neighbors=BruteForceDot()
    )
    for proponents in (True, False):
        got, want = (
            with_index.influence(test, k=4, proponents=proponents),
            ours.influence(test, k=4, proponents=proponents),
        )
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.influence_scores, want.influence_scores, rtol=1e-9, atol=1e-11)


def test_projected_scores_approach_the_exact_ones():
    """Projected inner products are unbiased: the error falls with the projection dimension, and
    the mean over seeds approaches the exact scores. The same seed gives the same scores for any
    batch size."""
    model, train, test = _setup(bias=True, n_train=60)
    exact = ci.TracInCPFast(model, model[2], train, [model.state_dict()]).influence(test)

    def projected(k, seed, batch_size=64):
        return TracInCPFastRandProj(
            model, model[2], train, [model.state_dict()], projection_dim=k, seed=seed, batch_size=batch_size
        ).influence(test, k=None)

    def error(scores):
        return float((scores - exact).norm() / exact.norm())

    assert error(projected(32, 0)) < error(projected(4, 0))  # the gradient has 4 x (8 + 1) = 36 entries
    assert error(torch.stack([projected(32, seed) for seed in range(16)]).mean(0)) < 0.25
    torch.testing.assert_close(projected(32, 3, batch_size=7), projected(32, 3), rtol=1e-9, atol=1e-11)


def test_bad_arguments_name_them():
    model, train, _ = _setup()
    with pytest.raises(ValueError, match="projection_dim"):
        TracInCPFastRandProj(model, model[2], train, [model.state_dict()], projection_dim=0)
    with pytest.raises(TypeError, match="nearest_neighbors"):
        TracInCPFastRandProj(model, model[2], train, [model.state_dict()], nearest_neighbors=object())
