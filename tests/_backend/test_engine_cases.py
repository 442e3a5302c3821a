"""The per-example gradient engine on the cases that break naive hooks or vmap, in float64.

Each case is checked against a loop of single-example autograd calls (``helpers.loop_grads``):
through ``per_example_grads`` (vmap, loop fallback), ``LayerGrads.grads`` (hooks), and the
scores of TRAK and TracInCP built from those loop gradients by their closed forms.
"""

import copy
import re
import warnings

import pytest
import torch
from helpers import (
    BatchMaxNet,
    BatchMeanNet,
    DropoutNet,
    GatedNet,
    KeywordLinear,
    LSTMNet,
    PositionNet,
    RowGate,
    TiedNet,
    TwiceNet,
    assert_grads_equal,
    assert_scores_close,
    ce_fn,
    line_of,
    loop_grads,
    modes,
    state_of,
    tracin_reference,
    trak_reference,
    user_warnings,
)
from torch.utils.data import TensorDataset

import captum_influence as ci
from captum_influence._backend import LayerGrads

N_TRAIN, N_TEST, BATCH = 12, 5, 8  # two training batches, of 8 and 4 examples
DAMPING = 0.1

# name: (model class, input maker (n) -> inputs, number of classes)
_vectors = lambda n: torch.randn(n, 4, dtype=torch.float64)
_tokens = lambda vocab, length: lambda n: torch.randint(0, vocab, (n, length))
CASES = {
    "batch_max": (BatchMaxNet, _vectors, 3),
    "batch_mean": (BatchMeanNet, _vectors, 3),
    "keyword_linear": (KeywordLinear, _vectors, 3),
    "position_ids": (PositionNet, _tokens(11, 5), 3),
    "tied_weights": (TiedNet, _tokens(7, 4), 7),
    "module_twice": (TwiceNet, _vectors, 3),
    "lstm": (LSTMNet, lambda n: torch.randn(n, 5, 3, dtype=torch.float64), 3),
    "vmap_failure": (GatedNet, _vectors, 3),
    "dropout_eval": (DropoutNet, _vectors, 3),
}
COUPLED = ["batch_max", "batch_mean"]
EXACT_ON_HOOKS = ["keyword_linear", "position_ids", "tied_weights", "module_twice", "dropout_eval"]


def build(name, seed=0):
    """``(model, train, test)``: a float64 model in eval mode and two batches ``(inputs, labels)``."""
    cls, inputs, classes = CASES[name]
    torch.manual_seed(seed)
    model = cls().double().eval()
    train = (inputs(N_TRAIN), torch.randint(0, classes, (N_TRAIN,)))
    test = (inputs(N_TEST), torch.randint(0, classes, (N_TEST,)))
    return model, train, test


# --- per-example gradients --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_grads_equal_the_loop(name):
    model, train, _ = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a vmap fallback may warn here; the numbers must be exact
        ours = ci.per_example_grads(model, ce_fn, train, chunk_size=5)
    assert_grads_equal(ours, loop_grads(model, ce_fn, train))


@pytest.mark.parametrize("name", EXACT_ON_HOOKS)
def test_hooks_are_exact_without_a_warning(name):
    model, train, _ = build(name)
    reference = loop_grads(model, ce_fn, train)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = LayerGrads(model).grads(ce_fn, train, chunk_size=5)
    assert user_warnings(record) == []
    assert_grads_equal(ours, reference)
    # Every parameter by a hook rule: refusing any fallback changes nothing.
    assert_grads_equal(LayerGrads(model, fallback="error").grads(ce_fn, train), reference)


@pytest.mark.parametrize("name", COUPLED)
def test_forward_coupling_the_batch_gives_single_example_grads_and_warns(name):
    model, train, _ = build(name)
    reference = loop_grads(model, ce_fn, train)
    # The case is real: the batched forward's gradient is not the sum of the examples' gradients.
    batched = torch.autograd.grad(ce_fn(model, *train).sum(), list(model.parameters()))
    assert max(float((b - r.sum(0)).abs().max()) for b, r in zip(batched, reference.values())) > 1e-3
    with pytest.warns(UserWarning, match="couples the examples"):
        ours = LayerGrads(model).grads(ce_fn, train)
    assert_grads_equal(ours, reference)
    with pytest.raises(ValueError, match="couples the examples"):
        LayerGrads(model, fallback="error").grads(ce_fn, train)


@pytest.mark.parametrize("engine", ["LayerGrads", "TracInCP"])
def test_coupling_that_first_appears_in_a_later_chunk_is_caught(engine):
    """Only the second chunk of 4 holds an input summing above the threshold: the first chunk is
    the same batched or alone, so a check of the first chunk alone cannot see the coupling."""
    model, (x, y), test = build("batch_max")
    x = x.clone()
    x[:4] = -x[:4].abs()
    x[5] = 1.0  # sums to 4 > threshold 1
    train = (x, y)
    if engine == "LayerGrads":
        with pytest.warns(UserWarning, match="couples the examples"):
            ours = LayerGrads(model).grads(ce_fn, train, chunk_size=4)
        assert_grads_equal(ours, loop_grads(model, ce_fn, train))
    else:
        with pytest.warns(UserWarning, match="couples the examples"):
            scores = ci.TracInCP(model, TensorDataset(*train), [state_of(model)], batch_size=4).influence(test)
        assert_scores_close(scores, tracin_reference(model, train, test))


def test_lstm_is_exact_with_a_warning_naming_it():
    model, train, _ = build("lstm")
    with pytest.warns(UserWarning) as record:
        ours = LayerGrads(model).grads(ce_fn, train)
    assert any(re.search(r"\blstm\b", message) for message in user_warnings(record)), user_warnings(record)
    assert_grads_equal(ours, loop_grads(model, ce_fn, train))


@pytest.mark.parametrize("engine", ["per_example_grads", "LayerGrads"])
def test_vmap_failure_warning_names_the_module_and_the_source_line(engine):
    """The gate's parameter has no hook rule, so both paths try vmap, which fails at ``.item()``."""
    model, train, _ = build("vmap_failure")
    line = line_of(RowGate.forward, ".item()")
    compute = {
        "per_example_grads": lambda: ci.per_example_grads(model, ce_fn, train),
        "LayerGrads": lambda: LayerGrads(model).grads(ce_fn, train),
    }[engine]
    with pytest.warns(UserWarning) as record:
        ours = compute()
    found = [
        m
        for m in user_warnings(record)
        if re.search(r"\bgate\b", m) and "helpers.py" in m and re.search(rf"\bline {line}\b", m)
    ]
    assert found, f"no warning names 'gate', helpers.py and line {line}: {user_warnings(record)}"
    assert_grads_equal(ours, loop_grads(model, ce_fn, train))


# --- dropout in training mode -----------------------------------------------------------------


def _dropout_case(mixed=False):
    model, train, test = build("dropout_eval")
    model.train()
    if mixed:  # some modules in eval, others (the dropout among them) in train
        model.fc1.eval()
    return model, train, test


def _message_names_dropout(message):
    return re.search(r"\bdrop\b", message) and "model.eval()" in message


@pytest.mark.parametrize("engine", ["per_example_grads", "LayerGrads"])
def test_dropout_in_train_mode_raises_naming_the_module(engine):
    model, train, _ = _dropout_case()
    before = modes(model)
    compute = {
        "per_example_grads": lambda: ci.per_example_grads(model, ce_fn, train),
        "LayerGrads": lambda: LayerGrads(model).grads(ce_fn, train),
    }[engine]
    with pytest.raises(ValueError) as raised:
        compute()
    assert _message_names_dropout(str(raised.value)), str(raised.value)
    assert modes(model) == before


def _method(name, model, train, state):
    data = TensorDataset(*train)
    if name == "TRAK":
        return ci.TRAK(model, data, [state], projection_dim=None, damping=DAMPING, batch_size=BATCH)
    if name == "TracInCP":
        return ci.TracInCP(model, data, [state], layers=None, batch_size=BATCH)
    return ci.TracInCPFast(model, model.fc2, data, [state], batch_size=BATCH)


@pytest.mark.parametrize("mixed", [False, True], ids=["all_train", "mixed_modes"])
@pytest.mark.parametrize("method", ["TRAK", "TracInCP", "TracInCPFast"])
def test_methods_compute_in_eval_mode_and_restore_every_flag(method, mixed):
    model, train, test = _dropout_case(mixed)
    state = state_of(model)
    before = modes(model)
    in_eval = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = _method(method, in_eval, train, state).influence(test)
        attribution = _method(method, model, train, state)
        scores = attribution.influence(test)
        assert modes(model) == before
        self_scores = attribution.self_influence()
    assert modes(model) == before
    assert_scores_close(scores, expected, 1e-6)
    assert_scores_close(self_scores, _method(method, in_eval, train, state).self_influence(), 1e-6)


@pytest.mark.parametrize("method", ["TRAK", "TracInCP", "TracInCPFast"])
def test_methods_give_back_the_callers_weights(method):
    """Checkpoints are loaded into the caller's model while scoring; its own weights come back."""
    model, train, test = build("dropout_eval")
    mine = {name: value.clone() for name, value in model.state_dict().items()}
    other = {name: value + 1.0 for name, value in mine.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attribution = _method(method, model, train, other)
        attribution.influence(test)
        attribution.self_influence()
        attribution.compute_intermediate_quantities(test)
    for name, value in model.state_dict().items():
        assert torch.equal(value, mine[name]), name


# --- TRAK and TracInCP against the loop ------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_trak_equals_the_loop_reference(name):
    model, train, test = build(name)
    reference = trak_reference(model, train, test, DAMPING)
    trak = ci.TRAK(
        model,
        TensorDataset(*train),
        [state_of(model)],
        projection_dim=None,
        damping=DAMPING,
        batch_size=BATCH,
        task="classification",
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scores = trak.influence(test)
    if name in COUPLED:
        assert any("couples the examples" in m for m in user_warnings(record)), user_warnings(record)
    assert_scores_close(scores, reference)


@pytest.mark.parametrize("name", list(CASES))
def test_tracincp_equals_the_loop_reference(name):
    model, train, test = build(name)
    reference = tracin_reference(model, train, test)
    tracin = ci.TracInCP(model, TensorDataset(*train), [state_of(model)], layers=None, batch_size=BATCH)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scores = tracin.influence(test)
    if name in COUPLED:
        assert any("couples the examples" in m for m in user_warnings(record)), user_warnings(record)
    assert_scores_close(scores, reference)
