"""EKFACInfluence: exact where K-FAC is exact, the eigenvalue correction's fit, the blocks and
their fallback, the "auto" damping, the store, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import as_examples, flat_params, tiny_bert, tiny_gpt2_classifier, unflat
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.data import TensorDataset

import captum_influence as ci


def outputs(model, x):
    return lambda theta: functional_call(model, unflat(model, theta), (x,))


def probe_grads(model, x, loss="ce"):
    """g_ic = J_i^T u_ic (n, r, P) with sum_c u_ic u_ic^T the loss's output Hessian."""
    jac = jacrev(outputs(model, x))(flat_params(model))  # (n, C, P)
    out = model(x).detach()
    if loss == "ce":
        p = out.softmax(1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:  # squared error summed over outputs
        lam = 2 * torch.eye(out.shape[1], dtype=out.dtype).expand(len(x), -1, -1)
    values, vectors = torch.linalg.eigh(lam)
    u = vectors * values.clamp(min=0).sqrt().unsqueeze(1)
    return torch.einsum("ncp,ncr->nrp", jac, u)


def loss_grads(model, x, y, loss):
    def one(theta, xi, yi):
        return loss(functional_call(model, unflat(model, theta), (xi[None],)), yi[None]).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(flat_params(model), x, y)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def se(out, y):
    return ((out - y) ** 2).sum(1)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def gauss_newton_influence(model, train, test, damping, loss=ce, kind="ce"):
    g = probe_grads(model, train[0], kind)
    gn = torch.einsum("nrp,nrq->pq", g, g)
    m = torch.linalg.inv(gn + damping * torch.eye(len(gn), dtype=gn.dtype))
    return loss_grads(model, *test, loss) @ m @ loss_grads(model, *train, loss).T


def block_matrix(block):
    """The block's curvature (Q_S x Q_A) diag(vec Lambda) (Q_S x Q_A)^T, in the row-major vec(G) order."""
    basis = torch.kron(block.qs, block.qa)
    return basis @ torch.diag(block.eigenvalues.reshape(-1)) @ basis.T


# --- exact where K-FAC is ------------------------------------------------------------------


def test_a_single_linear_layer_with_one_example_per_batch_equals_the_exact_gauss_newton_influence():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.randint(0, 3, (1,))
    test = (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    for correction in (True, False):
        ekfac = ci.EKFACInfluence(model, TensorDataset(x, y), damping=0.1, eigenvalue_correction=correction)
        assert rel(ekfac.influence(test), gauss_newton_influence(model, (x, y), test, 0.1)) < 1e-10


def test_a_single_linear_layer_with_squared_error_is_exact_for_any_number_of_examples():
    """Lambda = 2 I is the same for every example, so G = (sum a a^T) x 2 I is a Kronecker product."""
    torch.manual_seed(1)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randn(30, 3, dtype=torch.float64)
    test = (torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    for correction in (True, False):
        ekfac = ci.EKFACInfluence(
            model, TensorDataset(x, y), loss_fn=se, damping=0.3, eigenvalue_correction=correction, batch_size=7
        )
        expected = gauss_newton_influence(model, (x, y), test, 0.3, loss=se, kind="se")
        assert rel(ekfac.influence(test), expected) < 1e-10


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_a_transformers_classifier_layer_with_one_hessian_example_equals_the_exact_gauss_newton_influence(name):
    """Dict encodings, only the classifier Linear selected and one Hessian example: G = J^T Lambda J
    is a Kronecker product, so EK-FAC and K-FAC are exact, with cross-entropy and with
    task="text_classification" alike. BERT's classifier sees one position per example; GPT-2's
    head runs at every token and is read at the last one, whose input alone enters A."""
    model, layer = (tiny_bert(), "classifier") if name == "bert" else (tiny_gpt2_classifier(), "score")
    model = model.double()
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(8)[None, :] < torch.tensor([4, 8, 6, 7, 5, 8])[:, None]).long()
    encoding = {"input_ids": torch.randint(1, 100, (6, 8), generator=g) * mask, "attention_mask": mask}
    labels = torch.randint(0, 3, (6,), generator=g)
    names = [n for n, _ in model.named_parameters() if n.startswith(layer + ".")]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [fixed[n].numel() for n in names]

    def logits(theta, enc):
        parts = {n: t.reshape(fixed[n].shape) for n, t in zip(names, theta.split(sizes))}
        return functional_call(model, {**fixed, **parts}, (), enc).logits

    def losses(theta, enc, y):
        return F.cross_entropy(logits(theta, enc), y, reduction="none")

    theta = torch.cat([fixed[n].reshape(-1) for n in names])
    first, rest = {k: v[:1] for k, v in encoding.items()}, {k: v[1:4] for k, v in encoding.items()}
    jac = jacrev(lambda t: logits(t, first)[0])(theta)  # (C, P)
    p = logits(theta, first)[0].softmax(0).detach()
    gn = jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    m = torch.linalg.inv(gn + 0.1 * torch.eye(len(gn), dtype=gn.dtype))
    train_grads, test_grads = jacrev(losses)(theta, encoding, labels), jacrev(losses)(theta, rest, labels[1:4])
    train, one, test = as_examples((encoding, labels)), as_examples((first, labels[:1])), (rest, labels[1:4])
    for correction in (True, False):
        ekfac = ci.EKFACInfluence(
            model, train, layers=[layer], hessian_dataset=one, damping=0.1, eigenvalue_correction=correction
        )
        assert rel(ekfac.influence(test), test_grads @ m @ train_grads.T) < 1e-10
    by_task = ci.EKFACInfluence(
        model, train, layers=[layer], hessian_dataset=one, damping=0.1, task="text_classification"
    )
    assert rel(by_task.self_influence(), ((train_grads @ m) * train_grads).sum(1)) < 1e-10


def test_the_eigenvalue_correction_never_worsens_the_fit_of_a_layers_block():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(50, 4, dtype=torch.float64), torch.randint(0, 3, (50,))
    train = TensorDataset(x, y)
    g = probe_grads(model, x)
    exact = torch.einsum("nrp,nrq->pq", g, g)
    ekfac = ci.EKFACInfluence(model, train, damping=1.0, batch_size=16)
    kfac = ci.EKFACInfluence(model, train, damping=1.0, eigenvalue_correction=False, batch_size=16)
    ekfac.self_influence()
    kfac.self_influence()
    sizes = [p.numel() for p in model.parameters()]
    offsets = [0, sizes[0] + sizes[1], sum(sizes)]
    for layer, (corrected, plain) in enumerate(zip(ekfac.blocks.kron, kfac.blocks.kron)):
        lo = offsets[layer]
        # the exact block in the row-major vec([W | b]) order of the Kronecker basis
        out_w, in_w = corrected.module.weight.shape
        order = (
            torch.cat(
                [torch.arange(out_w * in_w).reshape(out_w, in_w), out_w * in_w + torch.arange(out_w)[:, None]], 1
            ).reshape(-1)
            + lo
        )
        block = exact[order][:, order]
        assert torch.allclose(corrected.qa, plain.qa) and torch.allclose(corrected.qs, plain.qs)
        ek, kf = (block - block_matrix(corrected)).norm(), (block - block_matrix(plain)).norm()
        assert ek <= kf * (1 + 1e-12), (layer, float(ek), float(kf))
        # the corrected eigenvalues are the exact block's diagonal in the Kronecker basis, same trace
        basis = torch.kron(corrected.qs, corrected.qa)
        assert torch.allclose(corrected.eigenvalues.reshape(-1), (basis.T @ block @ basis).diagonal(), atol=1e-10)
        assert math.isclose(float(corrected.eigenvalues.sum()), float(block.trace()), rel_tol=1e-10)


def test_scores_are_the_factorised_inverse_on_an_mlp():
    """Scores equal g_test^T (blockdiag(K_l) + lambda_l)^{-1} g_train built from the fitted blocks."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    test = (torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))
    ekfac = ci.EKFACInfluence(model, TensorDataset(x, y), batch_size=16)
    scores = ekfac.influence(test)
    inverse = []
    for block in ekfac.blocks.kron:
        inverse.append(
            torch.linalg.inv(
                block_matrix(block) + block.damping * torch.eye(block.eigenvalues.numel(), dtype=torch.float64)
            )
        )
    m = torch.block_diag(*inverse)
    sizes = [p.numel() for p in model.parameters()]
    layout = []
    start = 0
    for layer in range(2):
        w, b = sizes[2 * layer], sizes[2 * layer + 1]
        out_w = b
        in_w = w // out_w
        idx = torch.cat([torch.arange(w).reshape(out_w, in_w), w + torch.arange(b)[:, None]], 1).reshape(-1) + start
        layout.append(idx)
        start += w + b
    order = torch.cat(layout)
    g, gt = loss_grads(model, x, y, ce)[:, order], loss_grads(model, *test, ce)[:, order]
    assert rel(scores, gt @ m @ g.T) < 1e-10
    assert rel(ekfac.self_influence(), ((g @ m) * g).sum(1)) < 1e-10


# --- blocks, fallback, convolutions --------------------------------------------------------


def test_conv2d_gets_a_kronecker_block_and_other_layers_the_diagonal_fallback():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).double()
    x, y = torch.randn(24, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (24,))
    ekfac = ci.EKFACInfluence(model, TensorDataset(x, y), batch_size=8)
    scores = ekfac.influence((x[:3], y[:3]))
    assert scores.shape == (3, 24) and bool(torch.isfinite(scores).all())
    assert [b.path for b in ekfac.blocks.kron] == ["0", "4"] and [b.path for b in ekfac.blocks.diag] == ["2"]
    # The convolution's A factor is the sum of its unfolded input patches (a 1 appended for the
    # bias) at the positions with an output gradient: those where some channel passes the ReLU.
    live = (model[0](x) > 0).any(1).reshape(-1)
    assert 0 < int((~live).sum()) < len(live)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)[live]
    patches = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    conv = ekfac.blocks.kron[0]
    cov = conv.qa @ torch.diag(torch.linalg.eigvalsh(patches.T @ patches)) @ conv.qa.T
    assert torch.allclose(cov, patches.T @ patches, atol=1e-8)
    # The GroupNorm fallback holds the Gauss-Newton diagonal of its parameters.
    g = probe_grads(model, x)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[: names.index("2.weight")])
    diagonal = (g[:, :, start : start + 6] ** 2).sum((0, 1))
    assert torch.allclose(ekfac.blocks.diag[0].diagonal, diagonal, atol=1e-10)


def test_transformers_conv1d_gets_the_kronecker_block_of_the_linear_layer_it_transposes():
    """GPT-2's Conv1D (y = a W + c, W stored (in, out)) gives the scores of nn.Linear with W^T."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    conv1d = nn.Sequential(transformers.pytorch_utils.Conv1D(6, 4), nn.Tanh(), transformers.pytorch_utils.Conv1D(3, 6))
    linear = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for c, lin in ((conv1d[0], linear[0]), (conv1d[2], linear[2])):
            lin.weight.copy_(c.weight.T)
            lin.bias.copy_(c.bias)
    conv1d, linear = conv1d.double(), linear.double()
    x, y = torch.randn(20, 5, 4, dtype=torch.float64), torch.randint(0, 3, (20, 5))

    def sequence_ce(out, labels):
        return F.cross_entropy(out.transpose(1, 2), labels, reduction="none").mean(1)

    train, test = TensorDataset(x, y), (x[:3], y[:3])
    ours = ci.EKFACInfluence(conv1d, train, loss_fn=sequence_ce, batch_size=8)
    reference = ci.EKFACInfluence(linear, train, loss_fn=sequence_ce, batch_size=8)
    assert rel(ours.influence(test), reference.influence(test)) < 1e-10
    assert [b.path for b in ours.blocks.kron] == ["0", "2"] and ours.blocks.diag == []
    assert ours.damping_ == pytest.approx(reference.damping_, rel=1e-10)


def test_selected_layers_only_and_a_weight_used_outside_its_forward():
    torch.manual_seed(5)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)) + x @ self.fc1.weight.T)

    model = Tied().double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    ekfac = ci.EKFACInfluence(model, TensorDataset(x, y), batch_size=10)
    ekfac.influence((x[:2], y[:2]))
    assert [b.path for b in ekfac.blocks.kron] == ["fc2"]
    assert [b.path for b in ekfac.blocks.diag] == ["fc1"]
    only = ci.EKFACInfluence(model, TensorDataset(x, y), layers=["fc2"], batch_size=10)
    assert only.compute_intermediate_quantities((x[:2], y[:2])).shape == (2, 15)


def test_the_task_form_and_a_plain_callable_loss():
    """task="classification" attributes the margin f: since CE = log(1 + exp(-f)), its scores are the
    cross-entropy scores divided by 1 - p_y of each target. A callable loss (its output Hessian by
    autograd) gives the closed-form cross-entropy's factors."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    train, test = TensorDataset(x, y), (x[:4], y[:4])
    by_loss = ci.EKFACInfluence(model, train, batch_size=10)
    scores = by_loss.influence(test)
    by_task = ci.EKFACInfluence(model, train, task="classification", batch_size=10)
    p = model(test[0]).softmax(1).gather(1, test[1][:, None])
    assert rel(by_task.influence(test), scores / (1 - p)) < 1e-10
    callable_loss = ci.EKFACInfluence(model, train, loss_fn=ce, batch_size=10)
    assert rel(callable_loss.influence(test), scores) < 1e-10
    assert callable_loss.damping_ == pytest.approx(by_loss.damping_, rel=1e-10)


# --- the "auto" damping ----------------------------------------------------------------------


def test_auto_damping_per_layer_is_one_examples_curvature_along_one_direction():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    ekfac = ci.EKFACInfluence(model, TensorDataset(x, y), batch_size=16)
    ekfac.self_influence()
    g = probe_grads(model, x)
    start = 0
    for block in ekfac.blocks.kron:
        out_w, in_w = block.module.weight.shape
        w = out_w * in_w
        idx = torch.cat([torch.arange(w).reshape(out_w, in_w), w + torch.arange(out_w)[:, None]], 1) + start
        start += w + out_w
        per_example = g[:, :, idx]  # (n, r, out, in')
        c = (block.qs.T @ per_example @ block.qa).pow(2).sum(1)  # (n, out, in')
        assert math.isclose(block.damping, float((c**2).sum() / c.sum()), rel_tol=1e-9)
        assert ekfac.damping_[block.path] == block.damping


def test_a_float_damping_is_used_for_every_layer():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    ekfac = ci.EKFACInfluence(model, TensorDataset(x, y), damping=0.25)
    assert ekfac.influence((x[:3], y[:3])).dtype == torch.float32
    assert set(ekfac.damping_.values()) == {0.25}


# --- the store -----------------------------------------------------------------------------


def test_the_store_resumes_keys_and_factors_and_refuses_other_settings(tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    train, test = TensorDataset(x, y), (x[:3], y[:3])
    store = tmp_path / "store"
    reference = ci.EKFACInfluence(model, train, batch_size=8).influence(test)

    def watched(method, fail_at=None):
        """Record the passes over the Hessian examples and the training batches embedded."""
        passes, embedded = [], []
        probe_pass, grads = method._probe_pass, method._grads

        def counted_pass(kron, diag, correct, desc):
            passes.append(correct)
            return probe_pass(kron, diag, correct, desc)

        def counted_grads(fn, batch, start, arg):
            if arg == "train_dataset":
                if start == fail_at:
                    raise KeyboardInterrupt  # killed while embedding the training set
                embedded.append(start)
            return grads(fn, batch, start, arg)

        method._probe_pass, method._grads = counted_pass, counted_grads
        return passes, embedded

    killed = ci.EKFACInfluence(model, train, batch_size=8, store_dir=store)
    passes, embedded = watched(killed, fail_at=24)
    with pytest.raises(KeyboardInterrupt):
        killed.influence(test)
    assert passes == [False, True] and embedded == [0, 8, 16]
    # The rerun loads the solve (no pass over the data) and embeds only the unfinished batches.
    resumed = ci.EKFACInfluence(model, train, batch_size=8, store_dir=store)
    passes, embedded = watched(resumed)
    assert torch.equal(resumed.influence(test), reference)
    assert passes == [] and embedded == [24, 32]
    # Nothing is computed again once finished.
    again = ci.EKFACInfluence(model, train, batch_size=8, store_dir=store)
    passes, embedded = watched(again)
    assert torch.equal(again.influence(test), reference)
    assert passes == [] and embedded == []
    # A damaged solve: its factors were stored, so only the eigenvalue correction runs again, and
    # every training embedding is recomputed with the new solve.
    (store / "kfac_1_eig.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="damaged"):
        repaired = ci.EKFACInfluence(model, train, batch_size=8, store_dir=store)
        passes, embedded = watched(repaired)
        assert torch.equal(repaired.influence(test), reference)
    assert passes == [True] and embedded == [0, 8, 16, 24, 32]
    after = ci.EKFACInfluence(model, train, batch_size=8, store_dir=store)
    passes, embedded = watched(after)
    assert torch.equal(after.influence(test), reference) and passes == [] and embedded == []
    with pytest.raises(ValueError, match="other settings"):
        ci.EKFACInfluence(model, train, batch_size=8, store_dir=store, damping=0.5)


# --- bad inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(damping=-1.0), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(eigenvalue_correction="yes"), "eigenvalue_correction"),
        (dict(seed=-3), "seed"),
        (dict(batch_size=0), "batch_size"),
        (dict(task="regression", loss_fn=ce), "task"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    model = nn.Sequential(nn.Linear(4, 3))
    train = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    with pytest.raises((ValueError, TypeError), match=match):
        ci.EKFACInfluence(model, train, **kwargs)


def test_zero_damping_with_flat_directions_is_refused_and_bad_labels_are_named():
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4)
    x[:, 0] = 0  # an input that is always zero: a direction of no curvature
    train = TensorDataset(x, torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError, match="damping=0"):
        ci.EKFACInfluence(model, train, damping=0.0).influence((x[:2], torch.zeros(2, dtype=torch.long)))
    bad = TensorDataset(torch.randn(10, 4), torch.full((10,), 5))
    with pytest.raises(ValueError, match="train_dataset: the loss fails on examples 0..9"):
        ci.EKFACInfluence(model, bad, batch_size=10).influence((x[:2], torch.zeros(2, dtype=torch.long)))
