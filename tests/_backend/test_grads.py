import pytest
import torch
import torch.nn.functional as F
from helpers import neg_ce_fn
from torch import nn

import captum_influence as ci
from captum_influence._backend import VmapUnsupportedError


def loop_grads(model, fn, inputs, names):
    """Reference: one torch.autograd.grad call per example."""
    table = dict(model.named_parameters())
    n = inputs[0].shape[0] if isinstance(inputs[0], torch.Tensor) else next(iter(inputs[0].values())).shape[0]
    rows = []
    for b in range(n):
        one = tuple({k: v[b : b + 1] for k, v in x.items()} if isinstance(x, dict) else x[b : b + 1] for x in inputs)
        out = fn(model, *one)[0]
        rows.append(torch.autograd.grad(out, [table[n] for n in names], allow_unused=True))
    return {
        n: torch.stack([r[i] if r[i] is not None else torch.zeros_like(table[n]) for r in rows])
        for i, n in enumerate(names)
    }


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, features, *, scale=1.0):
        return self.out(torch.tanh(self.a(features["x"]) + self.b(features["z"]))) * scale


def assert_grads_equal(ours, ref, tol=1e-10):
    assert list(ours) == list(ref)
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        assert (ours[name] - ref[name]).abs().max().item() < tol, name


def _bn_model():
    torch.manual_seed(0)
    model = ConvNet().double()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_conv_batchnorm_linear_matches_loop():
    model = _bn_model()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    names = [n for n, _ in model.named_parameters()]
    assert_grads_equal(ci.per_example_grads(model, neg_ce_fn, (x, y)), loop_grads(model, neg_ce_fn, (x, y), names))


def test_embedding_layernorm_attention_matches_loop():
    model = AttnNet().double().eval()
    tokens, y = torch.randint(0, 20, (5, 7)), torch.randint(0, 3, (5,))
    names = [n for n, _ in model.named_parameters()]
    ours = ci.per_example_grads(model, neg_ce_fn, (tokens, y))
    assert_grads_equal(ours, loop_grads(model, neg_ce_fn, (tokens, y), names))
    assert ours["emb.weight"].abs().sum() > 0


def test_dict_and_keyword_inputs_match_loop():
    model = DictNet().double()
    batch = {"x": torch.randn(4, 5, dtype=torch.float64), "z": torch.randn(4, 3, dtype=torch.float64)}
    y = torch.randint(0, 2, (4,))

    def fn(m, features, labels):
        return -F.cross_entropy(m(features, scale=2.0), labels, reduction="none")

    names = [n for n, _ in model.named_parameters()]
    assert_grads_equal(ci.per_example_grads(model, fn, (batch, y)), loop_grads(model, fn, (batch, y), names))


def test_param_selection_and_chunking_give_same_numbers():
    model = _bn_model()
    x, y = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (7,))
    full = ci.per_example_grads(model, neg_ce_fn, (x, y))
    by_module = ci.per_example_grads(model, neg_ce_fn, (x, y), params=[model.fc, "bn.weight"], chunk_size=3)
    assert list(by_module) == ["bn.weight", "fc.weight", "fc.bias"]
    for name, g in by_module.items():
        assert torch.equal(g, full[name]) or (g - full[name]).abs().max() < 1e-12
    chunked = ci.per_example_grads(model, neg_ce_fn, (x, y), chunk_size=2)
    assert_grads_equal(chunked, full, tol=1e-12)


def test_selection_differentiates_only_selected_params():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    seen = []

    class Spy(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(w):
            return w.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            seen.append(g.shape)
            return g

    def fn(m, x, y):
        h = F.linear(x, Spy.apply(m[0].weight), m[0].bias)
        return -F.cross_entropy(m[2](torch.relu(h)), y, reduction="none")

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    out = ci.per_example_grads(model, fn, (x, y), params=[model[2]], fallback="error")
    assert list(out) == ["2.weight", "2.bias"]
    assert seen == []
    ci.per_example_grads(model, fn, (x, y), fallback="error")
    assert seen


class ItemModel(nn.Module):
    """.item() inside forward: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(self.body(x)))


class Gate(nn.Module):
    def forward(self, h):
        return h * (2.0 if h.sum().item() > 0 else 1.0)


def test_vmap_failure_names_module_and_falls_back_to_same_numbers():
    model = ItemModel().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.raises(VmapUnsupportedError, match="gate"):
        ci.per_example_grads(model, neg_ce_fn, (x, y), fallback="error", method="vmap")
    with pytest.warns(UserWarning, match="gate"):
        ours = ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap")
    assert_grads_equal(ours, loop_grads(model, neg_ce_fn, (x, y), [n for n, _ in model.named_parameters()]))


def test_bad_inputs_raise_naming_the_argument():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="inputs"):
        ci.per_example_grads(model, neg_ce_fn, (x, y[:3]))
    with pytest.raises(ValueError, match="params"):
        ci.per_example_grads(model, neg_ce_fn, (x, y), params=["nothing"])
    with pytest.raises(ValueError, match="params"):
        ci.per_example_grads(model, neg_ce_fn, (x, y), params=[nn.Linear(3, 2)])
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            ci.per_example_grads(model, neg_ce_fn, (x, y), chunk_size=bad)
    with pytest.raises(ValueError, match="fn"):
        ci.per_example_grads(model, lambda m, x, y: m(x), (x, y))
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    with pytest.raises(ValueError, match="training mode"):
        ci.per_example_grads(bn, lambda m, x, y: m(x).sum(1), (x, y))


def test_input_grads_match_single_example_loop_and_chunking():
    from captum_influence._backend import input_grads

    model = _bn_model()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    fn = lambda x: torch.log_softmax(model(x), 1)[:, 3]
    (ours,) = input_grads(fn, (x,), chunk_size=4)
    for b in range(6):
        xb = x[b : b + 1].clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(fn(xb)[0], xb)
        assert (ours[b] - ref[0]).abs().max() < 1e-12
    (graph,) = input_grads(fn, (x,), create_graph=True)
    assert graph.requires_grad and torch.allclose(graph, ours)
    with pytest.raises(ValueError, match="fn"):
        input_grads(lambda x: model(x), (x,))
