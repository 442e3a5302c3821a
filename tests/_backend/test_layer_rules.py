"""Layer rules and the engine's factors against a loop of single-example autograd calls."""

import pytest
import torch
from torch import nn

from captum_influence._backend import LayerGrads, per_example_grads
from captum_influence._backend.grads import _loop_grads
from captum_influence._backend.layer_rules import (
    LayerRule,
    factorised_norms,
    factorised_scores,
    register_rule,
    rule_for,
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
def test_factors_give_the_loop_gradients(frozen):
    model = _Tokens().double().eval()
    if frozen:
        model.requires_grad_(False)
    x, y = torch.randn(7, 5, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    names = ["proj.weight", "head.weight", "head.bias"]
    engine = LayerGrads(model, names)
    chunk = engine.collect(_fn, (x, y), factored=[model.proj, model.head])
    a, d = chunk.factors["head"]
    assert a.shape == (7, 5 + 1, 6 + 1) and d.shape == (7, 6, 3)  # two calls: 5 + 1 positions; bias column
    assert chunk.factors["proj"][0].shape == (7, 5, 4)  # no bias column
    reference = _loop_grads(model, _fn, (x, y), names)
    head = rule_for(model.head)[0].from_factors(model.head, a, d)
    torch.testing.assert_close(head["weight"], reference["head.weight"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head["bias"], reference["head.bias"], rtol=1e-10, atol=1e-12)
    proj = rule_for(model.proj)[0].from_factors(model.proj, *chunk.factors["proj"])
    assert set(proj) == {"weight"}
    torch.testing.assert_close(proj["weight"], reference["proj.weight"], rtol=1e-10, atol=1e-12)
    assert model.proj.weight.requires_grad is not frozen


def test_factorised_scores_and_norms_equal_explicit_dot_products():
    model = _Tokens().double().eval()
    x, y = torch.randn(9, 5, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    a, d = LayerGrads(model, ["head"]).collect(_fn, (x, y), factored=[model.head]).factors["head"]
    g = _flat(rule_for(model.head)[0].from_factors(model.head, a, d))
    torch.testing.assert_close(factorised_scores(a[:4], d[:4], a, d), g[:4] @ g.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(factorised_norms(a, d), (g * g).sum(1), rtol=1e-10, atol=1e-12)


def test_conv3d_and_keyword_call_match_the_loop():
    class Volume(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, groups=1)
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(input=torch.tanh(self.conv(x)).mean((2, 3, 4)))

    model = Volume().double().eval()
    x, y = torch.randn(5, 2, 4, 5, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    engine = LayerGrads(model, fallback="error")
    ours = engine.grads(_fn, (x, y))
    reference = _loop_grads(model, _fn, (x, y), list(ours))
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-10, atol=1e-12)


def test_registered_rule_is_used_and_bad_registrations_raise():
    class Scale(nn.Module):
        """y = x * w elementwise: d_b * a_b summed over positions."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.w

    def scale_grads(module, a, d, dtype, wanted):
        return {"w": (a * d).reshape(a.shape[0], -1, a.shape[-1]).sum(1)}

    model = nn.Sequential(nn.Linear(2, 3), Scale(), nn.Linear(3, 2)).double().eval()
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,))
    with pytest.raises(ValueError, match="no exact per-example rule for Scale"):
        LayerGrads(model, fallback="error")
    register_rule(Scale, LayerRule(scale_grads))
    ours = LayerGrads(model, fallback="error").grads(_fn, (x, y))
    torch.testing.assert_close(ours["1.w"], per_example_grads(model, _fn, (x, y))["1.w"], rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="layer_type"):
        register_rule("Scale", LayerRule(scale_grads))
    with pytest.raises(TypeError, match="rule"):
        register_rule(Scale, scale_grads)
