"""Factored (Kronecker) projection against per-example gradients from a loop of autograd calls."""

import pytest
import torch
from helpers import classification_q, flat, loop_grads, margin_fn
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci
from captum_influence._backend.factored_projection import FactoredProjector, factorable
from captum_influence._backend.layer_grads import LayerGrads


class ConvNet(nn.Module):
    """Conv2d (padded, biased), Conv1d-free strided Conv2d without bias, a LayerNorm (dense part) and a
    Linear applied at every position of a sequence (T > 1) before the head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, bias=False)
        self.norm = nn.LayerNorm(9)
        self.mix = nn.Linear(9, 6)
        self.head = nn.Linear(18, 5)

    def forward(self, x):
        h = self.conv2(torch.tanh(self.conv1(x)))  # (B, 3, 3, 3)
        h = self.mix(self.norm(h.flatten(2)))  # the Linear at 3 positions: (B, 3, 6)
        return self.head(torch.tanh(h).flatten(1))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = ConvNet().double().eval()
    x = torch.randn(7, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    engine = LayerGrads(model)
    layers = {p: m for p, m in engine.covered_modules().items() if factorable(m)}
    dense = {n: p.shape for n, p in model.named_parameters() if n.startswith("norm.")}
    return model, (x, y), engine, layers, dense


def _reference(model, batch, projector, grads=None):
    """vec(P_out^T [dW | db] P_in) per layer from single-example autograd, then the dense part."""
    grads = grads or loop_grads(model, margin_fn, batch)
    n = len(batch[-1])
    parts = []
    for layer in projector.layers:
        p_out, p_in = (p.double() for p in projector.matrices(layer.path))
        g = grads[f"{layer.path}.weight"].reshape(n, p_out.shape[0], -1)
        if layer.module.bias is not None:
            g = torch.cat([g, grads[f"{layer.path}.bias"][..., None]], 2)
        parts.append(torch.einsum("boi,ok,ij->bkj", g, p_out, p_in).reshape(n, -1))
    parts.append(projector.dense.project({name: grads[name].to(projector.dtype) for name in projector.names}).double())
    return torch.cat(parts, 1)


def test_features_equal_the_kronecker_projection_of_exact_gradients():
    model, batch, engine, layers, dense = _setup()
    assert set(layers) == {"conv1", "conv2", "mix", "head"}
    projector = FactoredProjector(layers, dense, 60, seed=4, dtype=torch.float64)
    assert projector.projection_dim <= 60
    ours = engine.project(margin_fn, batch, projector)
    reference = _reference(model, batch, projector)
    assert ours.shape == reference.shape == (7, projector.projection_dim)
    assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))


def test_seeded_deterministic_and_independent_of_the_chunking():
    model, batch, engine, layers, dense = _setup()
    whole = engine.project(margin_fn, batch, FactoredProjector(layers, dense, 60, seed=4, dtype=torch.float64))
    again = FactoredProjector(layers, dense, 60, seed=4, dtype=torch.float64)
    chunked = engine.project(margin_fn, batch, again, chunk_size=3)
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-13 * float(whole.abs().max()))
    other = engine.project(margin_fn, batch, FactoredProjector(layers, dense, 60, seed=5, dtype=torch.float64))
    assert not torch.allclose(other, whole)


def test_inner_products_unbiased_over_seeds():
    """E[<phi_i, phi_j>] = <g_i, g_j>: the mean over 200 seeds is within 4 standard errors (the
    features from the exact gradients, which the test above shows the engine's to equal)."""
    model, batch, engine, layers, dense = _setup()
    grads = loop_grads(model, margin_fn, batch)
    exact = flat(grads)
    exact_gram = exact @ exact.T
    grams = []
    for seed in range(200):
        phi = _reference(model, batch, FactoredProjector(layers, dense, 40, seed=seed, dtype=torch.float64), grads)
        grams.append(phi @ phi.T)
    grams = torch.stack(grams)
    error = (grams.mean(0) - exact_gram).abs()
    assert bool((error <= 4 * grams.std(0) / 200**0.5 + 1e-9).all()), float((error / grams.std(0)).max())


def test_trak_factored_scores_equal_the_closed_form():
    model, batch, engine, layers, dense = _setup()
    x, y = torch.randn(40, 2, 7, 7, dtype=torch.float64), torch.randint(0, 5, (40,))
    targets = (x[:5] + 0.1, y[:5])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trak = ci.TRAK(
        model, TensorDataset(x, y), [state], projection_dim=32, projection="factored", damping=0.1, batch_size=16
    )
    ours = trak.influence(targets)
    projector = trak._projector(0)
    assert isinstance(projector, FactoredProjector) and trak.feature_dim == projector.projection_dim <= 32
    phi = _reference(model, (x, y), projector).double()
    phi_t = _reference(model, targets, projector).double()
    gram = phi.T @ phi + 0.1 * torch.eye(phi.shape[1], dtype=torch.float64)
    reference = phi_t @ torch.linalg.solve(gram, phi.T) * classification_q(model, (x, y))[None, :]
    assert float((ours.double() - reference).abs().max() / reference.abs().max()) < 1e-5
    other_batch = ci.TRAK(
        model, TensorDataset(x, y), [state], projection_dim=32, projection="factored", damping=0.1, batch_size=7
    ).influence(targets)
    assert float((other_batch - ours).abs().max() / ours.abs().max()) < 1e-5


def test_bad_projection_arguments_are_refused():
    model, batch, engine, layers, dense = _setup()
    train = TensorDataset(torch.randn(8, 2, 7, 7, dtype=torch.float64), torch.randint(0, 5, (8,)))
    with pytest.raises(ValueError, match="projection: expected one of"):
        ci.TRAK(model, train, [model.state_dict()], projection="sparse")
    with pytest.raises(ValueError, match="projection_dim: 3 is fewer than one dimension"):
        FactoredProjector(layers, dense, 3)
    with pytest.raises(ValueError, match="layers: .*norm"):
        FactoredProjector({"norm": model.norm}, {}, 10)
    with pytest.raises(ValueError, match="projector: expected a FactoredProjector for the selected parameters"):
        engine.project(margin_fn, batch, FactoredProjector(layers, {}, 60))
