"""Linear-layer gradient factors against the vmap per-example gradients."""

import pytest
import torch
from torch import nn

from captum_influence._backend import per_example_grads
from captum_influence._backend.linear_factors import (
    factor_gradients,
    factorised_norms,
    factorised_scores,
    linear_factors,
)


class _Tokens(nn.Module):
    """``head`` sees (B, T, in) and runs twice; ``proj`` has no bias."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.proj(x))  # (B, T, 6)
        return self.head(h).mean(1) + 0.5 * self.head(h[:, :1]).squeeze(1)


def _fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def _flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


@pytest.mark.parametrize("frozen", [False, True])
def test_factor_gradients_equal_per_example_grads(frozen):
    model = _Tokens().eval()
    if frozen:
        model.requires_grad_(False)
    x, y = torch.randn(7, 5, 4), torch.randint(0, 3, (7,))
    factors = linear_factors(model, _fn, (x, y), ["proj", "head"])
    a, d = factors["head"]
    assert a.shape == (7, 5 + 1, 6 + 1) and d.shape == (7, 6, 3)  # two calls: 5 + 1 positions; bias column
    assert factors["proj"][0].shape == (7, 5, 4)  # no bias column
    reference = per_example_grads(model, _fn, (x, y), params=["proj.weight", "head.weight", "head.bias"])
    head = factor_gradients(a, d, 6)
    torch.testing.assert_close(head["weight"], reference["head.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head["bias"], reference["head.bias"], rtol=1e-5, atol=1e-6)
    proj = factor_gradients(*factors["proj"], 4)
    assert set(proj) == {"weight"}
    torch.testing.assert_close(proj["weight"], reference["proj.weight"], rtol=1e-5, atol=1e-6)


def test_factorised_scores_and_norms_equal_explicit_dot_products():
    model = _Tokens().eval()
    x, y = torch.randn(9, 5, 4), torch.randint(0, 3, (9,))
    a, d = linear_factors(model, _fn, (x, y), ["head"])["head"]
    g = _flat(factor_gradients(a, d, 6)).double()
    a, d = a.double(), d.double()
    torch.testing.assert_close(factorised_scores(a[:4], d[:4], a, d), g[:4] @ g.T)
    torch.testing.assert_close(factorised_norms(a, d), (g * g).sum(1))


def test_in_place_op_after_the_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).eval()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    a, d = linear_factors(model, _fn, (x, y), ["0"])["0"]
    reference = per_example_grads(model, _fn, (x, y), params=["0.weight", "0.bias"])
    got = factor_gradients(a, d, 4)
    torch.testing.assert_close(got["weight"], reference["0.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["bias"], reference["0.bias"], rtol=1e-5, atol=1e-6)


def test_bad_layers_raise():
    model = _Tokens().eval()
    x, y = torch.randn(3, 5, 4), torch.randint(0, 3, (3,))
    with pytest.raises(TypeError, match="layers: '' is a _Tokens; expected an nn.Linear"):
        linear_factors(model, _fn, (x, y), [""])
    unused = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"layers: \['1'\] did not run in the forward pass"):
        linear_factors(unused, lambda m, x, y: _fn(m[0], x, y), (x[:, 0], y), ["0", "1"])
    with pytest.raises(ValueError, match=r"fn: must return one scalar per example, shape \(3,\); got \(\)"):
        linear_factors(model, lambda m, x, y: _fn(m, x, y).sum(), (x, y), ["head"])
