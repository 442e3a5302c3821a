import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import LayerIntegratedGradients as CaptumLIG
from captum.attr import NoiseTunnel
from captum.metrics import infidelity
from sklearn.datasets import load_digits
from torch import nn

import captum_influence as ci
from captum_influence.completeness import CompletenessWarning


class TwoInputNet(nn.Module):
    """Two input tensors and an extra (non-attributed) scale per example."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(3, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x, z, scale=None):
        h = torch.tanh(self.a(x) + self.b(z))
        y = self.out(h)
        return y if scale is None else y * scale[:, None]


class GridNet(nn.Module):
    """Outputs (B, 2, 3): targets index two dimensions."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)

    def forward(self, x):
        return torch.sigmoid(self.fc(x)).reshape(-1, 2, 3) * 3


def mlp(d_in=5, d_out=4):
    return nn.Sequential(nn.Linear(d_in, 16), nn.Tanh(), nn.Linear(16, d_out)).eval()


TARGETS = {
    "int": 2,
    "scalar_tensor": torch.tensor(1),
    "tensor": torch.tensor([0, 3, 1, 2, 2, 0]),
    "list": [3, 1, 0, 0, 2, 1],
}


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
@pytest.mark.parametrize("form", sorted(TARGETS))
def test_matches_captum_tensor_input(method, form):
    model = mlp()
    x, base = torch.randn(6, 5), torch.randn(1, 5)
    ours, d_ours = ci.IntegratedGradients(model).attribute(
        x, baselines=base, target=TARGETS[form], n_steps=20, method=method, return_convergence_delta=True
    )
    ref, d_ref = CaptumIG(model).attribute(
        x, baselines=base, target=TARGETS[form], n_steps=20, method=method, return_convergence_delta=True
    )
    assert isinstance(ours, torch.Tensor) and ours.shape == x.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(d_ours, d_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", sorted(TARGETS))
def test_matches_captum_tuple_input_with_args_and_chunks(form):
    model = TwoInputNet().eval()
    x, z, scale = torch.randn(6, 5), torch.randn(6, 3), torch.rand(6) + 0.5
    kwargs = dict(
        target=TARGETS[form], additional_forward_args=(scale,), n_steps=16, baselines=(0.1, torch.randn(6, 3))
    )
    ours = ci.IntegratedGradients(model).attribute((x, z), internal_batch_size=7, **kwargs)
    ref = CaptumIG(model).attribute((x, z), **kwargs)
    assert isinstance(ours, tuple) and len(ours) == 2
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", [(1, 2), [(0, 1), (1, 2), (1, 0), (0, 0)], None])
def test_matches_captum_multidim_and_scalar_outputs(target):
    model = GridNet().eval() if target is not None else nn.Sequential(mlp(5, 1), nn.Flatten(0)).eval()
    x = torch.randn(4, 5)
    ours = ci.IntegratedGradients(model).attribute(x, target=target, n_steps=12)
    ref = CaptumIG(model).attribute(x, target=target, n_steps=12)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_local_attribution_matches_captum():
    model = mlp()
    x = torch.randn(5, 5)
    ours = ci.IntegratedGradients(model, multiply_by_inputs=False).attribute(x, target=1, n_steps=10)
    ref = CaptumIG(model, multiply_by_inputs=False).attribute(x, target=1, n_steps=10)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_chunking_does_not_change_the_result():
    model = mlp()
    x = torch.randn(5, 5)
    ig = ci.IntegratedGradients(model)
    whole = ig.attribute(x, target=1, n_steps=30)
    for size in (1, 4, 149):
        torch.testing.assert_close(ig.attribute(x, target=1, n_steps=30, internal_batch_size=size), whole)


@pytest.fixture(scope="module")
def digits_models():
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    mlp_model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    cnn = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    for model in (mlp_model, cnn):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(4):
            for idx in torch.randperm(len(x)).split(128):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
    return {"mlp": mlp_model, "cnn": cnn}, x[-8:], y[-8:]


@pytest.mark.parametrize("space", ["logits", "probs"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_auto_steps_reach_completeness_on_digits(digits_models, arch, space):
    models, x, y = digits_models
    forward = models[arch] if space == "logits" else nn.Sequential(models[arch], nn.Softmax(dim=1)).eval()
    ig = ci.IntegratedGradients(forward)
    attr, delta = ig.attribute(x, target=y, n_steps="auto", return_convergence_delta=True)
    with torch.no_grad():
        change = forward(x)[torch.arange(8), y] - forward(torch.zeros_like(x))[torch.arange(8), y]
    # Independent check: sum of attributions against the model's own outputs.
    relative = (attr.sum(1).double() - change.double()).abs() / change.double().abs()
    assert relative.max() <= 1e-3 + 1e-6 / change.abs().min()
    torch.testing.assert_close(delta.double(), attr.sum(1).double() - change.double(), atol=1e-5, rtol=0)
    assert ig.convergence.converged.all() and ig.convergence.not_converged == []


def test_fixed_50_steps_miss_completeness_where_auto_does_not(digits_models):
    models, x, y = digits_models
    for arch, model in models.items():
        with torch.no_grad():
            change = model(x)[torch.arange(8), y] - model(torch.zeros_like(x))[torch.arange(8), y]
        _, delta = CaptumIG(model).attribute(x, target=y, n_steps=50, return_convergence_delta=True)
        fixed = (delta.abs() / change.abs()).double()
        ig = ci.IntegratedGradients(model)
        if arch == "cnn":
            assert fixed.max() > 1e-3  # the case is not trivial: 50 steps miss the tolerance
            with pytest.warns(CompletenessWarning, match="miss completeness"):
                ig.attribute(x, target=y, n_steps=50, completeness_rtol=1e-3)
            assert ig.convergence.not_converged == (fixed > 1e-3).nonzero().flatten().tolist()
        attr = ig.attribute(x, target=y, n_steps="auto")
        auto = (attr.sum(1).double() - change.double()).abs() / change.double().abs()
        assert auto.max() <= 1e-3 and ig.convergence.not_converged == []


def test_auto_reports_examples_over_budget():
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 1), nn.Flatten(0)).eval()
    x = torch.randn(6, 5) * 3
    ig = ci.IntegratedGradients(model)
    with pytest.warns(CompletenessWarning, match=r"examples \["):
        ig.attribute(x, n_steps="auto", completeness_rtol=1e-9, max_steps=16)
    conv = ig.convergence
    with torch.no_grad():
        change = model(x) - model(torch.zeros_like(x))
    torch.testing.assert_close(conv.output_change, change.double())
    missed = (conv.delta.abs() > 1e-9 * change.abs() + 1e-6).nonzero().flatten().tolist()
    assert conv.not_converged == missed and missed and (conv.n_steps <= 16).all()
    with pytest.warns(CompletenessWarning):  # the smallest budget stops after one pass
        ig.attribute(x, n_steps="auto", completeness_rtol=1e-9, max_steps=1)
    assert (ig.convergence.n_steps == 1).all()


def test_noise_tunnel_and_infidelity():
    model = mlp()
    x = torch.randn(3, 5)
    nt = NoiseTunnel(ci.IntegratedGradients(model))
    attr, delta = nt.attribute(
        x, nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=1, n_steps=16, return_convergence_delta=True
    )
    assert attr.shape == x.shape and delta.shape == (12,) and torch.isfinite(delta).all()

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.01
        return noise, inputs - noise

    ours = ci.IntegratedGradients(model).attribute(x, target=1)
    score = infidelity(model, perturb, x, ours, target=1)
    assert score.shape == (3,) and torch.isfinite(score).all()


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)).mean(1))


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_ig_matches_captum(to_input):
    model = Tokens().eval()
    tokens = torch.randint(1, 12, (5, 7))
    layer = model.emb if not to_input else model.head
    kwargs = dict(
        baselines=0,
        target=[0, 1, 2, 1, 0],
        n_steps=25,
        attribute_to_layer_input=to_input,
        return_convergence_delta=True,
    )
    ours, d_ours = ci.LayerIntegratedGradients(model, layer).attribute(tokens, internal_batch_size=9, **kwargs)
    ref, d_ref = CaptumLIG(model, layer).attribute(tokens, **kwargs)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(d_ours, d_ref, atol=1e-5, rtol=0)


def test_layer_ig_auto_completeness_to_layer_input():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(torch.relu(out[:, -1]))

    model = Seq().eval()
    x = torch.randn(4, 5, 4)
    lig = ci.LayerIntegratedGradients(model, model.head)
    attr = lig.attribute(x, target=2, n_steps="auto", attribute_to_layer_input=True)
    assert lig.convergence.converged.all()
    with torch.no_grad():
        change = model(x)[:, 2] - model(torch.zeros_like(x))[:, 2]
    torch.testing.assert_close(attr.sum(1).double(), change.double(), atol=1e-5, rtol=1e-3)


class Split(nn.Module):
    def forward(self, h):
        return torch.tanh(h[:, :3]), torch.sigmoid(h[:, 3:])


class TupleLayerNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.split, self.head = nn.Linear(5, 7), Split(), nn.Linear(7, 3)

    def forward(self, x):
        a, b = self.split(self.fc(x))
        return self.head(torch.cat([a * b.mean(1, keepdim=True), b], 1))


def test_layer_ig_tuple_output_matches_captum():
    model = TupleLayerNet().eval()
    x = torch.randn(4, 5)
    ours, d_ours = ci.LayerIntegratedGradients(model, model.split).attribute(
        x, target=1, n_steps=30, return_convergence_delta=True
    )
    ref, d_ref = CaptumLIG(model, model.split).attribute(x, target=1, n_steps=30, return_convergence_delta=True)
    assert isinstance(ours, tuple) and [a.shape for a in ours] == [(4, 3), (4, 4)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(d_ours, d_ref, atol=1e-5, rtol=0)


def test_layer_run_twice_is_an_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice().eval()
    with pytest.raises(ValueError, match="layer: Linear ran 0 times"):
        ci.LayerIntegratedGradients(model, Twice().fc).attribute(torch.randn(2, 4), target=0)
    with pytest.raises(ValueError, match="layer: Linear ran 2 times"):
        ci.LayerIntegratedGradients(model, model.fc).attribute(torch.randn(2, 4), target=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(baselines=torch.zeros(2, 5)),
            ValueError,
            r"baselines\[0\]: expected shape \(6, 5\) or \(1, 5\) to match inputs\[0\]; got \(2, 5\)",
        ),
        (dict(baselines=(0, 0)), ValueError, "baselines: expected 1 baseline"),
        (dict(target=4), ValueError, r"target: index \(4,\) for example 0 is out of range"),
        (dict(target=[0, 1]), ValueError, r"target: a list target needs one entry per example \(6\); got 2"),
        (dict(target=torch.tensor([0.5])), TypeError, "target: a tensor target must hold integer"),
        (dict(target=None), ValueError, r"target: forward_func returns shape \(6, 4\), not one scalar per example"),
        (dict(target=0, n_steps=0), ValueError, "n_steps: expected an int >= 1"),
        (dict(target=0, n_steps=1, method="riemann_left"), ValueError, "n_steps: expected an int >= 2"),
        (dict(target=0, n_steps="many"), ValueError, "n_steps: .*'auto'; got 'many'"),
        (dict(target=0, method="simpson"), ValueError, "method: expected one of"),
        (dict(target=0, internal_batch_size=0), ValueError, "internal_batch_size: expected a positive int"),
        (dict(target=0, completeness_rtol=-1.0), ValueError, "completeness_rtol: expected a positive float"),
        (
            dict(target=0, additional_forward_args=torch.ones(3)),
            ValueError,
            r"additional_forward_args\[0\]: .*batch size 6",
        ),
    ],
)
def test_bad_input(kwargs, error, match):
    model = mlp()
    forward = model if "additional_forward_args" not in kwargs else (lambda x, s: model(x) * s[:, None])
    with pytest.raises(error, match=match):
        ci.IntegratedGradients(forward).attribute(torch.randn(6, 5), **kwargs)


def test_bad_inputs_and_nonfinite_outputs():
    ig = ci.IntegratedGradients(mlp())
    with pytest.raises(TypeError, match="inputs: gradients need floating-point"):
        ig.attribute(torch.ones(3, 5, dtype=torch.long), target=0)
    with pytest.raises(TypeError, match="inputs: expected a Tensor or a non-empty tuple"):
        ig.attribute([torch.ones(3, 5)], target=0)
    with pytest.raises(ValueError, match="inputs: every tensor needs the same"):
        ci.IntegratedGradients(TwoInputNet()).attribute((torch.ones(3, 5), torch.ones(2, 3)), target=0)
    with pytest.raises(ValueError, match="not finite"):
        ci.IntegratedGradients(lambda x: torch.log(x.sum(1))).attribute(torch.rand(3, 5), n_steps=4)


def test_attribute_future_is_not_implemented_as_in_captum():
    model = torch.nn.Linear(3, 2)
    for cls in (ci.IntegratedGradients, CaptumIG):
        with pytest.raises(NotImplementedError):
            cls(model).attribute_future()


def test_inputs_of_another_dtype_than_the_model_name_both():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"inputs: dtype torch.float64, but the model's parameters are torch.float32"):
        ci.IntegratedGradients(model).attribute(torch.randn(2, 3, dtype=torch.float64), target=0)
    double = model.double()
    with pytest.raises(ValueError, match=r"inputs: dtype torch.float32, but the model's parameters are torch.float64"):
        ci.IntegratedGradients(double).attribute(torch.randn(2, 3), target=0)
    ci.IntegratedGradients(double).attribute(torch.randn(2, 3, dtype=torch.float64), target=0)


def _relu_mlp_ig(layers, x, baseline, target):
    """Closed-form IG of a ReLU MLP's logit: along the path every pre-activation is linear between the
    points where one of them changes sign, so the gradient is constant there; walk those points in order."""
    (w1, b1), (w2, b2), (w3, _) = [(m.weight.detach(), m.bias.detach()) for m in layers]
    direction = x - baseline
    alpha, total = 0.0, torch.zeros_like(x)
    while alpha < 1:
        z = baseline + alpha * direction
        h1, dh1 = w1 @ z + b1, w1 @ direction
        m1 = h1 + 1e-9 * dh1 > 0  # the sign just ahead: a unit the last step stopped on may sit at -1e-17
        h2, dh2 = w2 @ (m1 * h1) + b2, w2 @ (m1 * dh1)
        m2 = h2 + 1e-9 * dh2 > 0
        steps = torch.cat([-h1 / dh1, -h2 / dh2])
        ahead = steps[steps > 1e-9]
        end = min(1.0, alpha + float(ahead.min())) if len(ahead) else 1.0
        grad = ((w3[target] * m2) @ w2 * m1) @ w1
        total += (end - alpha) * grad
        alpha = end
    return direction * total


def test_auto_is_exact_on_a_relu_mlp_in_logits():
    torch.manual_seed(3)
    layers = [nn.Linear(6, 24), nn.Linear(24, 16), nn.Linear(16, 3)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2]).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64) * 2
    baselines = torch.randn(5, 6, dtype=torch.float64) * 0.1
    target = [0, 1, 2, 0, 1]
    ig = ci.IntegratedGradients(model)
    ours = ig.attribute(x, baselines, target=target, n_steps="auto", completeness_rtol=1e-10, completeness_atol=0.0)
    exact = torch.stack([_relu_mlp_ig(layers, x[b], baselines[b], target[b]) for b in range(5)])
    torch.testing.assert_close(ours, exact, atol=1e-6, rtol=0)
    assert ig.convergence.converged.all() and (ig.convergence.pieces > 1).all()
    # Fixed Gauss-Legendre steps do not get there: the integrand jumps at every switch.
    fixed = CaptumIG(model).attribute(x, baselines, target=target, n_steps=200)
    assert (fixed - exact).abs().max() > 1e-5


@pytest.fixture(scope="module")
def relu_cnn():
    """Two 3x3 convolutions with ReLU and max-pooling, logits scaled by 3, trained on digits."""
    torch.manual_seed(1)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    net = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            F.cross_entropy(3 * net(x[idx]), y[idx]).backward()
            opt.step()

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, inputs):
            return 3 * self.net(inputs)

    return Scaled().eval(), x[-6:], y[-6:]


def _relative_errors(attr, forward, x, baselines, y):
    with torch.no_grad():
        change = forward(x)[torch.arange(len(y)), y] - forward(baselines)[torch.arange(len(y)), y]
    return (attr.reshape(len(y), -1).sum(1).double() - change.double()).abs() / change.double().abs()


@pytest.mark.parametrize("space", ["logits", "probs"])
def test_auto_reaches_completeness_on_a_relu_cnn_with_max_pooling(relu_cnn, space):
    model, x, y = relu_cnn
    forward = ci.select_output(model, space)
    baselines = torch.zeros_like(x)
    attr = ci.IntegratedGradients(forward).attribute(x, target=y, n_steps="auto")
    assert _relative_errors(attr, forward, x, baselines, y).max() <= 1e-3
    captum = CaptumIG(forward).attribute(x, target=y, n_steps=50)
    assert _relative_errors(captum, forward, x, baselines, y).max() > 1e-3


def test_layer_ig_auto_reaches_completeness_in_probs(relu_cnn):
    model, x, y = relu_cnn
    forward = ci.select_output(model, "probs")
    lig = ci.LayerIntegratedGradients(forward, model.net[2])  # the first ReLU's output
    attr = lig.attribute(x, target=y, n_steps="auto")
    assert attr.shape == (6, 8, 8, 8)
    assert _relative_errors(attr, forward, x, torch.zeros_like(x), y).max() <= 1e-3
    assert lig.convergence.converged.all()
    # At fixed steps the same layer attributions equal Captum's.
    ours = lig.attribute(x, target=y, n_steps=20)
    torch.testing.assert_close(
        ours, CaptumLIG(forward, model.net[2]).attribute(x, target=y, n_steps=20), atol=1e-5, rtol=1e-4
    )


class _CubeWithoutForwardMode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_auto_without_forward_mode_derivatives_still_converges():
    torch.manual_seed(0)
    linear = nn.Linear(4, 2)

    def forward(x):
        return torch.tanh(_CubeWithoutForwardMode.apply(linear(x)))

    x = torch.randn(3, 4)
    ig = ci.IntegratedGradients(forward)
    attr = ig.attribute(x, target=1, n_steps="auto")
    with torch.no_grad():
        change = forward(x)[:, 1] - forward(torch.zeros_like(x))[:, 1]
    assert ((attr.sum(1) - change).abs() <= 1e-3 * change.abs() + 1e-6).all()


def test_non_convergence_names_random_modules_first():
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).train()
    x = torch.randn(4, 5)
    ig = ci.IntegratedGradients(model)
    with pytest.warns(CompletenessWarning, match="two identical calls differ") as record:
        ig.attribute(x, target=0, n_steps="auto", max_steps=64)
    assert "use n_steps='auto'" not in str(record[0].message)
    assert all("identical calls" in cause for cause in ig.convergence.causes.values())


def test_non_convergence_names_an_unresolved_kink():
    def forward(x):  # a step: F jumps where the sum of x crosses 1, which no quadrature can integrate
        return torch.where(x.sum(1, keepdim=True) > 1.0, 1.0, 0.0) + 0.1 * x[:, :1]

    x = torch.full((2, 3), 1.0)
    ig = ci.IntegratedGradients(forward)
    with pytest.warns(CompletenessWarning, match="kink it could not resolve between alpha=0.33") as record:
        ig.attribute(x, target=0, n_steps="auto", max_steps=256)
    assert "use n_steps='auto'" not in str(record[0].message)
    assert ig.convergence.not_converged == [0, 1]


def test_fixed_steps_warning_suggests_auto():
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    with pytest.warns(CompletenessWarning, match="use n_steps='auto'"):
        ci.IntegratedGradients(model).attribute(torch.randn(4, 5) * 3, target=0, n_steps=2, completeness_rtol=1e-6)


def test_auto_needs_gauss_legendre():
    with pytest.raises(ValueError, match="method: n_steps='auto' integrates .* got method 'riemann_left'"):
        ci.IntegratedGradients(mlp()).attribute(torch.randn(2, 5), target=0, n_steps="auto", method="riemann_left")
