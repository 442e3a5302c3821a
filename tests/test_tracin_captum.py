"""TracInCP and TracInCPFast with Captum 0.9's keywords, against Captum on the same float64 model,
data and checkpoints."""

import pytest
import torch
from captum.influence import TracInCP as CaptumTracInCP
from captum.influence import TracInCPFast as CaptumTracInCPFast
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci


def _setup(n_train=20, n_test=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    checkpoints = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    x, y = torch.randn(n_train + n_test, 6, dtype=torch.float64), torch.randint(0, 3, (n_train + n_test,))
    return model, checkpoints, TensorDataset(x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _load(model, checkpoint):
    model.load_state_dict(checkpoint)
    return 0.5


def _captum(cls, model, train, checkpoints, **kwargs):
    paths = checkpoints  # Captum takes paths: write them once per test
    return cls(model, train, paths, checkpoints_load_func=_load_path, batch_size=7, **kwargs)


def _load_path(model, path):
    model.load_state_dict(torch.load(path))
    return 0.5


@pytest.fixture
def setup(tmp_path):
    model, checkpoints, train, test = _setup()
    paths = []
    for i, state in enumerate(checkpoints):
        paths.append(str(tmp_path / f"ckpt_{i}.pt"))
        torch.save(state, paths[-1])
    return model, checkpoints, paths, train, test


def _ours_cp(model, train, checkpoints, **kwargs):
    return ci.TracInCP(model, train, checkpoints, _load, batch_size=7, **kwargs)


def test_aggregate_influence_and_topk_equal_captum(setup):
    model, checkpoints, paths, train, test = setup
    loss = nn.CrossEntropyLoss(reduction="none")
    theirs = _captum(CaptumTracInCP, model, train, paths, loss_fn=loss, sample_wise_grads_per_batch=False)
    ours = _ours_cp(model, train, checkpoints, loss_fn=loss)
    expected = theirs.influence(test, aggregate=True)
    got = ours.influence(test, aggregate=True)
    assert got.shape == (1, 20) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    top = ours.influence(test, k=4, aggregate=True, proponents=False)
    their_top = theirs.influence(test, k=4, aggregate=True, proponents=False)
    assert torch.equal(top.indices, their_top.indices)
    torch.testing.assert_close(top.influence_scores, their_top.influence_scores, rtol=1e-10, atol=1e-12)
    # Captum scales its vectors by eta_c, ours by sqrt(eta_c) (so that their dot products are the
    # scores): the same vectors for weight 1, and ours times sqrt(eta_c) / eta_c otherwise.
    vectors = ours.compute_intermediate_quantities(test, aggregate=True)
    theirs_vectors = theirs.compute_intermediate_quantities(test, aggregate=True)
    torch.testing.assert_close(vectors, theirs_vectors * 0.5**0.5 / 0.5, rtol=1e-10, atol=1e-12)
    rows = ours.compute_intermediate_quantities(test)
    torch.testing.assert_close(rows.sum(0, keepdim=True), vectors, rtol=1e-12, atol=1e-12)


def test_test_loss_fn_and_captum_keywords_equal_captum(setup):
    model, checkpoints, paths, train, test = setup
    loss, test_loss = nn.CrossEntropyLoss(reduction="none"), nn.MultiMarginLoss(reduction="none")
    theirs = _captum(
        CaptumTracInCP, model, train, paths, loss_fn=loss, test_loss_fn=test_loss, sample_wise_grads_per_batch=False
    )
    ours = _ours_cp(model, train, checkpoints, loss_fn=loss, test_loss_fn=test_loss, sample_wise_grads_per_batch=True)
    got = ours.influence(test, show_progress=False)
    torch.testing.assert_close(got, theirs.influence(test), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, _ours_cp(model, train, checkpoints, loss_fn=loss).influence(test))
    self_scores = ours.self_influence(None, show_progress=False, outer_loop_by_checkpoints=True)
    torch.testing.assert_close(
        self_scores, theirs.self_influence(None, outer_loop_by_checkpoints=True), rtol=1e-10, atol=1e-12
    )
    assert self_scores.dtype == torch.float64


def test_k_is_clamped_to_the_training_set_as_in_captum(setup):
    model, checkpoints, paths, train, test = setup
    loss = nn.CrossEntropyLoss(reduction="none")
    theirs = _captum(CaptumTracInCP, model, train, paths, loss_fn=loss, sample_wise_grads_per_batch=False)
    top = _ours_cp(model, train, checkpoints, loss_fn=loss).influence(test, k=50)
    their_top = theirs.influence(test, k=50)
    assert top.indices.shape == (5, 20)
    torch.testing.assert_close(top.influence_scores, their_top.influence_scores, rtol=1e-10, atol=1e-12)


def test_fast_test_loss_fn_and_a_replaced_weight_shape(setup):
    """Captum's TracInCPFast omits the bias term: compare on a layer without bias, whose weight
    was replaced by one of another shape (the layer's in_features no longer matches)."""
    model, checkpoints, paths, train, test = setup
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    model[2].weight.data = torch.rand(3, 5, dtype=torch.float64)
    model[0].weight.data = torch.rand(5, 6, dtype=torch.float64) - 0.5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, paths[0])
    loss, test_loss = nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(reduction="mean")
    theirs = CaptumTracInCPFast(
        model,
        model[2],
        train,
        paths[:1],
        checkpoints_load_func=_load_path,
        loss_fn=loss,
        test_loss_fn=test_loss,
        batch_size=7,
    )
    ours = ci.TracInCPFast(
        model, model[2], train, [state], _load, loss_fn=loss, test_loss_fn=test_loss, batch_size=7, vectorize=True
    )
    torch.testing.assert_close(ours.influence(test), theirs.influence(test), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours.self_influence(), theirs.self_influence(), rtol=1e-9, atol=1e-11)


def test_fast_with_a_weight_of_another_shape_than_in_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    model[2].weight.data = torch.rand(1, 7, dtype=torch.float64)
    model[2].in_features = 3  # stale: the rule must use the weight's own shape
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    train = TensorDataset(x, y)
    loss = nn.MSELoss(reduction="none")
    ours = ci.TracInCPFast(model, model[2], train, [model.state_dict()], loss_fn=loss, batch_size=4)
    grads = torch.stack(
        [
            torch.cat(
                [
                    g.flatten()
                    for g in torch.autograd.grad(
                        loss(model(x[i : i + 1]), y[i : i + 1]).sum(), [model[2].weight, model[2].bias]
                    )
                ]
            )
            for i in range(9)
        ]
    )
    torch.testing.assert_close(ours.influence((x, y)), grads @ grads.T, rtol=1e-10, atol=1e-12)


def test_bad_captum_keywords_name_the_argument(setup):
    model, checkpoints, paths, train, test = setup
    with pytest.raises(TypeError, match="sample_wise_grads_per_batch"):
        _ours_cp(model, train, checkpoints, sample_wise_grads_per_batch="yes")
    with pytest.raises(TypeError, match="test_loss_fn"):
        _ours_cp(model, train, checkpoints, test_loss_fn=3)
    with pytest.raises(ValueError, match="k: expected a positive int"):
        _ours_cp(model, train, checkpoints).influence(test, k=-1)
