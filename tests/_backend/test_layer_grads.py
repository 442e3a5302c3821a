import pytest
import torch
import torch.nn.functional as F
from helpers import neg_ce_fn
from torch import nn

import captum_influence as ci
from captum_influence._backend import param_shapes
from captum_influence._backend.layer_grads import LayerGrads, per_example_grads, projected_grads


def assert_close(ours, ref, tol=1e-10):
    assert list(ours) == list(ref)
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        assert (ours[name] - ref[name]).abs().max().item() <= tol * max(1.0, ref[name].abs().max().item()), name


class ConvNet(nn.Module):
    """Every conv variant the hook path handles, with eval BatchNorm and GroupNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.strided = nn.Conv2d(6, 4, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0), groups=2)
        self.reflect = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.seq = nn.Conv1d(4, 3, 2, padding="same")
        self.bn1 = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3 * 24, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.tanh(self.bn(self.reflect(self.strided(h))))
        h = self.gn(h).flatten(2)
        return self.fc(torch.tanh(self.bn1(self.seq(h))).flatten(1))


def conv_net():
    torch.manual_seed(0)
    model = ConvNet().double()
    with torch.no_grad():
        for bn in (model.bn, model.bn1):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
        model.gn.weight.normal_()
    return model.eval()


class TinyLM(nn.Module):
    """Embedding (with padding row), LayerNorm, sequence Linear layers, a layer called twice and a
    head tied to the embedding."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        h = self.norm(self.emb(tokens))
        h = torch.tanh(self.mix(h))
        h = torch.tanh(self.mix(h)) + h
        return self.head(h.mean(1))


def lm_batch(n=7, length=5, vocab=11):
    tokens = torch.randint(0, vocab, (n, length))
    tokens[:, -1] = 0  # padding positions
    return tokens, torch.randint(0, vocab, (n,))


def test_conv_norm_linear_equal_vmap():
    model = conv_net()
    x, y = torch.randn(6, 2, 12, 10, dtype=torch.float64), torch.randint(0, 5, (6,))
    ref = ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap")
    ours = LayerGrads(model, fallback="error").grads(neg_ce_fn, (x, y))  # every layer by hooks
    assert_close(ours, ref)


def test_embedding_layernorm_reused_and_tied_layers_equal_vmap():
    torch.manual_seed(1)
    model = TinyLM().double().eval()
    with torch.no_grad():
        model.norm.weight.normal_()
    tokens, y = lm_batch()
    ref = ci.per_example_grads(model, neg_ce_fn, (tokens, y), method="vmap")
    lg = LayerGrads(model, fallback="error")
    assert lg.vmap_names == []
    assert_close(lg.grads(neg_ce_fn, (tokens, y)), ref)  # the padding row included


def test_chunking_and_batch_size_do_not_change_results():
    model = conv_net()
    x, y = torch.randn(10, 2, 12, 10, dtype=torch.float64), torch.randint(0, 5, (10,))
    lg = LayerGrads(model)
    whole = lg.grads(neg_ce_fn, (x, y))
    assert_close(lg.grads(neg_ce_fn, (x, y), chunk_size=3), whole, tol=1e-12)
    single = [lg.grads(neg_ce_fn, (x[i : i + 1], y[i : i + 1])) for i in range(10)]
    assert_close({k: torch.cat([s[k] for s in single]) for k in whole}, whole, tol=1e-12)


def test_projection_as_produced_equals_projector_on_vmap_grads():
    model = conv_net()
    x, y = torch.randn(9, 2, 12, 10, dtype=torch.float64), torch.randint(0, 5, (9,))
    names = [n for n, _ in model.named_parameters()]
    proj = ci.Projector(param_shapes(model, names), 64, seed=2, dtype=torch.float64, block_rows=37)
    ref = proj.project(ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap"))
    for chunk_size in (None, 4):
        ours = projected_grads(model, neg_ce_fn, (x, y), proj, chunk_size=chunk_size)
        assert (ours - ref).abs().max() < 1e-10 * ref.abs().max()
    by_vmap = projected_grads(model, neg_ce_fn, (x, y), proj, method="vmap", chunk_size=5)
    assert (by_vmap - ref).abs().max() < 1e-10 * ref.abs().max()
    # A parameter selection projects only those parameters' rows.
    sub = ci.Projector(param_shapes(model, ["fc.weight", "bn.bias"]), 32, seed=2, dtype=torch.float64)
    ours = projected_grads(model, neg_ce_fn, (x, y), sub, params=["fc.weight", "bn.bias"])
    ref = sub.project(ci.per_example_grads(model, neg_ce_fn, (x, y), params=["fc.weight", "bn.bias"], method="vmap"))
    assert (ours - ref).abs().max() < 1e-10 * ref.abs().max()


def test_project_param_sums_to_project():
    shapes = {"a": (5, 7), "b": (3,), "c": (4, 4, 2)}
    grads = {k: torch.randn(6, *s, dtype=torch.float64) for k, s in shapes.items()}
    for kind in ("rademacher", "gaussian", "identity"):
        k = None if kind == "identity" else 24
        proj = ci.Projector(shapes, k, kind=kind, seed=4, dtype=torch.float64, block_rows=9)
        out = torch.zeros(6, proj.projection_dim, dtype=torch.float64)
        for name in ("c", "a", "b"):  # any order
            proj.project_param(name, grads[name], out)
        assert (out - proj.project(grads)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="name"):
        proj.project_param("d", grads["a"], out)
    with pytest.raises(ValueError, match="grads"):
        proj.project_param("a", grads["b"], out)
    with pytest.raises(ValueError, match="name"):
        ci.Projector(20, 4).project_param("a", torch.zeros(2, 20), torch.zeros(2, 4))


def test_bf16_products_close_to_exact():
    model = conv_net().float()
    x, y = torch.randn(8, 2, 12, 10), torch.randint(0, 5, (8,))
    names = [n for n, _ in model.named_parameters()]
    exact = ci.Projector(param_shapes(model, names), 128, seed=0)
    low = ci.Projector(param_shapes(model, names), 128, seed=0, dtype=torch.bfloat16)
    ref = projected_grads(model, neg_ce_fn, (x, y), exact)
    ours = projected_grads(model, neg_ce_fn, (x, y), low, precision="bf16")
    assert ours.dtype == torch.float32
    rel = (ours - ref).norm(dim=1) / ref.norm(dim=1)
    assert rel.max() < 2e-2
    assert rel.max() > 0  # the low-precision path really ran


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def test_module_without_rule_falls_back_with_warning_or_raises():
    model = AttnNet().double().eval()
    tokens, y = torch.randint(0, 20, (5, 4)), torch.randint(0, 3, (5,))
    ref = ci.per_example_grads(model, neg_ce_fn, (tokens, y), method="vmap")
    with pytest.warns(UserWarning, match="module 'attn'.*MultiheadAttention"):
        lg = LayerGrads(model)
    assert lg.vmap_names == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    assert_close(lg.grads(neg_ce_fn, (tokens, y)), ref)
    with pytest.raises(ValueError, match="'attn'.*MultiheadAttention"):
        LayerGrads(model, fallback="error")
    # Selecting only parameters with a rule needs no fallback.
    assert_close(
        LayerGrads(model, ["emb", "head"], fallback="error").grads(neg_ce_fn, (tokens, y)),
        ci.per_example_grads(model, neg_ce_fn, (tokens, y), params=["emb", "head"], method="vmap"),
    )


class SharedOutside(nn.Module):
    """fc.weight is also used by a functional call outside fc's forward: hooks cannot see it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + F.linear(h, self.fc.weight))


class TimeFirst(nn.Module):
    """Applies its Linear to a (T, B, D) layout: the first dimension is not the example."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x):  # x: (B, T, D)
        h = torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1)
        return self.out(h.mean(1))


def test_checked_against_autograd_never_silently_wrong():
    torch.manual_seed(0)
    model = SharedOutside().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="'fc'.*do not reproduce autograd"):
        LayerGrads(model, fallback="error").grads(neg_ce_fn, (x, y))
    lg = LayerGrads(model)
    with pytest.warns(UserWarning, match="'fc'.*fc.weight"):
        ours = lg.grads(neg_ce_fn, (x, y))
    assert "fc.weight" in lg.vmap_names and "out.weight" not in lg.vmap_names
    assert_close(ours, ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap"))

    model = TimeFirst().double()
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    with pytest.raises(ValueError, match="'fc'.*first dimension is neither the batch"):
        LayerGrads(model, fallback="error").grads(neg_ce_fn, (x, y))
    with pytest.warns(UserWarning, match="'fc'.*first dimension is neither the batch"):
        assert_close(
            per_example_grads(model, neg_ce_fn, (x, y)), ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap")
        )
    # When T happens to equal B the shapes cannot tell; the autograd check does.
    x, y = torch.randn(5, 5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    with pytest.warns(UserWarning, match="'fc'"):
        ours = per_example_grads(model, neg_ce_fn, (x, y))
    assert_close(ours, ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap"))


def test_frozen_parameters_selected_by_name_and_model_left_as_is():
    model = conv_net()
    model.fc.weight.requires_grad_(False)
    x, y = torch.randn(4, 2, 12, 10, dtype=torch.float64), torch.randint(0, 5, (4,))
    ours = per_example_grads(model, neg_ce_fn, (x, y), params=["fc.weight", "conv"])
    assert_close(ours, ci.per_example_grads(model, neg_ce_fn, (x, y), params=["fc.weight", "conv"], method="vmap"))
    assert not model.fc.weight.requires_grad


class InPlaceInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        out = self.fc(x)
        x.mul_(2.0)
        return out


def test_bad_inputs_raise():
    model = conv_net()
    x, y = torch.randn(4, 2, 12, 10, dtype=torch.float64), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="precision"):
        LayerGrads(model, precision="fp8")
    with pytest.raises(ValueError, match="fallback"):
        LayerGrads(model, fallback="loop")
    with pytest.raises(ValueError, match="fn: must return one scalar per example"):
        LayerGrads(model).grads(lambda m, a, b: m(a), (x, y))
    with pytest.raises(ValueError, match="projector"):
        projected_grads(model, neg_ce_fn, (x, y), ci.Projector({"fc.weight": (5, 72)}, 8))
    with pytest.raises(ValueError, match="method"):
        projected_grads(model, neg_ce_fn, (x, y), ci.Projector(10, 8), method="loop")
    with pytest.raises(ValueError, match="in place"):
        per_example_grads(InPlaceInput(), lambda m, a: m(a).sum(1), (torch.randn(3, 3),))
    model.bn.train()
    with pytest.raises(ValueError, match="training mode"):
        per_example_grads(model, neg_ce_fn, (x, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_hooks_equal_vmap_and_bf16_close():
    model = conv_net().float().cuda()
    x, y = torch.randn(32, 2, 12, 10, device="cuda"), torch.randint(0, 5, (32,), device="cuda")
    names = [n for n, _ in model.named_parameters()]
    shapes = param_shapes(model, names)
    proj = ci.Projector(shapes, 256, seed=1, device="cuda")
    ref = projected_grads(model, neg_ce_fn, (x, y), proj, method="vmap")
    ours = projected_grads(model, neg_ce_fn, (x, y), proj)
    assert ((ours - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-4
    # The same matrix as on the CPU, in float64 there.
    cpu = ci.Projector(shapes, 256, seed=1, dtype=torch.float64)
    ref64 = projected_grads(model.cpu().double(), neg_ce_fn, (x.cpu().double(), y.cpu()), cpu)
    assert ((ours.cpu().double() - ref64).norm(dim=1) / ref64.norm(dim=1)).max() < 1e-4
    model.cuda().float()
    for precision, dtype in (("tf32", torch.float32), ("bf16", torch.bfloat16)):
        low = ci.Projector(shapes, 256, seed=1, device="cuda", dtype=dtype)
        out = projected_grads(model, neg_ce_fn, (x, y), low, precision=precision)
        assert ((out - ref).norm(dim=1) / ref.norm(dim=1)).max() < 2e-2


class _SharedParams(nn.Module):
    """``cls`` (1, 1, 4) is broadcast over the batch like a class token; ``w`` (1, 4) is not: it
    is used as a matrix, so expanding it to the batch changes (n = 4) or breaks (n = 6) forward."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)
        self.w = nn.Parameter(torch.randn(1, 4))
        self.cls = nn.Parameter(torch.randn(1, 1, 4))

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        h = h + h @ self.w.T
        return self.out(torch.cat([self.cls.expand(x.shape[0], -1, -1), h[:, None]], 1).mean(1))


@pytest.mark.parametrize("n", [4, 6])
def test_batch_shared_parameters_exact_and_misused_ones_fall_back(n):
    model = _SharedParams().double().eval()
    x, y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    with pytest.warns(UserWarning, match="parameter 'w'") as record:
        lg = LayerGrads(model)
        ours = lg.grads(neg_ce_fn, (x, y))
    assert not any("'cls'" in str(w.message) for w in record)
    assert lg.shared_names == ["cls"] and lg.vmap_names == ["w"]
    assert_close(ours, ci.per_example_grads(model, neg_ce_fn, (x, y), method="vmap"))
