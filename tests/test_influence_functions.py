"""NaiveInfluenceFunction and ArnoldiInfluenceFunction against closed forms, explicit Hessians,
Captum, and themselves under torch.distributed; the "auto" damping; bad inputs; the benchmark."""

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import as_examples, flat_params, tiny_bert, tiny_gpt2_classifier, unflat, user_warnings
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap
from torch.utils.data import DataLoader, TensorDataset

import captum_influence as ci
from captum_influence import influence_functions
from captum_influence.tasks import ContrastiveOutput

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "influence_functions.py"


# --- references ----------------------------------------------------------------------------


def example_loss(model, loss):
    """loss(theta, x_i, y_i) of one example, for torch.func."""

    def one(theta, x, y):
        return loss(functional_call(model, unflat(model, theta), (x[None],)), y[None]).sum()

    return one


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def reference_hessian(model, x, y, loss=ce):
    one = example_loss(model, loss)
    summed = lambda theta: sum(one(theta, x[i], y[i]) for i in range(len(y)))  # noqa: E731
    return hessian(summed)(flat_params(model))


def reference_grads(model, x, y, loss=ce):
    return vmap(grad(example_loss(model, loss)), in_dims=(None, 0, 0))(flat_params(model), x, y)


def gauss_newton_per_example(model, x):
    """G_i = J_i^T (diag p - p p^T) J_i for cross-entropy: (n, P, P)."""
    theta = flat_params(model)
    jac = jacrev(lambda t: functional_call(model, unflat(model, t), (x,)))(theta)  # (n, C, P)
    p = model(x).softmax(1).detach()
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->npq", jac, lam, jac)


def problem(seed=0, n=40, d=5, hidden=7, classes=3, dtype=torch.float64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)
    x = torch.randn(n, d, dtype=dtype)
    y = torch.randint(0, classes, (n,))
    test = (torch.randn(6, d, dtype=dtype), torch.randint(0, classes, (6,)))
    return model, TensorDataset(x, y), test


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- exactness -----------------------------------------------------------------------------


def test_naive_equals_the_closed_form_on_linear_regression():
    """As Captum's test: for y = w.x with the squared loss, H = 2 X^T X and g = 2 (w.x - y) x."""
    torch.manual_seed(1)
    model = nn.Linear(4, 1, bias=False).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    xt, yt = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    naive = ci.NaiveInfluenceFunction(
        model,
        TensorDataset(x, y),
        loss_fn=nn.MSELoss(reduction="none"),
        hessian_reg=0.0,
        hessian_inverse_tol=0.0,
        complement=False,
        batch_size=7,
    )
    w = model.weight.detach()[0]
    h = 2 * x.T @ x
    g_train, g_test = 2 * (x @ w - y[:, 0])[:, None] * x, 2 * (xt @ w - yt[:, 0])[:, None] * xt
    expected = g_test @ torch.linalg.solve(h, g_train.T)
    assert rel(naive.influence((xt, yt)), expected) < 1e-10
    assert rel(naive.self_influence(), (g_train @ torch.linalg.solve(h, g_train.T)).diagonal()) < 1e-10
    assert torch.allclose(naive.hessian(), h, atol=1e-12)


def test_naive_equals_an_explicit_hessian_reference_on_an_mlp_in_float64():
    model, train, test = problem()
    x, y = train.tensors
    h = reference_hessian(model, x, y)
    lam = float(-torch.linalg.eigvalsh(h).min()) + 1.0  # H + lam I positive definite
    naive = ci.NaiveInfluenceFunction(
        model, train, hessian_reg=lam, hessian_inverse_tol=0.0, complement=False, batch_size=16
    )
    assert torch.allclose(naive.hessian(), h, atol=1e-10)
    g, gt = reference_grads(model, x, y), reference_grads(model, *test)
    expected = gt @ torch.linalg.solve(h + lam * torch.eye(len(h), dtype=torch.float64), g.T)
    assert rel(naive.influence(test), expected) < 1e-10
    top = naive.influence(test, k=4, proponents=False)
    order = expected.argsort(dim=1)[:, :4]
    assert torch.equal(top.indices, order)


def test_naive_defaults_are_the_positive_part_of_h_plus_the_auto_damping():
    """Default settings: M = V diag(1/(max(l, 0) + lambda)) V^T (complement), lambda = damping_."""
    model, train, test = problem(seed=2)
    x, y = train.tensors
    naive = ci.NaiveInfluenceFunction(model, train, batch_size=16)
    scores = naive.influence(test)
    lam = naive.damping_
    values, vectors = torch.linalg.eigh(reference_hessian(model, x, y))
    m = vectors @ torch.diag(1 / (values.clamp(min=0) + lam)) @ vectors.T
    assert rel(scores, reference_grads(model, *test) @ m @ reference_grads(model, x, y).T) < 1e-9


def test_auto_damping_is_one_examples_curvature_along_one_direction():
    """lambda = sum_ij c_ij^2 / sum_ij c_ij, c_ij = v_j^T G_i v_j in H's eigenbasis."""
    model, train, _ = problem(seed=3, n=25, hidden=5)
    x, y = train.tensors
    naive = ci.NaiveInfluenceFunction(model, train, batch_size=8)
    naive.self_influence()
    _, vectors = torch.linalg.eigh(reference_hessian(model, x, y))
    per_example = gauss_newton_per_example(model, x)
    c = torch.einsum("pj,npq,qj->nj", vectors, per_example, vectors)
    expected = float((c**2).sum() / c.sum())
    assert math.isclose(naive.damping_, expected, rel_tol=1e-8)
    trace_rule = float(per_example.diagonal(dim1=1, dim2=2).sum()) / len(y)
    assert 0 < naive.damping_ < max(trace_rule, float(per_example.diagonal(dim1=1, dim2=2).sum(1).max()))


@pytest.mark.parametrize("complement", [True, False])
def test_arnoldi_converges_to_naive_as_the_krylov_dimension_grows(complement):
    model, train, test = problem(seed=4, hidden=6)
    settings = dict(hessian_reg=0.5, batch_size=16, complement=complement)
    naive = ci.NaiveInfluenceFunction(model, train, **settings).influence(test)
    p = sum(q.numel() for q in model.parameters())
    errors = []
    for dim in (8, 24, p):
        arnoldi = ci.ArnoldiInfluenceFunction(model, train, arnoldi_dim=dim, arnoldi_block=4, **settings)
        errors.append(rel(arnoldi.influence(test), naive))
    assert errors[-1] < 1e-8, errors
    assert errors[0] > errors[-1] and errors[1] < errors[0], errors


def test_arnoldi_keeps_the_top_eigenpairs():
    """The Ritz values of a Krylov space of the whole dimension are H's eigenvalues."""
    model, train, _ = problem(seed=5, hidden=4)
    x, y = train.tensors
    arnoldi = ci.ArnoldiInfluenceFunction(
        model,
        train,
        arnoldi_dim=100,
        arnoldi_block=3,
        hessian_reg=0.1,
        hessian_inverse_tol=0.0,
        complement=False,
        projection_dim=5,
    )
    arnoldi.self_influence()
    values = torch.linalg.eigvalsh(reference_hessian(model, x, y))
    weights = arnoldi._solve.weights
    assert torch.allclose(1 / weights - 0.1, values[-5:], rtol=1e-8)
    assert arnoldi.compute_intermediate_quantities(train).shape == (len(y), 5)


def test_arnoldi_default_block_leaves_enough_steps_for_a_small_krylov_dimension():
    """arnoldi_dim=48 on 111 parameters: the default block (48 // 32 = 1 vector per step) gives H's
    top eigenvalues; a block of 32 (two steps, a polynomial of degree one in H) would miss them."""
    model, train, _ = problem(seed=8, hidden=12)
    x, y = train.tensors
    settings = dict(hessian_reg=0.1, hessian_inverse_tol=0.0, complement=False, projection_dim=5, batch_size=40)
    arnoldi = ci.ArnoldiInfluenceFunction(model, train, arnoldi_dim=48, **settings)
    arnoldi.self_influence()
    assert arnoldi.arnoldi_block == 1
    values = torch.linalg.eigvalsh(reference_hessian(model, x, y))
    assert torch.allclose(1 / arnoldi._solve.weights - 0.1, values[-5:], rtol=1e-8)


def test_captums_arnoldi_influence_function_agrees(tmp_path):
    """A Krylov dimension above the number of parameters makes the Ritz pairs H's eigenpairs
    whatever the starting vectors: Captum's ArnoldiInfluenceFunction and ours (complement=False)
    then give the same scores on an MLP with an indefinite Hessian."""
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction as CaptumArnoldi

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    test = (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    train = TensorDataset(x, y)
    settings = dict(
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=30,
        projection_dim=6,
        hessian_reg=1e-2,
        hessian_inverse_tol=1e-4,
        arnoldi_dim=45,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = CaptumArnoldi(model, train, str(path), arnoldi_tol=1e-10, **settings)
        theirs, their_self = captum.influence(test), captum.self_influence()
    ours = ci.ArnoldiInfluenceFunction(model, train, str(path), complement=False, **settings)
    assert rel(ours.influence(test), theirs) < 1e-9
    assert rel(ours.self_influence(), their_self) < 1e-9


def test_captums_naive_influence_function_agrees(tmp_path):
    """Softmax regression (a convex loss): Captum's NaiveInfluenceFunction and ours with the same
    projection_dim, hessian_reg and hessian_inverse_tol give the same scores."""
    from captum.influence import NaiveInfluenceFunction as CaptumNaive

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    test = (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    train = TensorDataset(x, y)
    settings = dict(
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=8,
        projection_dim=10,
        hessian_reg=1e-3,
        hessian_inverse_tol=1e-5,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = CaptumNaive(model, train, str(path), **settings)
        theirs = captum.influence(test)
        their_self = captum.self_influence()
        their_top = captum.influence(test, k=3)
        their_vectors = captum.compute_intermediate_quantities(test)
    ours = ci.NaiveInfluenceFunction(model, train, str(path), complement=False, **settings)
    assert rel(ours.influence(test), theirs) < 1e-9
    assert rel(ours.self_influence(), their_self) < 1e-9
    top = ours.influence(test, k=3)
    assert torch.equal(top.indices, their_top.indices)
    assert rel(top.influence_scores, their_top.influence_scores) < 1e-9
    vectors = ours.compute_intermediate_quantities(test)
    assert vectors.shape == their_vectors.shape  # columns agree up to their signs
    assert rel(vectors @ vectors.T, their_vectors @ their_vectors.T) < 1e-9


# --- forms of the loss, the API ------------------------------------------------------------


def test_all_three_are_captum_data_influence_methods_with_captums_signatures():
    import inspect

    from captum.influence import DataInfluence
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction as CaptumArnoldi
    from captum.influence._core.influence_function import NaiveInfluenceFunction as CaptumNaive

    model, train, _ = problem()
    for method in (
        ci.NaiveInfluenceFunction(model, train),
        ci.ArnoldiInfluenceFunction(model, train),
        ci.EKFACInfluence(model, train),
    ):
        assert isinstance(method, DataInfluence)
    for ours, theirs in ((ci.NaiveInfluenceFunction, CaptumNaive), (ci.ArnoldiInfluenceFunction, CaptumArnoldi)):
        captum_args = list(inspect.signature(theirs.__init__).parameters)
        assert list(inspect.signature(ours.__init__).parameters)[: len(captum_args)] == captum_args
        for name in ("influence", "self_influence", "compute_intermediate_quantities"):
            captum_params = list(inspect.signature(getattr(theirs, name)).parameters)
            assert list(inspect.signature(getattr(ours, name)).parameters)[: len(captum_params)] == captum_params, name


def test_reductions_and_a_callable_loss_give_the_same_scores():
    model, train, test = problem(seed=7)
    results = []
    for loss in (
        None,
        nn.CrossEntropyLoss(reduction="none"),
        nn.CrossEntropyLoss(reduction="mean"),
        nn.CrossEntropyLoss(reduction="sum"),
        lambda out, y: F.cross_entropy(out, y, reduction="none"),
    ):
        results.append(
            ci.NaiveInfluenceFunction(model, train, loss_fn=loss, hessian_reg=1.0, batch_size=16).influence(test)
        )
    for r in results[1:]:
        assert rel(r, results[0]) < 1e-10


def test_task_form_attributes_the_tasks_output():
    """task="classification": training loss task.loss, test side the margin f: tau = -grad f^T M grad L."""
    model, train, test = problem(seed=8)
    x, y = train.tensors
    naive = ci.NaiveInfluenceFunction(
        model, train, task="classification", hessian_reg=4.0, hessian_inverse_tol=0.0, complement=False, batch_size=16
    )
    h = reference_hessian(model, x, y)

    def margin(out, labels):
        correct = out.gather(1, labels[:, None])[:, 0]
        return correct - out.scatter(1, labels[:, None], float("-inf")).logsumexp(1)

    values, vectors = torch.linalg.eigh(h)
    keep = values + 4.0 > 0
    m = vectors[:, keep] @ torch.diag(1 / (values[keep] + 4.0)) @ vectors[:, keep].T
    expected = -reference_grads(model, *test, loss=margin) @ m @ reference_grads(model, x, y).T
    assert rel(naive.influence(test), expected) < 1e-9


def test_test_loss_fn_and_intermediate_quantities():
    model, train, test = problem(seed=9)
    test_loss = lambda out, y: -out.gather(1, y[:, None])[:, 0]  # noqa: E731  (the logit of the label)
    naive = ci.NaiveInfluenceFunction(model, train, test_loss_fn=test_loss, hessian_reg=1.0, batch_size=16)
    scores = naive.influence(test)
    train_side = naive.compute_intermediate_quantities(train)
    test_side = naive.compute_intermediate_quantities(test, test=True)
    assert rel(scores, test_side @ train_side.T) < 1e-10
    assert rel(naive.self_influence(train), (train_side**2).sum(1)) < 1e-10
    assert rel(naive.influence(test, aggregate=True), scores.sum(0, keepdim=True)) < 1e-10
    assert naive.compute_intermediate_quantities(test, aggregate=True).shape == (1, train_side.shape[1])


def test_float32_model_loaders_checkpoint_paths_and_the_model_restored(tmp_path):
    model, train, test = problem(seed=10, dtype=torch.float32)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the checkpoint, not the model's weights now, is attributed
    model.train()
    arnoldi = ci.ArnoldiInfluenceFunction(model, DataLoader(train, batch_size=9), str(path), arnoldi_dim=40)
    scores = arnoldi.influence(test)
    assert scores.dtype == torch.float32 and scores.shape == (6, 40) and bool(torch.isfinite(scores).all())
    assert model.training and all(not torch.equal(model.state_dict()[k], state[k]) for k in state)
    fresh = problem(seed=10, dtype=torch.float32)[0]
    again = ci.ArnoldiInfluenceFunction(fresh, DataLoader(train, batch_size=9), None, arnoldi_dim=40).influence(test)
    assert rel(again, scores) < 1e-4


def test_hessian_dataset_is_used_for_the_curvature():
    model, train, test = problem(seed=11)
    x, y = train.tensors
    part = TensorDataset(x[:10], y[:10])
    naive = ci.NaiveInfluenceFunction(model, train, hessian_dataset=part, hessian_reg=2.0, batch_size=4)
    assert torch.allclose(naive.hessian(), reference_hessian(model, x[:10], y[:10]), atol=1e-10)
    assert naive.influence(test).shape == (6, 40)


def test_store_resumes_and_refuses_other_settings(tmp_path):
    model, train, test = problem(seed=12)
    first = ci.ArnoldiInfluenceFunction(model, train, arnoldi_dim=30, store_dir=tmp_path / "s", batch_size=8)
    scores = first.influence(test)
    again = ci.ArnoldiInfluenceFunction(model, train, arnoldi_dim=30, store_dir=tmp_path / "s", batch_size=8)
    again._fit_curvature = lambda: pytest.fail("the stored solve was computed again")
    assert torch.equal(again.influence(test), scores)
    with pytest.raises(ValueError, match="other settings"):
        ci.ArnoldiInfluenceFunction(model, train, arnoldi_dim=31, store_dir=tmp_path / "s", batch_size=8)


def test_auto_damping_sees_the_models_output_in_its_own_shape(monkeypatch):
    """Logits (B, T, C) and a per-sequence loss: the Gauss-Newton matrix of the "auto" damping uses
    Lambda_i, the Hessian of example i's loss in its whole output, from torch.func."""

    def sequence_ce(out, y):
        return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)

    torch.manual_seed(13)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6, 5))
    naive = ci.NaiveInfluenceFunction(model, TensorDataset(x, y), loss_fn=sequence_ce, batch_size=4)
    naive.self_influence()
    theta = flat_params(model)
    h = hessian(lambda t: sequence_ce(functional_call(model, unflat(model, t), (x,)), y).sum())(theta)
    _, vectors = torch.linalg.eigh(h)
    c = []
    for i in range(len(y)):
        jac = jacrev(lambda t: functional_call(model, unflat(model, t), (x[i : i + 1],)).reshape(-1))(theta)
        out = model(x[i : i + 1]).detach().reshape(-1)
        lam = hessian(lambda o: sequence_ce(o.reshape(1, 5, 3), y[i : i + 1]).sum())(out)
        c.append(((jac @ vectors) * (lam @ jac @ vectors)).sum(0))
    c = torch.stack(c)
    assert math.isclose(naive.damping_, float((c**2).sum() / c.sum()), rel_tol=1e-8)
    # Output Hessians too large for memory are refused up front (here 4 x 15 x 15 float64).
    monkeypatch.setattr(influence_functions, "_AUTOGRAD_HESSIAN_BYTES", 8 * 4 * 15**2 - 1)
    with pytest.raises(ValueError, match="here 15 x 15 .* batch of 4; use a smaller batch_size"):
        ci.NaiveInfluenceFunction(model, TensorDataset(x, y), loss_fn=sequence_ce, batch_size=4).self_influence()


# --- transformers models ---------------------------------------------------------------------


def encodings(n, seed, token_types=True):
    """``(encoding, labels)``: n padded sequences of length 8 (the first one 4 tokens), 3 classes."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 9, (n,), generator=g)
    lengths[0] = 4
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    encoding = {"input_ids": torch.randint(1, 64, (n, 8), generator=g) * mask, "attention_mask": mask}
    if token_types:
        encoding["token_type_ids"] = torch.zeros_like(mask)
    return encoding, torch.randint(0, 3, (n,), generator=g)


# Model, data with or without token types, the selected layers (a LayerNorm and the classifier).
TRANSFORMERS = {
    "bert": (lambda: tiny_bert().double(), True, ["bert.encoder.layer.1.output.LayerNorm", "classifier"]),
    "gpt2": (lambda: tiny_gpt2_classifier(vocab_size=64).double(), False, ["transformer.ln_f", "score"]),
}


def selected_losses(model, layers, encoding, labels):
    """``(theta -> per-example cross-entropy, theta)``: the parameters of ``layers`` as one flat vector."""
    names = [n for n, _ in model.named_parameters() if any(n.startswith(layer + ".") for layer in layers)]
    fixed = {n: p.detach() for n, p in model.named_parameters()}

    def losses(theta):
        parts = dict(
            zip(
                names,
                (t.reshape(fixed[n].shape) for t, n in zip(theta.split([fixed[n].numel() for n in names]), names)),
            )
        )
        return F.cross_entropy(
            functional_call(model, {**fixed, **parts}, (), encoding).logits, labels, reduction="none"
        )

    return losses, torch.cat([fixed[n].reshape(-1) for n in names])


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_naive_on_a_transformers_classifier_equals_an_explicit_float64_hessian(name):
    """Dict encodings, the default loss and task="text_classification": H and the scores against
    torch.func in float64; no fallback warning (forward-over-reverse products run on the model)."""
    make, token_types, layers = TRANSFORMERS[name]
    model = make()
    train, test = encodings(8, 1, token_types), encodings(3, 2, token_types)
    losses, theta = selected_losses(model, layers, *train)
    h = hessian(lambda t: losses(t).sum())(theta)
    g, gt = jacrev(losses)(theta), jacrev(selected_losses(model, layers, *test)[0])(theta)
    lam = float(-torch.linalg.eigvalsh(h).min()) + 0.5
    m = torch.linalg.inv(h + lam * torch.eye(len(h), dtype=h.dtype))
    settings = dict(layers=layers, hessian_reg=lam, hessian_inverse_tol=0.0, complement=False, batch_size=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        naive = ci.NaiveInfluenceFunction(model, as_examples(train), **settings)
        assert rel(naive.hessian(), h) < 1e-10
        assert rel(naive.influence(test), gt @ m @ g.T) < 1e-9
        by_task = ci.NaiveInfluenceFunction(model, as_examples(train), task="text_classification", **settings)
        assert rel(by_task.self_influence(), ((g @ m) * g).sum(1)) < 1e-9
    assert user_warnings(record) == []


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_arnoldi_and_ekfac_run_on_a_transformers_classifier(name):
    """Arnoldi over the whole selected space (three blocks of 64) equals Naive; the "auto" damping
    is the same whether the loss is the default (closed-form Gauss-Newton), a callable of the
    output object (autograd) or the task; EK-FAC (a Kronecker block and a LayerNorm fallback) gives
    finite scores; nothing warns. A positional batch the model cannot take is named."""
    make, token_types, layers = TRANSFORMERS[name]
    model = make()
    train, test = as_examples(encodings(8, 1, token_types)), encodings(3, 2, token_types)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        naive = ci.NaiveInfluenceFunction(model, train, layers=layers, batch_size=8)
        scores = naive.influence(test)
        p = naive.layout.dim
        arnoldi = ci.ArnoldiInfluenceFunction(
            model, train, layers=layers, hessian_reg=naive.damping_, arnoldi_dim=p, arnoldi_block=64, batch_size=8
        )
        assert rel(arnoldi.influence(test), scores) < 1e-8
        on_object = lambda out, y: F.cross_entropy(out.logits, y, reduction="none")  # noqa: E731
        for form in (dict(loss_fn=on_object), dict(task="text_classification")):
            other = ci.NaiveInfluenceFunction(model, train, layers=layers, batch_size=8, **form)
            other.self_influence()
            assert math.isclose(other.damping_, naive.damping_, rel_tol=1e-10)
        ekfac = ci.EKFACInfluence(model, train, layers=layers, task="text_classification", batch_size=8)
        ek_scores, ek_self = ekfac.influence(test), ekfac.self_influence()
        assert len(ekfac.blocks.kron) == 1 and len(ekfac.blocks.diag) == 1
        assert bool(torch.isfinite(ek_scores).all()) and bool((ek_self > 0).all())
    assert user_warnings(record) == []
    encoding, labels = encodings(4, 3, token_types)
    positional = TensorDataset(*encoding.values(), labels)  # GPT-2's second positional input is a cache
    if name == "gpt2":
        with pytest.raises(ValueError, match="train_dataset: the loss fails on examples 0..3 .*positionally"):
            ci.NaiveInfluenceFunction(model, positional, layers=layers, batch_size=4).self_influence()


# --- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hessian_reg=-1.0), "hessian_reg"),
        (dict(hessian_reg="big"), "hessian_reg"),
        (dict(hessian_inverse_tol=-1e-3), "hessian_inverse_tol"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(hessian_reg=0.0), "complement"),
        (dict(projection_on_cpu="yes"), "projection_on_cpu"),
        (dict(task="classification", loss_fn=nn.CrossEntropyLoss(reduction="none")), "task"),
        (dict(task=ContrastiveOutput), "defines no loss"),
        (dict(layers=["nope"]), "layers"),
        (dict(loss_fn=nn.CrossEntropyLoss(reduction="batchmean")), "reduction"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    model, train, _ = problem()
    with pytest.raises((ValueError, TypeError), match=match):
        ci.NaiveInfluenceFunction(model, train, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(arnoldi_dim=0), "arnoldi_dim"),
        (dict(arnoldi_block=-2), "arnoldi_block"),
        (dict(arnoldi_tol=1.5), "arnoldi_tol"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_arnoldi_settings_are_refused(kwargs, match):
    model, train, _ = problem()
    with pytest.raises(ValueError, match=match):
        ci.ArnoldiInfluenceFunction(model, train, **kwargs)


def test_bad_data_is_named():
    model, train, test = problem()
    x, y = train.tensors
    with pytest.raises(ValueError, match="checkpoint: influence functions use one checkpoint"):
        ci.NaiveInfluenceFunction(model, train, [model.state_dict(), model.state_dict()])
    bad_labels = TensorDataset(x, torch.full_like(y, 7))
    with pytest.raises(ValueError, match="train_dataset: the loss fails on examples 0..15"):
        ci.NaiveInfluenceFunction(model, bad_labels, hessian_reg=1.0, batch_size=16).influence(test)
    naive = ci.NaiveInfluenceFunction(model, train, hessian_reg=1.0, batch_size=16)
    with pytest.raises(ValueError, match="inputs"):
        naive.influence((torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="inputs"):
        naive.influence((test[0][:0], test[1][:0]))
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    broken["0.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ci.ArnoldiInfluenceFunction(model, train, broken, hessian_reg=1.0, arnoldi_dim=10).influence(test)


def test_the_memory_of_an_explicit_hessian_is_checked(monkeypatch):
    import captum_influence.influence_functions as module

    model, train, _ = problem()
    monkeypatch.setattr(module, "_memory_limit", lambda: 1000)
    with pytest.raises(ValueError, match="layers: the explicit Hessian"):
        ci.NaiveInfluenceFunction(model, train)
    with pytest.raises(ValueError, match="arnoldi_dim"):
        ci.ArnoldiInfluenceFunction(model, train)


# --- torch.distributed ---------------------------------------------------------------------


def _distributed_results(store):
    model, train, test = problem(seed=13, n=42)
    out = {}
    for name, method in (
        (
            "naive",
            ci.NaiveInfluenceFunction(model, train, batch_size=8, store_dir=None if store is None else store / "n"),
        ),
        (
            "arnoldi",
            ci.ArnoldiInfluenceFunction(
                model, train, batch_size=8, arnoldi_dim=40, store_dir=None if store is None else store / "a"
            ),
        ),
        ("ekfac", ci.EKFACInfluence(model, train, batch_size=8, store_dir=None if store is None else store / "e")),
    ):
        out[name] = (method.influence(test), method.self_influence(), method.influence(test, k=3).indices)
    return out


def _worker(rank, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        results = {"memory": _distributed_results(None), "store": _distributed_results(Path(tmp) / "store")}
        torch.save(results, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_scores(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _distributed_results(None)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        for mode, got in torch.load(tmp_path / f"rank{rank}.pt").items():
            for name, (scores, self_scores, top) in got.items():
                ref_scores, ref_self, ref_top = reference[name]
                assert rel(scores, ref_scores) < 1e-9, (rank, mode, name)
                assert rel(self_scores, ref_self) < 1e-9, (rank, mode, name)
                assert torch.equal(top, ref_top), (rank, mode, name)


# --- the benchmark ---------------------------------------------------------------------------


def test_benchmark_quick_mode_runs():
    """Every row of benchmarks/influence_functions.py runs (about 30 s, the peers' imports included);
    kronfluence and dattri are optional there (not in the dev extras)."""
    import importlib.util

    done = subprocess.run([sys.executable, str(BENCHMARK), "--quick"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(
        r"^(ours \w+|Captum \w+|kronfluence [\w-]+|dattri \w+)\s.*?\s(-?[0-9.]+)\s+[0-9.]+s", done.stdout, re.M
    )
    names = {name for name, _ in rows}
    expected = {
        "ours TRAK",
        "ours NaiveInfluenceFunction",
        "ours ArnoldiInfluenceFunction",
        "ours EKFACInfluence",
        "Captum ArnoldiInfluenceFunction",
    }
    if importlib.util.find_spec("kronfluence") is not None:
        expected |= {"kronfluence EK-FAC", "kronfluence K-FAC"}
    if importlib.util.find_spec("dattri") is not None:
        expected |= {"dattri IFAttributorCG", "dattri IFAttributorEKFAC"}
    assert expected <= names, done.stdout
    assert "== targets" in done.stdout, done.stdout
