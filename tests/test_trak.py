"""TRAK against traker 0.3.2, a loop of single-example autograd calls and float64 solves."""

import io
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trak import TRAKer
from trak.projectors import BasicProjector, NoOpProjector, ProjectionType

import captum_influence as ci
from captum_influence import trak as trak_module
from captum_influence._backend import scores as block_scores


class PinnedLogit(nn.Module):
    """Softmax regression with the first logit fixed at 0: unlike a full softmax layer, whose margin
    gradients sum to zero over the classes, its per-example gradients span the parameter space."""

    def __init__(self, d, classes):
        super().__init__()
        self.fc = nn.Linear(d, classes - 1)

    def forward(self, x):
        return F.pad(self.fc(x), (1, 0))


def _digits(n_train, n_test, components=30):
    """Digits as whitened principal components: well-conditioned Gram matrices, so that traker's
    float32 inverse can be compared to ours."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    tr, te = order[:n_train], order[n_train : n_train + n_test]
    pca = PCA(components, whiten=True).fit(data.data[tr])
    x = torch.tensor(pca.transform(data.data), dtype=torch.float32)
    y = torch.tensor(data.target)
    return x[tr], y[tr], x[te], y[te]


def _fit(model, x, y, steps=60, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def digits_regression():
    """Logistic regression on digits: 279 parameters, 600 training examples, 2 trained checkpoints."""
    xtr, ytr, xte, yte = _digits(600, 30)
    model = PinnedLogit(xtr.shape[1], 10)
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        model.fc.reset_parameters()
        states.append(_fit(model, xtr, ytr, seed=seed))
    return model, states, TensorDataset(xtr, ytr), (xte, yte)


def _traker(model, states, train_set, targets, tmp_path, projector, lambda_reg=0.0):
    xtr, ytr = train_set.tensors
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=len(ytr),
        save_dir=str(tmp_path),
        device="cpu",
        projector=projector,
        use_half_precision=False,
        lambda_reg=lambda_reg,
        logging_level=logging.ERROR,
    )
    for m, state in enumerate(states):
        traker.load_checkpoint(state, model_id=m)
        for s in range(0, len(ytr), 100):
            traker.featurize((xtr[s : s + 100], ytr[s : s + 100]), num_samples=len(ytr[s : s + 100]))
    traker.finalize_features()
    for m, state in enumerate(states):
        traker.start_scoring_checkpoint("t", state, model_id=m, num_targets=len(targets[1]))
        traker.score(targets, num_samples=len(targets[1]))
    return torch.tensor(np.asarray(traker.finalize_scores("t"))).T.double()


def _pearson(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _close(ours, reference, rtol):
    err = float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


# --- parity with traker 0.3.2 --------------------------------------------------------------


def test_equals_traker_with_exact_gradients_one_checkpoint(digits_regression, tmp_path):
    model, states, train_set, targets = digits_regression
    theirs = _traker(model, states[:1], train_set, targets, tmp_path, NoOpProjector(device="cpu"))
    ours = ci.TRAK(model, train_set, states[:1], projection_dim=None, damping=0.0).influence(targets)
    assert _pearson(ours, theirs) >= 0.9999
    # traker scales the inverse by 1 / mean|(X^T X)^{-1}| and the gradients by 1 / sqrt(#params)
    scaled = ci.TRAK(
        model, train_set, states[:1], projection_dim=None, damping=0.0, inverse_scaling="mean_abs"
    ).influence(targets)
    _close(scaled / 279, theirs, 2e-4)  # measured 3.5e-5: traker inverts in float32
    ratio = theirs.flatten() / ours.double().flatten()
    big = ours.abs().flatten() > 0.1 * ours.abs().max()
    assert float(ratio[big].std() / ratio[big].mean()) < 1e-4  # equal up to one scalar


def test_ensemble_weighting_matches_traker_with_mean_abs_scaling(digits_regression, tmp_path):
    model, states, train_set, targets = digits_regression
    theirs = _traker(model, states, train_set, targets, tmp_path, NoOpProjector(device="cpu"))
    ours = ci.TRAK(model, train_set, states, projection_dim=None, damping=0.0, inverse_scaling="mean_abs").influence(
        targets
    )
    _close(ours / 279, theirs, 2e-4)


def test_rademacher_projection_correlates_with_traker(digits_regression, tmp_path):
    """Different random matrices, same distribution: scores at k = 256 agree closely on average."""
    model, states, train_set, targets = digits_regression
    projector = BasicProjector(279, 256, 0, ProjectionType.rademacher, "cpu")
    theirs = _traker(model, states[:1], train_set, targets, tmp_path, projector)
    ours = ci.TRAK(model, train_set, states[:1], projection_dim=256, damping=0.0).influence(targets)
    exact = ci.TRAK(model, train_set, states[:1], projection_dim=None, damping=0.0).influence(targets)
    # measured over seeds 0-2: 0.85-0.88 between the two, 0.90-0.92 for each against exact gradients
    assert _pearson(ours, theirs) > 0.75
    assert abs(_pearson(ours, exact) - _pearson(theirs, exact)) < 0.05


# --- the formula against an independent computation ----------------------------------------


def _margin_grads(model, x, y):
    """Margin gradients and 1 - p_y, one autograd call per example (float64)."""
    rows, q = [], []
    for i in range(len(y)):
        logits = model(x[i : i + 1])[0]
        others = torch.cat([logits[: y[i]], logits[y[i] + 1 :]])
        margin = logits[y[i]] - others.logsumexp(0)
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(margin, list(model.parameters()))]))
        q.append(1 - logits.softmax(0)[y[i]].detach())
    return torch.stack(rows).double(), torch.stack(q).double()


def test_ensemble_formula_equals_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    xt, yt = torch.randn(6, 5), torch.randint(0, 3, (6,))
    states = []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * torch.randn_like(p))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    damping = 0.3
    bracket, q_mean = 0.0, 0.0
    for state in states:
        model.load_state_dict(state)
        phi, q = _margin_grads(model, x, y)
        phi_t, _ = _margin_grads(model, xt, yt)
        a = torch.linalg.inv(phi.T @ phi + damping * torch.eye(phi.shape[1], dtype=torch.float64))
        bracket = bracket + phi_t @ a @ phi.T / len(states)
        q_mean = q_mean + q / len(states)
    reference = bracket * q_mean
    trak = ci.TRAK(model, TensorDataset(x, y), states, projection_dim=None, damping=damping, batch_size=16)
    _close(trak.influence((xt, yt)), reference, 1e-5)
    _close(trak.self_influence(), torch.diagonal(_self_reference(model, states, x, y, damping)), 1e-5)


def _self_reference(model, states, x, y, damping):
    bracket, q_mean = 0.0, 0.0
    for state in states:
        model.load_state_dict(state)
        phi, q = _margin_grads(model, x, y)
        a = torch.linalg.inv(phi.T @ phi + damping * torch.eye(phi.shape[1], dtype=torch.float64))
        bracket = bracket + phi @ a @ phi.T / len(states)
        q_mean = q_mean + q / len(states)
    return bracket * q_mean


# --- consistency of the public results ------------------------------------------------------


@pytest.fixture(scope="module")
def small_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(300, 8), torch.randint(0, 4, (300,))
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        for layer in (model[0], model[2]):
            layer.reset_parameters()
        states.append(_fit(model, x, y, steps=30, seed=seed))
    return model, states, TensorDataset(x, y), (torch.randn(9, 8), torch.randint(0, 4, (9,)))


def test_top_k_equals_argsort_of_the_full_matrix(small_mlp):
    model, states, train_set, targets = small_mlp
    trak = ci.TRAK(model, train_set, states, projection_dim=64)
    full = trak.influence(targets)
    for proponents in (True, False):
        result = trak.influence(targets, k=7, proponents=proponents)
        order = torch.argsort(-full if proponents else full, dim=1, stable=True)[:, :7]
        assert torch.equal(result.indices, order)
        assert torch.equal(result.influence_scores, full.gather(1, order))


def test_intermediate_quantities_give_the_scores(small_mlp):
    model, states, train_set, targets = small_mlp
    trak = ci.TRAK(model, train_set, states, projection_dim=64)
    queries = trak.compute_intermediate_quantities(targets)
    keys = trak.compute_intermediate_quantities(train_set.tensors, as_train=True)
    assert queries.shape == (9, 2 * 64)
    _close(queries @ keys.T, trak.influence(targets), 1e-5)
    psi = trak.compute_intermediate_quantities(train_set.tensors)
    _close((psi * keys).sum(1), trak.self_influence(), 1e-5)
    _close(trak.self_influence(train_set.tensors), trak.self_influence(), 1e-5)


def test_same_seed_same_scores_for_any_batch_size(small_mlp):
    model, states, train_set, targets = small_mlp
    runs = [
        ci.TRAK(model, train_set, states, projection_dim=64, seed=3, batch_size=b).influence(targets)
        for b in (7, 64, 300)
    ]
    # A DataLoader keeps its own batches; the default batch_size then batches the queries only.
    runs.append(
        ci.TRAK(model, DataLoader(train_set, batch_size=50), states, projection_dim=64, seed=3).influence(targets)
    )
    for other in runs[1:]:
        _close(other, runs[0], 1e-5)
    another_seed = ci.TRAK(model, train_set, states, projection_dim=64, seed=4).influence(targets)
    assert (another_seed - runs[0]).abs().max() > 1e-3 * runs[0].abs().max()


def test_auto_damping_keeps_projections_beyond_n_train_useful(small_mlp):
    """k = 1024 > n_train = 300: the Gram matrix is singular; auto damping keeps the scores close to
    the exact-gradient ones, a vanishing damping does not."""
    _, _, train_set, targets = small_mlp
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 120), nn.Tanh(), nn.Linear(120, 4))  # 1,564 parameters > 1024
    states = [model.state_dict()]
    exact = ci.TRAK(model, train_set, states, projection_dim=None).influence(targets)
    wide = ci.TRAK(model, train_set, states, projection_dim=1024).influence(targets)
    with pytest.warns(UserWarning, match="projection_dim: 1024 features for 300 training examples"):
        undamped = ci.TRAK(model, train_set, states, projection_dim=1024, damping=1e-6).influence(targets)
    assert _pearson(wide, exact) > 0.95
    assert _pearson(undamped, exact) < 0.8


def test_auto_projection_dim_follows_the_parameter_count(small_mlp):
    model, states, train_set, _ = small_mlp
    assert ci.TRAK(model, train_set, states).projection_dim is None  # 212 parameters: exact
    assert ci.TRAK(model, train_set, states, layers=[model[2]]).feature_dim == 68
    # 3,904 parameters: a projection to 2048 would save less than half of them, exact gradients
    middle = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 4))
    assert ci.TRAK(middle, train_set, [middle.state_dict()]).projection_dim is None
    wide = nn.Sequential(nn.Linear(8, 600), nn.ReLU(), nn.Linear(600, 4))  # 7,804 parameters: k = 512
    trak = ci.TRAK(wide, train_set, [wide.state_dict()])
    assert (trak.projection_dim, trak.feature_dim) == (512, 512)
    for hidden, k in ((1400, 1024), (3000, 2048), (30000, 2048)):  # 18,204 / 39,004 / 390,004 parameters
        model_k = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        assert ci.TRAK(model_k, train_set, [model_k.state_dict()]).projection_dim == k
    with pytest.warns(UserWarning, match="projection_dim: 512 features for 300 training examples"):
        ci.TRAK(wide, train_set, [wide.state_dict()], damping=1e-3)


# --- numerics at scale -----------------------------------------------------------------------


def test_50000_by_512_features_match_a_float64_solve():
    """The solve/score path on synthetic features with a wide dynamic range (traker's fp16 path
    overflows here): finite scores equal to a float64 reference to 1e-4."""
    g = torch.Generator().manual_seed(0)
    n, k = 50_000, 512
    spectrum = torch.logspace(0, -3, k)  # condition number of G ~ 1e6
    phi = torch.randn(n, k, generator=g) * spectrum * 300.0
    queries = torch.randn(40, k, generator=g) * spectrum * 300.0
    solve = trak_module._solve_for(phi, "auto")
    keys = torch.cat([solve.whiten(phi[s : s + 8192]).float() for s in range(0, n, 8192)])
    ours = block_scores(solve.whiten(queries).float(), keys)
    assert torch.isfinite(ours).all()
    p64 = phi.double().numpy()
    gram = p64.T @ p64 + solve.damping * np.eye(k)
    reference = np.linalg.solve(gram, queries.double().numpy().T).T @ p64.T
    _close(ours, torch.from_numpy(reference), 1e-4)


# --- the store ---------------------------------------------------------------------------------


def test_store_resumes_after_a_crash_and_refuses_other_settings(small_mlp, tmp_path, monkeypatch):
    model, states, train_set, targets = small_mlp
    settings = dict(projection_dim=32, batch_size=50, store_dir=tmp_path / "store")
    reference = ci.TRAK(model, train_set, states, projection_dim=32, batch_size=50).influence(targets)
    # The first run dies at checkpoint 1, batch 3 of 6 (after checkpoint 0's 6 training batches and its
    # query batch, which is featurised while checkpoint 0 is loaded).
    calls, kill_at = [], [10]
    original = ci.TRAK._grads_and_q

    def counted(self, projector, start, batch, index, arg):
        calls.append((index, start, arg))
        if len(calls) == kill_at[0]:
            kill_at[0] = None
            raise KeyboardInterrupt("killed")
        return original(self, projector, start, batch, index, arg)

    monkeypatch.setattr(ci.TRAK, "_grads_and_q", counted)
    with pytest.raises(KeyboardInterrupt):
        ci.TRAK(model, train_set, states, **settings).influence(targets)
    calls.clear()
    resumed = ci.TRAK(model, train_set, states, **settings).influence(targets)
    train_calls = [(i, s) for i, s, arg in calls if arg == "train_dataset"]
    assert train_calls == [(1, 100), (1, 150), (1, 200), (1, 250)]  # only the unfinished batches
    _close(resumed, reference, 1e-6)
    calls.clear()
    again = ci.TRAK(model, train_set, states, **settings)
    _close(again.influence(targets), reference, 1e-6)
    stored_self = again.self_influence()
    assert calls and all(arg == "inputs" for _, _, arg in calls)  # the training side is read back
    _close(stored_self, ci.TRAK(model, train_set, states, projection_dim=32).self_influence(), 1e-5)
    for other in (dict(seed=1), dict(damping=0.5), dict(projection_dim=16), dict(inverse_scaling="mean_abs")):
        with pytest.raises(ValueError, match="store_dir: .* was written with other settings"):
            ci.TRAK(model, train_set, states, **{**settings, **other})
    with pytest.raises(ValueError, match="store_dir: .*checkpoints"):
        ci.TRAK(model, train_set, states[::-1], **settings)


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(small_mlp):
    model, states, train_set, targets = small_mlp
    x, y = train_set.tensors
    other = nn.Sequential(nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 4)).state_dict()
    with pytest.raises(ValueError, match="checkpoints: checkpoint 1 .* does not match the model"):
        ci.TRAK(model, train_set, [states[0], other]).influence(targets)
    with pytest.raises(ValueError, match="train_dataset: the dataset is empty"):
        ci.TRAK(model, TensorDataset(x[:0], y[:0]), states)
    with pytest.raises(
        ValueError,
        match=r"train_dataset: the task's output fails on examples 64\.\.127 .*labels: "
        r"expected class indices in \[0, 4\) .*got \[9\] at positions \[6\] of the batch",
    ):
        ci.TRAK(model, TensorDataset(x, y.index_fill(0, torch.tensor([70]), 9)), states, batch_size=64).influence(
            targets
        )
    trak = ci.TRAK(model, train_set, states, projection_dim=32)
    bad = targets[1].clone()
    bad[[2, 5]] = torch.tensor([4, -1])
    with pytest.raises(
        ValueError,
        match=r"inputs: the task's output fails on examples 0\.\.8 .*labels: .*\[0, 4\) "
        r".*got \[4, -1\] at positions \[2, 5\]",
    ):
        trak.influence((targets[0], bad))
    with pytest.raises(ValueError, match=r"inputs: example shapes \[\(7,\)\] do not match .* \[\(8,\)\]"):
        trak.influence((targets[0][:, :7], targets[1]))
    for kwargs, match in (
        (dict(damping=-1.0), "damping"),
        (dict(damping="big"), "damping"),
        (dict(projection_dim=0), "projection_dim"),
        (dict(seed=-1), "seed"),
        (dict(inverse_scaling="max"), "inverse_scaling"),
        (dict(layers="head"), "layers"),
    ):
        with pytest.raises(ValueError, match=match):
            ci.TRAK(model, train_set, states, **kwargs)


def test_unreadable_checkpoint_files_are_named(small_mlp, tmp_path):
    model, states, train_set, targets = small_mlp
    text, truncated, listed = tmp_path / "notes.txt", tmp_path / "cut.pt", tmp_path / "list.pt"
    text.write_text("hello world\n")
    torch.save(states[0], truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    torch.save([1, 2], listed)
    for file, why in (
        (text, "cannot be read by torch.load"),
        (truncated, "cannot be read by torch.load"),
        (listed, "holds a list; expected a state dict"),
    ):
        with pytest.raises(ValueError, match=f"checkpoints: .*{file.name}' {why}"):
            ci.TRAK(model, train_set, [file]).influence(targets)


def test_projectors_are_kept_between_calls_when_they_fit(small_mlp, monkeypatch):
    from functools import partial

    from captum_influence._backend import projector as projector_module

    model, states, train_set, targets = small_mlp
    generated = []
    generate = projector_module.projection_block
    monkeypatch.setattr(projector_module, "projection_block", lambda *a: generated.append(a[1:3]) or generate(*a))
    trak = ci.TRAK(model, train_set, states, projection_dim=32)
    first = trak.influence(targets)
    assert generated
    generated.clear()
    _close(trak.influence(targets), first, 1e-6)
    assert generated == []  # 2 x 212 x 32 floats fit the budget: no block generated again
    monkeypatch.setattr(trak_module, "Projector", partial(trak_module.Projector, cache_bytes=212 * 32 * 4))
    small = ci.TRAK(model, train_set, states, projection_dim=32)
    _close(small.influence(targets), first, 1e-6)
    generated.clear()
    _close(small.influence(targets), first, 1e-6)
    assert len(generated) == 2  # one matrix fits, two do not: each checkpoint's is made again, once


class EitherForm(nn.Module):
    """A linear classifier taking its input as a tensor or as a dict {"x": tensor}."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x["x"] if isinstance(x, dict) else x)


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i]}, self.y[i]


def test_tensor_and_dict_batches_are_told_apart():
    torch.manual_seed(0)
    model = EitherForm()
    x, y = torch.randn(40, 8), torch.randint(0, 4, (40,))
    xq, yq = torch.randn(5, 8), torch.randint(0, 4, (5,))
    as_tensors = ci.TRAK(model, TensorDataset(x, y), [model.state_dict()])
    as_dicts = ci.TRAK(model, DictDataset(x, y), [model.state_dict()])
    _close(as_dicts.influence(({"x": xq}, yq)), as_tensors.influence((xq, yq)), 1e-5)
    with pytest.raises(
        ValueError,
        match=r"inputs: the batch forms differ: the training batches hold \(tensor \(8,\)\) "
        r"before the labels, these hold \(dict\)",
    ):
        as_tensors.influence(({"x": xq}, yq))
    with pytest.raises(
        ValueError,
        match=r"inputs: the batch forms differ: the training batches hold \(dict\) "
        r"before the labels, these hold \(tensor \(8,\)\)",
    ):
        as_dicts.influence((xq, yq))


def test_non_finite_gradients_name_the_examples(small_mlp):
    model, states, train_set, targets = small_mlp
    x, y = train_set.tensors
    bad = x.clone()
    bad[70, 2], bad[201, 0] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"train_dataset: .* NaN or inf for example indices \[70\]"):
        ci.TRAK(model, TensorDataset(bad, y), states, projection_dim=32, batch_size=64).influence(targets)
    with pytest.raises(ValueError, match=r"train_dataset: .* NaN or inf for example indices \[70, 201\]"):
        ci.TRAK(model, TensorDataset(bad, y), states, projection_dim=32, batch_size=300).influence(targets)
    trak = ci.TRAK(model, train_set, states, projection_dim=32)
    with pytest.raises(ValueError, match=r"inputs: .* NaN or inf for example indices \[4\]"):
        trak.influence((targets[0].index_fill(0, torch.tensor([4]), float("nan")), targets[1]))


def test_layers_restrict_the_gradient(small_mlp):
    model, states, train_set, targets = small_mlp
    head = ci.TRAK(model, train_set, states, projection_dim=None, damping=0.1, layers=[model[2]])
    assert head.param_names == ["2.weight", "2.bias"]
    x, y = train_set.tensors
    bracket, q_mean = 0.0, 0.0
    for state in states:
        model.load_state_dict(state)
        phi, q = _margin_grads(model, x, y)
        phi_t, _ = _margin_grads(model, *targets)
        phi, phi_t = phi[:, -68:], phi_t[:, -68:]  # the last layer's weight (4 x 16) and bias (4)
        a = torch.linalg.inv(phi.T @ phi + 0.1 * torch.eye(68, dtype=torch.float64))
        bracket = bracket + phi_t @ a @ phi.T / 2
        q_mean = q_mean + q / 2
    _close(head.influence(targets), bracket * q_mean, 1e-5)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars(small_mlp, monkeypatch):
    model, states, train_set, targets = small_mlp
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    ci.TRAK(model, train_set, states, projection_dim=16, show_progress=True).influence(targets)
    err = terminal.getvalue()
    assert "TRAK: checkpoints" in err and "checkpoint 1: training set" in err and "checkpoint 1: inputs" in err
    log = io.StringIO()  # not a terminal (a log file, a pipe): nothing drawn
    monkeypatch.setattr(sys, "stderr", log)
    ci.TRAK(model, train_set, states, projection_dim=16, show_progress=True).influence(targets)
    assert log.getvalue() == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_scores_equal_cpu_scores(small_mlp):
    model, states, train_set, targets = small_mlp
    cpu = ci.TRAK(model, train_set, states, projection_dim=64).influence(targets)
    gpu = ci.TRAK(model.cuda(), train_set, states, projection_dim=64, device="cuda").influence(targets)
    model.cpu()
    _close(gpu.cpu(), cpu, 1e-4)


def test_projection_dim_above_the_gradient_dimension_uses_exact_gradients_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 4))  # 109 parameters
    train = TensorDataset(torch.randn(40, 10), torch.randint(0, 4, (40,)))
    test = (torch.randn(3, 10), torch.randint(0, 4, (3,)))
    with pytest.warns(UserWarning, match="projection_dim: 1000000 is not below the 109 dimensions"):
        wide = ci.TRAK(model, train, [model.state_dict()], projection_dim=10**6, damping=0.1)
    assert wide.projection_dim is None
    exact = ci.TRAK(model, train, [model.state_dict()], projection_dim=None, damping=0.1)
    torch.testing.assert_close(wide.influence(test), exact.influence(test))


def test_requests_that_cannot_fit_in_memory_are_refused_up_front():
    """Checked from the sizes alone, before any featurising: one Gram matrix and its factor
    (16 k^2 bytes), and without a store the keys (4 n M k bytes), against the machine's memory."""
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    model = nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 4))
    train = TensorDataset(torch.randn(40, 10), torch.randint(0, 4, (40,)))
    trak = ci.TRAK(model, train, [model.state_dict()], projection_dim=None, damping=0.1)
    trak.feature_dim = int((memory / 16) ** 0.5) + 1
    with pytest.raises(ValueError, match=r"projection_dim: \d+ features need [\d.]+ GiB"):
        trak._check_memory(stored=True)
    trak.feature_dim, trak.n_train = 2048, memory // (4 * 2048) + 1
    with pytest.raises(ValueError, match="store_dir: the keys of"):
        trak._check_memory(stored=False)
    trak._check_memory(stored=True)  # on disk: fine
