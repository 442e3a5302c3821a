import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F
from captum.attr import DeepLift, IntegratedGradients
from helpers import tiny_bert
from torch import nn

import captum_influence as ci


class Body(nn.Module):
    """Logits g = fc2(act(fc1(x))); subclasses end in one form of softmax."""

    def __init__(self, act=nn.Tanh, classes=4):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = act()
        self.fc2 = nn.Linear(16, classes)

    def logits(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x):
        return self.logits(x)


class SoftmaxModule(Body):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.out = nn.Softmax(dim=1)

    def forward(self, x):
        return self.out(self.logits(x))


class LogSoftmaxModule(Body):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.out = nn.LogSoftmax(dim=1)

    def forward(self, x):
        return self.out(self.logits(x))


class FunctionalSoftmax(Body):
    def forward(self, x):
        return F.softmax(self.logits(x), dim=1)


class TorchSoftmax(Body):
    def forward(self, x):
        return torch.softmax(self.logits(x), 1)


class MethodSoftmax(Body):
    def forward(self, x):
        return self.logits(x).softmax(-1)


class MaxSubtracted(Body):
    def forward(self, x):
        z = self.logits(x)
        z = z - z.max(1, keepdim=True)[0]
        return F.softmax(z, 1)


class FunctionalLogSoftmax(Body):
    def forward(self, x):
        z = self.logits(x)
        return F.log_softmax(z - torch.amax(z, dim=1, keepdim=True).detach(), dim=1)


SOFTMAX_MODELS = [
    SoftmaxModule,
    LogSoftmaxModule,
    FunctionalSoftmax,
    TorchSoftmax,
    MethodSoftmax,
    MaxSubtracted,
    FunctionalLogSoftmax,
]
ALL_MODELS = [Body] + SOFTMAX_MODELS


def source_line(where):
    """The source text at a 'file:line' location."""
    path, line = where.rsplit(":", 1)
    with open(path) as f:
        return f.readlines()[int(line) - 1]


def margin64(g):
    """log(p / (1 - p)) of p = softmax(g), in float64."""
    p = torch.softmax(g.double(), 1)
    return torch.log(p / (1 - p))


@pytest.mark.parametrize("cls", ALL_MODELS, ids=lambda c: c.__name__)
def test_every_space_from_the_logits(cls):
    model = cls()
    x = torch.randn(8, 6)
    g = model.logits(x)
    logits = ci.select_output(model, "logits")(x)
    assert torch.equal(logits, g)  # exactly the values before the softmax (and its max)
    probs = ci.select_output(model, "probs")(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(8))
    torch.testing.assert_close(probs.double(), torch.softmax(g.double(), 1))
    log_probs = ci.select_output(model, "log_probs")(x)
    torch.testing.assert_close(log_probs, torch.log(probs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ci.select_output(model, "margin")(x).double(), margin64(g), atol=1e-5, rtol=1e-5)
    if cls is not Body:  # the model's own output is one of the spaces
        space = "log_probs" if "Log" in cls.__name__ else "probs"
        torch.testing.assert_close(ci.select_output(model, space)(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", SOFTMAX_MODELS, ids=lambda c: c.__name__)
def test_gradients_reach_the_inputs(cls):
    model = cls()
    x = torch.randn(5, 6, requires_grad=True)
    w = torch.randn(5, 4)
    for output, reference in (
        ("logits", lambda t: model.logits(t)),
        ("probs", lambda t: torch.softmax(model.logits(t), 1)),
    ):
        got = torch.autograd.grad((ci.select_output(model, output)(x) * w).sum(), x)[0]
        want = torch.autograd.grad((reference(x) * w).sum(), x)[0]
        torch.testing.assert_close(got, want)


def test_selected_module_shares_the_parameters():
    model = MaxSubtracted()
    selected = ci.select_output(model, "margin")
    assert {id(p) for p in selected.parameters()} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        model.fc2.bias += 1.0
    x = torch.randn(3, 6)
    torch.testing.assert_close(ci.select_output(model, "logits")(x), model.logits(x))


@pytest.mark.parametrize("cls", [SoftmaxModule, MaxSubtracted], ids=lambda c: c.__name__)
@pytest.mark.parametrize("output", ["logits", "probs"])
def test_captum_integrated_gradients_completeness_in_each_space(cls, output):
    model = cls().double()
    selected = ci.select_output(model, output)
    x, baseline = torch.randn(6, 6, dtype=torch.float64), torch.zeros(6, 6, dtype=torch.float64)
    target = torch.arange(6) % 4
    attributions, delta = IntegratedGradients(selected).attribute(
        x, baselines=baseline, target=target, n_steps=64, return_convergence_delta=True
    )
    change = (selected(x) - selected(baseline)).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(attributions.sum(1), change, atol=0, rtol=1e-6)  # Captum's delta, recomputed
    assert (delta.abs() <= 1e-6 * change.abs().clamp(min=1e-3)).all()


@pytest.mark.filterwarnings("ignore:Setting forward, backward hooks")
def test_deeplift_completeness_on_logits_of_a_max_subtracted_softmax():
    model = MaxSubtracted(act=nn.ReLU)
    x, baseline = torch.randn(6, 6, requires_grad=True), torch.zeros(6, 6)
    target = torch.arange(6) % 4
    selected = ci.select_output(model, "logits")
    attributions, delta = DeepLift(selected).attribute(
        x, baselines=baseline, target=target, return_convergence_delta=True
    )
    change = (model.logits(x) - model.logits(baseline)).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(attributions.sum(1), change, atol=1e-5, rtol=1e-5)
    assert (delta.abs() <= 1e-4 * change.abs().clamp(min=1e-2)).all()


def test_per_example_grads_through_the_selected_module_under_vmap():
    model = MaxSubtracted()
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    pick = lambda m, x, y: m(x).gather(1, y[:, None]).squeeze(1)  # noqa: E731
    got = ci.per_example_grads(ci.select_output(model, "logits"), pick, (x, y), fallback="error")
    want = ci.per_example_grads(model, lambda m, x, y: pick(m.logits, x, y), (x, y), fallback="error")
    for name, g in want.items():
        torch.testing.assert_close(got[f"model.{name}"], g)


def test_findings_for_a_max_subtracted_functional_softmax():
    findings = ci.find_output_nonlinearities(MaxSubtracted(), torch.randn(3, 6))
    assert [f.name for f in findings] == ["max", "softmax"]
    for f in findings:
        assert f.kind == "functional" and not f.hooks_can_see and f.where == f.line
        assert f.where.startswith(__file__ + ":")
    assert "z.max(1, keepdim=True)" in source_line(findings[0].where)
    softmax = findings[1]
    assert "F.softmax(z, 1)" in source_line(softmax.where)
    assert softmax.is_output and softmax.max_subtracted and softmax.dim == 1
    assert "module hooks cannot see it" in str(softmax)


@pytest.mark.parametrize("cls,name", [(SoftmaxModule, "softmax"), (LogSoftmaxModule, "log_softmax")])
def test_findings_for_a_trailing_module(cls, name):
    (finding,) = ci.find_output_nonlinearities(cls(), torch.randn(3, 6))
    assert (finding.name, finding.kind, finding.where, finding.module_type) == (
        name,
        "module",
        "out",
        cls().out.__class__.__name__,
    )
    assert finding.hooks_can_see and finding.is_output and not finding.max_subtracted
    assert "self.out(self.logits(x))" in source_line(finding.line)


@pytest.mark.parametrize("cls", [FunctionalSoftmax, TorchSoftmax, MethodSoftmax], ids=lambda c: c.__name__)
def test_findings_for_each_functional_softmax(cls):
    (finding,) = ci.find_output_nonlinearities(cls(), torch.randn(3, 6))
    assert finding.kind == "functional" and not finding.hooks_can_see and finding.is_output
    assert "softmax" in source_line(finding.where)
    assert source_line(finding.where).strip() in inspect.getsource(cls.forward)


def test_activations_before_the_last_layer_are_not_findings():
    model = Body(act=nn.ReLU)
    assert ci.find_output_nonlinearities(model, torch.randn(2, 6)) == []


class Attention(nn.Module):
    """A softmax inside the network (attention), logits at the end."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        weights = F.softmax(self.q(x) @ self.k(x).transpose(1, 2), dim=-1)
        return self.head((weights @ x).mean(1))


def test_an_inner_softmax_is_not_taken_for_the_output():
    model = Attention()
    x = torch.randn(3, 5, 4)
    assert ci.find_output_nonlinearities(model, x) == []
    assert torch.equal(ci.select_output(model, "logits")(x), model(x))
    torch.testing.assert_close(ci.select_output(model, "probs")(x), torch.softmax(model(x), 1))


class BinarySigmoid(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 1)

    def forward(self, x):
        return torch.sigmoid(self.fc(x)).squeeze(-1)


def test_a_trailing_sigmoid_gives_bernoulli_spaces():
    model = BinarySigmoid()
    x = torch.randn(5, 6)
    z = model.fc(x).squeeze(-1)
    assert torch.equal(ci.select_output(model, "logits")(x), z)  # the view after the sigmoid is replayed
    torch.testing.assert_close(ci.select_output(model, "probs")(x), model(x))
    torch.testing.assert_close(ci.select_output(model, "log_probs")(x), F.logsigmoid(z))
    p = torch.sigmoid(z.double())
    torch.testing.assert_close(ci.select_output(model, "margin")(x).double(), torch.log(p / (1 - p)))


class DictOutput(Body):
    def forward(self, x):
        return {"logits": self.logits(x), "hidden": x}


def test_logits_field_of_a_dict_output():
    model = DictOutput()
    x = torch.randn(3, 6)
    assert torch.equal(ci.select_output(model, "logits")(x), model.logits(x))


@dataclasses.dataclass
class Output:
    """A transformers-like output object: fields, not a Mapping."""

    logits: torch.Tensor
    hidden: torch.Tensor


class KeywordSoftmax(Body):
    """forward(x, scale=...) returns {"logits": softmax, ...} or Output(logits=softmax, ...)."""

    def __init__(self, wrap):
        super().__init__()
        self.wrap = wrap

    def forward(self, x, scale=1.0):
        hidden = self.act(self.fc1(x))
        return self.wrap(logits=F.softmax(scale * self.fc2(hidden), dim=1), hidden=hidden)


@pytest.mark.parametrize("wrap", [dict, Output], ids=["dict", "dataclass"])
def test_keyword_inputs_and_a_softmax_in_the_logits_field(wrap):
    model = KeywordSoftmax(wrap)
    x = torch.randn(5, 6)
    g = 2.0 * model.logits(x)
    logits = ci.select_output(model, "logits", example_inputs={"x": x, "scale": 2.0})(x=x, scale=2.0)
    assert torch.equal(logits, g)  # the values before the softmax, not the field's probabilities
    probs = ci.select_output(model, "probs", example_inputs={"x": x, "scale": 2.0})
    torch.testing.assert_close(probs(x=x, scale=2.0).double(), torch.softmax(g.double(), 1))
    torch.testing.assert_close(
        ci.select_output(model, "margin")(x, scale=2.0).double(), margin64(g), atol=1e-5, rtol=1e-5
    )
    (finding,) = ci.find_output_nonlinearities(model, x=x, scale=2.0)
    assert (finding.name, finding.kind, finding.dim, finding.is_output) == ("softmax", "functional", 1, True)
    assert "F.softmax(scale * self.fc2(hidden), dim=1)" in source_line(finding.where)


def test_bert_sequence_classifier_output_with_keyword_inputs():
    bert = tiny_bert()
    ids = torch.randint(1, 100, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1:, 5:] = 0
    kinds = torch.zeros(4, 8, dtype=torch.long)
    kinds[:, 4:] = 1
    encoding = {"input_ids": ids, "attention_mask": mask, "token_type_ids": kinds}
    with torch.no_grad():
        out = bert(**encoding)
        probs = ci.select_output(bert, "probs", example_inputs=encoding)(**encoding)
        logits = ci.select_output(bert, "logits")(**encoding)
        margin = ci.select_output(bert, "margin")(ids, mask, kinds)
    assert type(out).__name__ == "SequenceClassifierOutput"
    torch.testing.assert_close(logits, out.logits)
    torch.testing.assert_close(probs.double(), torch.softmax(out.logits.double(), 1))
    torch.testing.assert_close(margin.double(), margin64(out.logits), atol=1e-5, rtol=1e-5)
    # The classifier Linear is the last layer: nothing nonlinear follows it.
    assert ci.find_output_nonlinearities(bert, **encoding) == []
    assert ci.find_output_nonlinearities(bert, ids, attention_mask=mask) == []


class Scaled(nn.Module):
    """Logits of any |g|: forward returns scale * x."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return self.scale * x


@pytest.mark.parametrize("classes", [2, 1000])
def test_margin_head_at_extreme_logits(classes):
    g = torch.randn(4, classes)
    g[:, 0] = 1.0  # an exact top logit after scaling, far above or below the others
    g[1, 0] = -3.0
    model = Scaled(1e4)
    x = g.clone().requires_grad_(True)
    margin = ci.select_output(model, "margin")(x)
    big = (1e4 * g).double()
    rivals = big[:, None, :].masked_fill(torch.eye(classes, dtype=torch.bool), float("-inf"))  # [b, c, j != c]
    reference = big - torch.logsumexp(rivals, 2)
    assert torch.isfinite(margin).all()
    torch.testing.assert_close(margin.double(), reference, rtol=1e-6, atol=1e-2)
    grad = torch.autograd.grad(margin[:, 0].sum(), x)[0]
    assert torch.isfinite(grad).all()
    big = big.requires_grad_(True)
    want = torch.autograd.grad((big[:, 0] - torch.logsumexp(big[:, 1:], 1)).sum(), big)[0] * 1e4
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-2)


def test_unknown_output_name():
    with pytest.raises(
        ValueError, match="output: expected one of 'logits', 'probs', 'log_probs', 'margin'; got 'softmax'"
    ):
        ci.select_output(Body(), "softmax")


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module; got function"):
        ci.select_output(lambda x: x, "logits")


class ThreeD(Body):
    def forward(self, x):
        return self.logits(x).reshape(x.shape[0], 2, 2)


class OneColumn(Body):
    def __init__(self):
        super().__init__(classes=1)

    def forward(self, x):
        return self.logits(x).squeeze(1)


@pytest.mark.parametrize("cls", [ThreeD, OneColumn], ids=lambda c: c.__name__)
@pytest.mark.parametrize("output", ["probs", "margin"])
def test_outputs_that_are_not_batch_by_classes(cls, output):
    model = cls()
    x = torch.randn(3, 6)
    assert torch.equal(ci.select_output(model, "logits")(x), model(x))  # logits of any shape are fine
    with pytest.raises(ValueError, match=rf"output='{output}': the model's logits have shape \(3,"):
        ci.select_output(model, output)(x)


class ClampedSoftmax(Body):
    def forward(self, x):
        return F.softmax(self.logits(x), dim=1).clamp(min=1e-6)


class SoftmaxThenEpsilonLog(Body):
    def forward(self, x):
        probs = torch.softmax(self.logits(x), 1)
        return torch.log(1e-9 + probs * 2.0 / 2.0)


@pytest.mark.parametrize("model_class", [ClampedSoftmax, SoftmaxThenEpsilonLog])
def test_logits_before_a_softmax_changed_elementwise(model_class):
    model = model_class()
    x = torch.randn(3, 6)
    with torch.no_grad():
        logits = model.logits(x)
        torch.testing.assert_close(ci.select_output(model, "logits", example_inputs=x)(x), logits)
        torch.testing.assert_close(ci.select_output(model, "probs")(x), torch.softmax(logits, 1))
        torch.testing.assert_close(ci.select_output(model, "log_probs")(x), torch.log_softmax(logits, 1))


class MixedSoftmax(Body):
    def __init__(self):
        super().__init__()
        self.register_buffer("weights", torch.linspace(0.5, 1.5, 4))

    def forward(self, x):
        return F.softmax(self.logits(x), dim=1) * self.weights


def test_no_detectable_logits():
    model = MixedSoftmax()
    x = torch.randn(3, 6)
    line = inspect.getsourcelines(MixedSoftmax.forward)[1] + 1
    with pytest.raises(ValueError, match=rf"no detectable logits: softmax \(at {__file__}:{line}\)"):
        ci.select_output(model, "logits")(x)
    with pytest.raises(ValueError, match="no detectable logits"):  # found at construction with example inputs
        ci.select_output(model, "probs", example_inputs=x)


def test_find_output_nonlinearities_needs_inputs():
    with pytest.raises(ValueError, match="example_inputs: expected at least one input"):
        ci.find_output_nonlinearities(Body())


def test_forward_must_return_logits():
    class Pair(Body):
        def forward(self, x):
            return self.logits(x), x

    with pytest.raises(ValueError, match="model: forward returned tuple"):
        ci.select_output(Pair(), "logits")(torch.randn(2, 6))
