"""TracInCP and TracInCPFast against Captum 0.9 and a loop of single-example autograd calls."""

import warnings

import pytest
import torch
from captum.influence import TracInCP as CaptumTracInCP
from captum.influence import TracInCPFast as CaptumTracInCPFast
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import captum_influence as ci
from captum_influence.tracin import TracInCP, TracInCPFast

LEARNING_RATES = [0.5, 0.1, 0.02]


def _load(model, checkpoint):
    model.load_state_dict(checkpoint["state"])
    return checkpoint["lr"]


def _checkpoints(model, learning_rates=LEARNING_RATES, scale=0.3):
    """Perturbed copies of the model's weights, each with its learning rate."""
    out = []
    for lr in learning_rates:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
        out.append({"state": {k: v.clone() for k, v in model.state_dict().items()}, "lr": lr})
    return out


def _data(n, d=8, classes=4):
    return torch.randn(n, d), torch.randint(0, classes, (n,))


def _mlp(bias=True):
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4, bias=bias))


def _brute_force(model, checkpoints, test, train, params=None, loss=None):
    """sum_c eta_c <g_c(z), g_c(z')>, one autograd call per example."""
    loss = loss or (lambda out, y: nn.functional.cross_entropy(out, y))

    def grads(batch):
        rows = []
        for i in range(len(batch[-1])):
            inputs = tuple(x[i : i + 1] for x in batch[:-1])
            value = loss(model(*inputs), batch[-1][i : i + 1])
            wrt = params(model) if params else [p for p in model.parameters() if p.requires_grad]
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, wrt)]))
        return torch.stack(rows).double()

    total = 0.0
    for checkpoint in checkpoints:
        lr = _load(model, checkpoint)
        model.eval()
        total = total + lr * grads(test) @ grads(train).T
    return total


def _close(ours, reference, rtol=1e-5):
    ours, reference = ours.double(), reference.double()
    assert ours.shape == reference.shape
    err = (ours - reference).abs().max() / reference.abs().max()
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.fixture
def linear_setup():
    model = _mlp()
    checkpoints = _checkpoints(model)
    return model, checkpoints, TensorDataset(*_data(40)), _data(7)


# --- parity with Captum -------------------------------------------------------------------


@pytest.mark.parametrize("sample_wise", [True, False])
def test_tracincp_matches_captum(linear_setup, sample_wise):
    model, checkpoints, train, test = linear_setup
    ours = TracInCP(model, train, checkpoints, _load, batch_size=16)
    reduction = "sum" if sample_wise else "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = CaptumTracInCP(
            model,
            train,
            checkpoints,
            _load,
            loss_fn=nn.CrossEntropyLoss(reduction=reduction),
            batch_size=16,
            sample_wise_grads_per_batch=sample_wise,
        )
        expected = theirs.influence(test)
        expected_self = theirs.self_influence(DataLoader(train, batch_size=16))
    _close(ours.influence(test), expected)
    _close(ours.self_influence(), expected_self)


def test_fast_matches_captum_fast_without_bias():
    model = _mlp(bias=False)
    checkpoints = _checkpoints(model)
    train, test = TensorDataset(*_data(40)), _data(7)
    ours = TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16)
    theirs = CaptumTracInCPFast(
        model, model[2], train, checkpoints, _load, loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=16
    )
    _close(ours.influence(test), theirs.influence(test))
    _close(ours.self_influence(), theirs.self_influence(DataLoader(train, batch_size=16)))


def test_fast_bias_is_exact_and_captum_fast_misses_the_bias_term(linear_setup):
    model, checkpoints, train, test = linear_setup
    ours = TracInCPFast(model, "2", train, checkpoints, _load, batch_size=16).influence(test)
    last_layer = lambda m: [m[2].weight, m[2].bias]
    _close(ours, _brute_force(model, checkpoints, test, train.tensors, params=last_layer))

    # The missing term: sum_c eta_c (d . d') with d = dL/d logits, from single-example calls.
    def output_grads(batch):
        rows = []
        for x, y in zip(*batch):
            logits = model(x[None]).detach().requires_grad_(True)
            rows.append(torch.autograd.grad(nn.functional.cross_entropy(logits, y[None]), logits)[0][0])
        return torch.stack(rows).double()

    bias_term = 0.0
    for checkpoint in checkpoints:
        lr = _load(model, checkpoint)
        bias_term = bias_term + lr * output_grads(test) @ output_grads(train.tensors).T
    theirs = CaptumTracInCPFast(
        model, model[2], train, checkpoints, _load, loss_fn=nn.CrossEntropyLoss(reduction="mean"), batch_size=16
    ).influence(test)
    assert (ours.double() - theirs.double() - bias_term).abs().max() < 1e-5 * ours.abs().max()
    assert bias_term.abs().max() > 1e-2 * ours.abs().max()  # the term is not negligible here


# --- identities ---------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True])
def test_stacked_vectors_give_the_per_checkpoint_sum(linear_setup, fast):
    model, checkpoints, train, test = linear_setup
    if fast:
        tracin = TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16)
        params = lambda m: [m[2].weight, m[2].bias]
    else:
        tracin = TracInCP(model, train, checkpoints, _load, batch_size=16)
        params = None
    queries = tracin.compute_intermediate_quantities(test)
    keys = tracin.compute_intermediate_quantities(train)
    reference = _brute_force(model, checkpoints, test, train.tensors, params=params)
    assert queries.shape[1] == len(checkpoints) * sum(
        p.numel() for p in (params(model) if fast else model.parameters())
    )
    _close(queries.double() @ keys.double().T, reference)
    _close(tracin.influence(test), reference)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("proponents", [True, False])
def test_topk_equals_argsort_of_the_full_matrix(linear_setup, fast, proponents):
    model, checkpoints, train, test = linear_setup
    if fast:
        tracin = TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16)
    else:
        tracin = TracInCP(model, train, checkpoints, _load, batch_size=16)
    full = tracin.influence(test)
    result = tracin.influence(test, k=5, proponents=proponents)
    order = torch.argsort(-full if proponents else full, dim=1, stable=True)[:, :5]
    assert torch.equal(result.indices, order)
    assert torch.allclose(result.influence_scores, full.gather(1, order), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_self_influence_is_the_diagonal(linear_setup, fast):
    model, checkpoints, train, _ = linear_setup
    if fast:
        tracin = TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16)
    else:
        tracin = TracInCP(model, train, checkpoints, _load, batch_size=16)
    diagonal = torch.diagonal(tracin.influence(train))
    _close(tracin.self_influence(), diagonal)
    _close(tracin.self_influence(DataLoader(train, batch_size=7)), diagonal)


def test_checkpoints_are_loaded_once_per_pass(linear_setup):
    model, checkpoints, train, test = linear_setup
    loads = []
    tracin = TracInCP(model, train, checkpoints, lambda m, c: loads.append(1) or _load(m, c), batch_size=4)
    tracin.influence(test)  # 10 training batches, 3 checkpoints: one pass over train, one over test
    assert len(loads) == 2 * len(checkpoints)


# --- models Captum's fast path does not cover ----------------------------------------------


class _EmbeddingBatchNormModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.norm = nn.BatchNorm1d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.fc(torch.relu(self.norm(self.embed(tokens).mean(1))))


def test_batchnorm_and_embedding_match_a_loop_over_all_parameters():
    model = _EmbeddingBatchNormModel()
    model.train()
    with torch.no_grad():  # non-trivial running statistics for the eval-mode forward
        model(torch.randint(0, 20, (64, 5)))
    checkpoints = _checkpoints(model, scale=0.2)
    train = TensorDataset(torch.randint(0, 20, (30, 5)), torch.randint(0, 3, (30,)))
    test = (torch.randint(0, 20, (6, 5)), torch.randint(0, 3, (6,)))
    tracin = TracInCP(model, train, checkpoints, _load, batch_size=8)
    _close(tracin.influence(test), _brute_force(model, checkpoints, test, train.tensors))
    _close(tracin.self_influence(test), torch.diagonal(_brute_force(model, checkpoints, test, test)))
    assert [f[0] for f in tracin._layout.factored] == ["fc"]
    assert tracin._engine.vmap_names == []  # embedding and norm parameters from their hooks too


class _SharedWeight(nn.Module):
    """Uses fc.weight outside fc's forward too: its gradient is not d a^T."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) + 0.5 * x[:, :4] @ self.fc.weight[:, :4].T


def test_layer_used_outside_its_forward_is_not_factored():
    model = _SharedWeight()
    checkpoints = _checkpoints(model)
    train, test = TensorDataset(*_data(20)), _data(5)
    tracin = TracInCP(model, train, checkpoints, _load, batch_size=8)
    with pytest.warns(UserWarning, match="module 'fc'.*used outside the module's forward"):
        scores = tracin.influence(test)
    _close(scores, _brute_force(model, checkpoints, test, train.tensors))
    assert not tracin._layout.factored
    with pytest.raises(ValueError, match="final_fc_layer: 'fc' does not give its per-example gradients"):
        TracInCPFast(model, model.fc, train, checkpoints, _load).influence(test)


def test_linear_layer_that_does_not_pay_is_left_to_explicit_gradients():
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1))  # out = 1: (7 + 1) > 7 x 1
    checkpoints = _checkpoints(model)
    train = TensorDataset(torch.randn(20, 8), torch.randn(20, 1))
    test = (torch.randn(5, 8), torch.randn(5, 1))
    tracin = TracInCP(model, train, checkpoints, _load, loss_fn=nn.MSELoss(reduction="none"), batch_size=8)
    reference = _brute_force(model, checkpoints, test, train.tensors, loss=nn.functional.mse_loss)
    _close(tracin.influence(test), reference)
    assert [f[0] for f in tracin._layout.factored] == ["0"] and tracin._engine.vmap_names == []
    keys = tracin.compute_intermediate_quantities(train)
    _close(tracin.compute_intermediate_quantities(test).double() @ keys.double().T, reference)


class _TokenHead(nn.Module):
    """A per-position Linear head, pooled: the final layer sees (B, T, in)."""

    def __init__(self, width_in, width_out, positions):
        super().__init__()
        self.body = nn.Linear(5, width_in * positions)
        self.head = nn.Linear(width_in, width_out)
        self.positions = positions

    def forward(self, x):
        h = torch.tanh(self.body(x)).reshape(x.shape[0], self.positions, -1)
        return self.head(h).mean(1)


@pytest.mark.parametrize("width_in,width_out,positions,factorised", [(16, 12, 2, True), (3, 2, 4, False)])
def test_fast_sequence_inputs_match_a_loop(width_in, width_out, positions, factorised):
    model = _TokenHead(width_in, width_out, positions)
    checkpoints = _checkpoints(model, scale=0.2)
    train = TensorDataset(torch.randn(30, 5), torch.randint(0, width_out, (30,)))
    test = (torch.randn(6, 5), torch.randint(0, width_out, (6,)))
    fast = TracInCPFast(model, model.head, train, checkpoints, _load, batch_size=8)
    reference = _brute_force(model, checkpoints, test, train.tensors, params=lambda m: [m.head.weight, m.head.bias])
    _close(fast.influence(test), reference)
    assert bool(fast._layout.factored) is factorised
    _close(
        fast.self_influence(test),
        torch.diagonal(_brute_force(model, checkpoints, test, test, params=lambda m: [m.head.weight, m.head.bias])),
    )
    keys = fast.compute_intermediate_quantities(train)
    _close(fast.compute_intermediate_quantities(test).double() @ keys.double().T, reference)


# --- losses and projection ------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True])
def test_loss_reductions_give_the_same_per_example_loss(linear_setup, fast):
    model, checkpoints, train, test = linear_setup
    cls = (
        (lambda **kw: TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16, **kw))
        if fast
        else (lambda **kw: TracInCP(model, train, checkpoints, _load, batch_size=16, **kw))
    )
    reference = cls().influence(test)
    for loss_fn in (
        nn.CrossEntropyLoss(reduction="sum"),
        nn.CrossEntropyLoss(reduction="mean"),
        lambda out, y: nn.functional.cross_entropy(out, y),
    ):
        _close(cls(loss_fn=loss_fn).influence(test), reference)


def test_mse_loss_with_mean_reduction_matches_a_loop(linear_setup):
    model, checkpoints, train, _ = linear_setup
    targets = TensorDataset(train.tensors[0], torch.randn(40, 4))
    test = (torch.randn(5, 8), torch.randn(5, 4))
    for tracin in (
        TracInCP(model, targets, checkpoints, _load, loss_fn=nn.MSELoss(), batch_size=16),
        TracInCPFast(model, model[2], targets, checkpoints, _load, loss_fn=nn.MSELoss(), batch_size=16),
    ):
        params = (lambda m: [m[2].weight, m[2].bias]) if isinstance(tracin, TracInCPFast) else None
        reference = _brute_force(model, checkpoints, test, targets.tensors, params=params, loss=nn.functional.mse_loss)
        _close(tracin.influence(test), reference)


def test_projection_is_the_projector_applied_per_checkpoint(linear_setup):
    model, checkpoints, train, test = linear_setup
    exact = TracInCP(model, train, checkpoints, _load, layers=[model[2]], batch_size=16)
    projected = TracInCP(model, train, checkpoints, _load, layers=[model[2]], batch_size=16, projection_dim=16)
    fast = TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16, projection_dim=16)
    queries = projected.compute_intermediate_quantities(test)
    matrix = projected.projector.matrix().double()
    assert projected.projector.names == ["2.weight", "2.bias"] and not projected._layout.factored
    stacked = exact.compute_intermediate_quantities(test).double().reshape(7, len(checkpoints), -1)
    expected = (stacked @ matrix).reshape(7, -1)
    _close(queries, expected)
    _close(fast.compute_intermediate_quantities(test), expected)
    keys = (exact.compute_intermediate_quantities(train).double().reshape(40, len(checkpoints), -1) @ matrix).reshape(
        40, -1
    )
    _close(fast.influence(test), expected @ keys.T)
    _close(projected.influence(test), expected @ keys.T)


def test_auto_projection_factors_what_pays_and_projects_only_a_large_remainder(linear_setup):
    model, checkpoints, train, test = linear_setup
    small = TracInCP(model, train, checkpoints, _load, projection_dim="auto", batch_size=16)
    _close(small.influence(test), _brute_force(model, checkpoints, test, train.tensors))
    assert small.projector is None and len(small._layout.factored) == 2

    model = nn.Sequential(nn.Embedding(600, 16), nn.Flatten(), nn.Linear(48, 4))  # 9,600 embedding entries
    checkpoints = _checkpoints(model, learning_rates=[0.1, 0.05])
    train = TensorDataset(torch.randint(0, 600, (30, 3)), torch.randint(0, 4, (30,)))
    test = (torch.randint(0, 600, (5, 3)), torch.randint(0, 4, (5,)))
    large = TracInCP(model, train, checkpoints, _load, projection_dim="auto", batch_size=16)
    scores = large.influence(test)
    assert large.projector.names == ["0.weight"] and large.projector.projection_dim == 4096
    assert [f[0] for f in large._layout.factored] == ["2"]
    queries, keys = large.compute_intermediate_quantities(test), large.compute_intermediate_quantities(train)
    assert queries.shape[1] == 2 * (4 * 48 + 4 + 4096)
    _close(queries.double() @ keys.double().T, scores)


def test_exported_at_top_level():
    assert ci.TracInCP is TracInCP and ci.TracInCPFast is TracInCPFast


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu(linear_setup):
    model, checkpoints, train, test = linear_setup
    for make in (
        lambda device: TracInCP(model, train, checkpoints, _load, batch_size=16, device=device),
        lambda device: TracInCPFast(model, model[2], train, checkpoints, _load, batch_size=16, device=device),
    ):
        cpu = make("cpu").influence(test)
        gpu = make("cuda").influence(test)
        assert gpu.device.type == "cuda"
        _close(gpu.cpu(), cpu)
        model.cpu()


# --- bad input ----------------------------------------------------------------------------


def test_loader_without_learning_rate_raises(linear_setup):
    model, checkpoints, train, test = linear_setup
    tracin = TracInCP(model, train, checkpoints, lambda m, c: m.load_state_dict(c["state"]))
    with pytest.raises(TypeError, match="checkpoints_load_func.*learning rate.*returned"):
        tracin.influence(test)


@pytest.mark.parametrize("bad_lr,error", [(-0.1, ValueError), ("0.1", TypeError)])
def test_negative_or_non_float_learning_rate_raises(linear_setup, bad_lr, error):
    model, checkpoints, train, test = linear_setup
    tracin = TracInCP(model, train, checkpoints, lambda m, c: (m.load_state_dict(c["state"]), bad_lr)[1])
    with pytest.raises(error, match="checkpoints_load_func"):
        tracin.self_influence()


def test_mismatched_checkpoint_keys_raise(linear_setup):
    model, checkpoints, train, test = linear_setup
    wrong = [{k.replace("2.", "3."): v for k, v in c["state"].items()} for c in checkpoints]
    tracin = TracInCP(model, train, wrong)
    with pytest.raises(ValueError, match="checkpoints: checkpoint 0.*does not match the model"):
        tracin.influence(test)


def test_final_fc_layer_must_be_a_linear_of_the_model(linear_setup):
    model, checkpoints, train, _ = linear_setup
    with pytest.raises(ValueError, match="final_fc_layer: the Linear given is not a module of the model"):
        TracInCPFast(model, nn.Linear(6, 4), train, checkpoints, _load)
    with pytest.raises(ValueError, match="final_fc_layer: 'fc' names no module.*'0', '2'"):
        TracInCPFast(model, "fc", train, checkpoints, _load)
    with pytest.raises(TypeError, match="final_fc_layer: expected an nn.Linear; '1' is a ReLU"):
        TracInCPFast(model, model[1], train, checkpoints, _load)


def test_other_bad_arguments(linear_setup):
    model, checkpoints, train, test = linear_setup
    with pytest.raises(ValueError, match="projection_dim: expected a positive int, 'auto' or None; got 0"):
        TracInCP(model, train, checkpoints, _load, projection_dim=0)
    with pytest.raises(TypeError, match="loss_fn: expected a loss module or a callable"):
        TracInCP(model, train, checkpoints, _load, loss_fn="cross_entropy")
    with pytest.raises(ValueError, match="layers: 'head' names no parameter"):
        TracInCP(model, train, checkpoints, _load, layers=["head"])
    fast = TracInCPFast(model, model[2], train, checkpoints, _load)
    with pytest.raises(ValueError, match="k: expected a positive int or None; got 0"):
        fast.influence(test, k=0)
    clamped = fast.influence(test, k=41)  # clamped to n_train, as in Captum
    assert clamped.indices.shape == (test[0].shape[0], 40)
    assert torch.equal(clamped.indices.sort(1).values, torch.arange(40).expand(test[0].shape[0], 40))
