import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import DeepLift, DeepLiftShap, GradientShap, Saliency
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import LayerIntegratedGradients as CaptumLIG
from sklearn.datasets import load_digits
from torch import nn

import captum_influence as ci


class MaxSoftmaxMLP(nn.Module):
    """The reported model: logits minus their max, then a functional softmax."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        z = self.fc2(self.relu(self.fc1(x)))
        z = z - torch.max(z, dim=1, keepdim=True)[0]
        return F.softmax(z, dim=1)


class SoftmaxModuleMLP(MaxSoftmaxMLP):
    """The same network ending in an nn.Softmax module fed the logits directly."""

    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.fc2(self.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)


@pytest.fixture(scope="module")
def scenario(digits):
    x, y = digits
    models = {}
    for cls in (MaxSoftmaxMLP, SoftmaxModuleMLP):
        torch.manual_seed(0)
        model = cls()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(40):
            opt.zero_grad()
            F.nll_loss(torch.log(model(x[:600]) + 1e-12), y[:600]).backward()
            opt.step()
        models[cls.__name__] = model.eval()
    return models, x[:6], y[:6]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeepLift warns about the hooks it sets on every call
        return fn(*args, **kwargs)


def model_change(model, x, target, baselines=None):
    base = torch.zeros_like(x) if baselines is None else baselines
    with torch.no_grad():
        rows = torch.arange(len(x))
        return (model(x)[rows, target] - model(base)[rows, target]).double()


def test_deeplift_functional_softmax_and_max_fails_with_both_named(scenario):
    models, x, y = scenario
    model = models["MaxSoftmaxMLP"]
    report = quiet(ci.check_completeness, DeepLift(model), x, target=y)
    _, own_delta = quiet(DeepLift(model).attribute, x, target=y, return_convergence_delta=True)
    torch.testing.assert_close(report.delta, own_delta.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(report.output_change, model_change(model, x, y))
    print("DeepLift relative error, functional softmax + torch.max:", report.relative_error.tolist())
    assert not report.passed and report.relative_error.max() > 0.05
    kinds = {s.kind: s for s in report.suspects}
    assert set(kinds) == {"functional_nonlinearity", "max_in_forward"}
    assert "functional softmax" in kinds["functional_nonlinearity"].reason
    assert "returned by forward" in kinds["functional_nonlinearity"].reason
    assert "torch.max" in kinds["max_in_forward"].reason
    line = next(i for i, text in enumerate(inspect.getsourcelines(MaxSoftmaxMLP)[0]) if "torch.max" in text)
    assert f"test_completeness.py:{inspect.getsourcelines(MaxSoftmaxMLP)[1] + line}" in kinds["max_in_forward"].reason
    for suspect in report.suspects:
        assert "DeepLift(ci.select_output(model, 'logits'))" in suspect.fix


def test_deeplift_softmax_module_fails_as_non_elementwise(scenario):
    models, x, y = scenario
    model = models["SoftmaxModuleMLP"]
    report = quiet(ci.check_completeness, DeepLift(model), x, target=y)
    _, own_delta = quiet(DeepLift(model).attribute, x, target=y, return_convergence_delta=True)
    torch.testing.assert_close(report.delta, own_delta.double(), atol=1e-5, rtol=0)
    print("DeepLift relative error, nn.Softmax module:", report.relative_error.tolist())
    assert not report.passed and report.relative_error.max() > 0.05
    assert [s.kind for s in report.suspects] == ["nonelementwise_module"]
    assert "nn.Softmax module 'softmax'" in report.suspects[0].reason
    assert "ci.select_output(model, 'logits')" in report.suspects[0].fix


@pytest.mark.parametrize("name", ["MaxSoftmaxMLP", "SoftmaxModuleMLP"])
def test_deeplift_on_selected_logits_passes(scenario, name):
    models, x, y = scenario
    logits = ci.select_output(models[name], "logits")
    report = quiet(ci.check_completeness, DeepLift(logits), x, target=y)
    assert report.passed and report.suspects == [] and report.failing == []
    assert report.relative_error.max() < 1e-5
    with torch.no_grad():
        z = models[name].fc2(models[name].relu(models[name].fc1(x)))
        z0 = models[name].fc2(models[name].relu(models[name].fc1(torch.zeros_like(x))))
    torch.testing.assert_close(report.output_change, (z - z0)[torch.arange(6), y].double())


@pytest.mark.parametrize("space", ["logits", "probs", "log_probs"])
def test_integrated_gradients_complete_in_the_chosen_space(scenario, space):
    models, x, y = scenario
    forward = ci.select_output(models["MaxSoftmaxMLP"], space)
    report = ci.check_completeness(ci.IntegratedGradients(forward), x, target=y, rtol=1e-3, n_steps="auto")
    assert report.passed
    expected = {"logits": lambda z: z, "probs": lambda z: z.softmax(1), "log_probs": lambda z: z.log_softmax(1)}[space]
    m = models["MaxSoftmaxMLP"]
    with torch.no_grad():
        change = expected(m.fc2(m.relu(m.fc1(x)))) - expected(m.fc2(m.relu(m.fc1(torch.zeros_like(x)))))
    torch.testing.assert_close(report.output_change, change[torch.arange(6), y].double(), atol=1e-6, rtol=1e-5)


def test_too_few_steps_for_captum_integrated_gradients(scenario):
    models, x, y = scenario
    logits = ci.select_output(models["MaxSoftmaxMLP"], "logits")
    report = ci.check_completeness(CaptumIG(logits), x, target=y, n_steps=3, rtol=1e-3)
    _, own_delta = CaptumIG(logits).attribute(x, target=y, n_steps=3, return_convergence_delta=True)
    torch.testing.assert_close(report.delta, own_delta.double(), atol=1e-5, rtol=0)
    assert not report.passed
    assert [s.kind for s in report.suspects] == ["too_few_steps"]
    assert "n_steps='auto'" in report.suspects[0].fix


def test_layer_integrated_gradients_checked(scenario):
    models, x, y = scenario
    logits = ci.select_output(models["SoftmaxModuleMLP"], "logits")
    layer = models["SoftmaxModuleMLP"].fc1
    for method in (CaptumLIG(logits, layer), ci.LayerIntegratedGradients(logits, layer)):
        report = ci.check_completeness(method, x, target=y, n_steps=200, rtol=1e-2)
        _, own_delta = method.attribute(x, target=y, n_steps=200, return_convergence_delta=True)
        torch.testing.assert_close(report.delta, own_delta.double(), atol=1e-5, rtol=0)
        assert report.passed


def test_deeplift_shap_averages_over_baselines(scenario, digits):
    models, x, y = scenario
    model = ci.select_output(models["MaxSoftmaxMLP"], "logits")
    baselines = digits[0][100:104]
    report = quiet(ci.check_completeness, DeepLiftShap(model), x, target=y, baselines=baselines)
    _, pair_delta = quiet(
        DeepLiftShap(model).attribute, x, baselines=baselines, target=y, return_convergence_delta=True
    )
    # Captum's delta is per (example, baseline) pair; the attributions are their mean.
    torch.testing.assert_close(report.delta, pair_delta.reshape(6, 4).mean(1).double(), atol=1e-5, rtol=0)
    assert report.passed


def test_gradient_shap_is_complete_only_in_expectation(scenario, digits):
    models, x, y = scenario
    model = ci.select_output(models["MaxSoftmaxMLP"], "logits")
    report = ci.check_completeness(GradientShap(model), x, target=y, baselines=digits[0][100:110], n_samples=4)
    assert not report.passed and [s.kind for s in report.suspects] == ["sampling"]


class Reused(nn.Module):
    def __init__(self, functional=False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.functional = functional

    def forward(self, x):
        h = self.relu1(self.fc1(x))
        h = torch.relu(self.fc2(h)) if self.functional else self.relu2(self.fc2(h))
        return self.fc3(h)


def test_deeplift_functional_relu_inside_the_network():
    torch.manual_seed(1)
    x, base = torch.randn(16, 8), torch.randn(1, 8)
    assert quiet(ci.check_completeness, DeepLift(Reused(False).eval()), x, target=0, baselines=base).passed
    torch.manual_seed(1)
    report = quiet(ci.check_completeness, DeepLift(Reused(True).eval()), x, target=0, baselines=base)
    assert not report.passed
    assert [s.kind for s in report.suspects] == ["functional_nonlinearity"]
    assert "functional relu" in report.suspects[0].reason and "nn.ReLU()" in report.suspects[0].fix


def test_training_mode_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2)).train()
    report = ci.check_completeness(ci.IntegratedGradients(model), torch.randn(8, 8), target=1)
    assert not report.passed
    assert report.suspects[0].kind == "training_mode" and "Dropout '2'" in report.suspects[0].reason
    assert "model.eval()" in report.suspects[0].fix


def test_bad_input():
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="method: expected a Captum attribution object"):
        ci.check_completeness(model, x, target=0)
    with pytest.raises(ValueError, match="method: Saliency has no convergence delta"):
        ci.check_completeness(Saliency(model), x, target=0)
    with pytest.raises(ValueError, match="multiply_by_inputs=False"):
        ci.check_completeness(CaptumIG(model, multiply_by_inputs=False), x, target=0)
    with pytest.raises(ValueError, match="return_convergence_delta: check_completeness measures"):
        ci.check_completeness(CaptumIG(model), x, target=0, return_convergence_delta=True)
    with pytest.raises(ValueError, match="rtol: expected a float >= 0; got -1"):
        ci.check_completeness(CaptumIG(model), x, target=0, rtol=-1)
    with pytest.raises(ValueError, match=r"target: index \(3,\) for example 0 is out of range"):
        ci.check_completeness(ci.IntegratedGradients(model), x, target=3)
    with pytest.raises(ValueError, match=r"baselines: expected shapes \(m, \*example shape\)"):
        quiet(ci.check_completeness, DeepLiftShap(model), x, target=0, baselines=torch.zeros(3, 5))
