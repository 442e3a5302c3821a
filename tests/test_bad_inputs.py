"""Bad inputs get a clear error (or warning) that names the argument, never NaN out or a raw torch error.

Each case is a call with one bad input and the argument its message must name (and, for NaN
cases, the example indices or checkpoint at fault). Run this file as a script to count the
outcomes: tried / clear error / NaN out / silent wrong / raw error.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients as CaptumIG
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci

N_TRAIN, WIDTH, CLASSES = 20, 4, 3
BAD_TRAIN, BAD_TEST = 7, 2  # the examples made NaN


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def _data(n: int = N_TRAIN, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, WIDTH, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _nan_at(x: torch.Tensor, row: int) -> torch.Tensor:
    x = x.clone()
    x[row, 1] = float("nan")
    return x


def _train(x: Any = None, y: Any = None) -> TensorDataset:
    x0, y0 = _data()
    return TensorDataset(x0 if x is None else x, y0 if y is None else y)


def _test() -> tuple[torch.Tensor, torch.Tensor]:
    return _data(5, seed=2)


def _tracin(cls: str, model: nn.Module, train: Any, checkpoints: Any = None, **kwargs: Any):
    checkpoints = [model.state_dict()] if checkpoints is None else checkpoints
    if cls == "TracInCP":
        return ci.TracInCP(model, train, checkpoints, batch_size=8, **kwargs)
    if cls == "TracInCPFast":
        return ci.TracInCPFast(model, model[2], train, checkpoints, batch_size=8, **kwargs)
    return ci.TracInCPFastRandProj(model, model[2], train, checkpoints, batch_size=8, projection_dim=8, **kwargs)


TRACIN = ("TracInCP", "TracInCPFast", "TracInCPFastRandProj")
CALLS: dict[str, Callable[[Any, tuple], Any]] = {
    "influence": lambda m, test: m.influence(test, k=None),
    "influence_k": lambda m, test: m.influence(test, k=2),
    "self_influence": lambda m, test: m.self_influence(),
    "compute_intermediate_quantities": lambda m, test: m.compute_intermediate_quantities(test),
}


class Case(NamedTuple):
    name: str
    run: Callable[[], Any]
    names: tuple[str, ...]  # every one must appear in the message


def _nan_checkpoint(model: nn.Module) -> list[dict]:
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["0.weight"][3, 0] = float("nan")
    return [model.state_dict(), bad]


def _cases() -> list[Case]:
    cases = []
    test = _test()
    x, y = _data()
    # --- NaN in a training input, a test input, a checkpoint's weights: each TracIn class, each method
    for cls in TRACIN:
        for call, fn in CALLS.items():
            if call != "compute_intermediate_quantities":
                cases.append(
                    Case(
                        f"{cls}.{call}: NaN training input",
                        lambda cls=cls, fn=fn: fn(_tracin(cls, _model(), _train(_nan_at(x, BAD_TRAIN))), test),
                        ("train_dataset", f"[{BAD_TRAIN}]"),
                    )
                )
            if call != "self_influence":
                cases.append(
                    Case(
                        f"{cls}.{call}: NaN test input",
                        lambda cls=cls, fn=fn: fn(
                            _tracin(cls, _model(), _train()), (_nan_at(test[0], BAD_TEST), test[1])
                        ),
                        ("inputs", f"[{BAD_TEST}]"),
                    )
                )
            cases.append(
                Case(
                    f"{cls}.{call}: NaN in a checkpoint's weights",
                    lambda cls=cls, fn=fn: fn(_tracin(cls, (m := _model()), _train(), _nan_checkpoint(m)), test),
                    ("checkpoints", "checkpoint 1", "0.weight"),
                )
            )
        cases.append(
            Case(
                f"{cls}.self_influence(inputs): NaN input",
                lambda cls=cls: _tracin(cls, _model(), _train()).self_influence((_nan_at(test[0], BAD_TEST), test[1])),
                ("inputs", f"[{BAD_TEST}]"),
            )
        )
    cases += [
        Case(
            "IntegratedGradients: inf input",
            lambda: ci.IntegratedGradients(_model()).attribute(_inf_at(test[0], BAD_TEST), target=0),
            ("inputs", f"[{BAD_TEST}]"),
        ),
        Case(
            "LayerIntegratedGradients: inf input",
            lambda: ci.LayerIntegratedGradients((m := _model()), m[0]).attribute(_inf_at(test[0], BAD_TEST), target=0),
            ("inputs", f"[{BAD_TEST}]"),
        ),
        Case(
            "IntegratedGradients: NaN baseline",
            lambda: ci.IntegratedGradients(_model()).attribute(test[0], baselines=_nan_at(test[0], 0), target=0),
            ("baselines", "[0]"),
        ),
        Case(
            "RRRLoss: NaN mask",
            lambda: ci.RRRLoss(1.0)(_model(), x, y, torch.tensor([1.0, float("nan"), 0.0, 1.0])),
            ("mask",),
        ),
        Case(
            "RRRLoss: NaN input",
            lambda: ci.RRRLoss(1.0)(_model(), _nan_at(x, BAD_TRAIN), y, torch.ones(WIDTH)),
            ("inputs", f"[{BAD_TRAIN}]"),
        ),
        Case(
            "Projector.project: NaN grads",
            lambda: ci.Projector(WIDTH, 2).project(_nan_at(x, BAD_TRAIN)),
            ("grads", f"[{BAD_TRAIN}]"),
        ),
    ]
    # --- the raw errors of issue 14, each a clear one
    for cls in TRACIN:
        cases += [
            Case(
                f"{cls}: training inputs of the wrong width",
                lambda cls=cls: _tracin(cls, _model(), _train(torch.randn(N_TRAIN, WIDTH + 1))).influence(test, k=None),
                ("train_dataset", f"({N_TRAIN - 12}, {WIDTH + 1})"),
            ),
            Case(
                f"{cls}: integer training inputs",
                lambda cls=cls: _tracin(cls, _model(), _train(torch.randint(0, 5, (N_TRAIN, WIDTH)))).self_influence(),
                ("train_dataset", "int64", "float32"),
            ),
            Case(
                f"{cls}: float64 training inputs",
                lambda cls=cls: _tracin(cls, _model(), _train(x.double())).influence(test, k=None),
                ("train_dataset", "float64", "float32"),
            ),
            Case(
                f"{cls}: labels out of range in training data",
                lambda cls=cls: _tracin(cls, _model(), _train(y=torch.where(y == 0, CLASSES, y))).self_influence(),
                ("train_dataset", f"[0, {CLASSES})"),
            ),
            Case(
                f"{cls}: labels out of range in test data",
                lambda cls=cls: _tracin(cls, _model(), _train()).influence((test[0], test[1] + CLASSES), k=None),
                ("inputs", f"[0, {CLASSES})"),
            ),
            Case(
                f"{cls}: float labels with cross-entropy",
                lambda cls=cls: _tracin(cls, _model(), _train(y=y.float())).self_influence(),
                ("train_dataset", "float32", "class indices"),
            ),
            Case(
                f"{cls}: empty test batch",
                lambda cls=cls: _tracin(cls, _model(), _train()).influence((test[0][:0], test[1][:0]), k=None),
                ("inputs", "empty"),
            ),
        ]
    cases += [
        Case(
            "TracInCP: dataset items without a label",
            lambda: ci.TracInCP(_model(), TensorDataset(x), [_model().state_dict()]),
            ("train_dataset", "label"),
        ),
        Case(
            "TRAK: dataset items without a label",
            lambda: ci.TRAK(_model(), TensorDataset(x), [_model().state_dict()]),
            ("train_dataset", "label"),
        ),
        Case(
            "TRAK: empty test batch",
            lambda: ci.TRAK(_model(), _train(), [_model().state_dict()], projection_dim=None).influence(
                (test[0][:0], test[1][:0])
            ),
            ("inputs", "empty"),
        ),
        Case(
            "per_example_grads: empty batch",
            lambda: ci.per_example_grads(
                _model(), lambda m, a, b: F.cross_entropy(m(a), b, reduction="none"), (test[0][:0], test[1][:0])
            ),
            ("inputs", "empty"),
        ),
        Case(
            "RRRLoss: labels out of range",
            lambda: ci.RRRLoss(1.0)(_model(), x, torch.where(y == 0, CLASSES, y), torch.ones(WIDTH)),
            ("labels", f"[0, {CLASSES})"),
        ),
        Case(
            "TracInCP: device='tpu'",
            lambda: ci.TracInCP(_model(), _train(), [_model().state_dict()], device="tpu"),
            ("device", "tpu"),
        ),
        Case(
            "TRAK: device='tpu'",
            lambda: ci.TRAK(_model(), _train(), [_model().state_dict()], device="tpu"),
            ("device", "tpu"),
        ),
        Case(
            "check_completeness: n_steps=0",
            lambda: ci.check_completeness(CaptumIG(_model()), test[0], target=0, n_steps=0),
            ("n_steps", "0"),
        ),
        Case(
            "find_output_nonlinearities: wrong input shape",
            lambda: ci.find_output_nonlinearities(_model(), torch.randn(2, WIDTH + 3)),
            ("example_inputs", f"(2, {WIDTH + 3})"),
        ),
        Case(
            "TracInCP: projection_dim above the gradient dimension",
            lambda: ci.TracInCP(_model(), _train(), [_model().state_dict()], projection_dim=10**6).influence(test),
            ("projection_dim", "67"),
        ),
        Case("Projector(10, 50_000_000)", lambda: ci.Projector(10, 50_000_000), ("projection_dim", "10")),
    ]
    if not torch.cuda.is_available():
        cases += [
            Case(
                "TracInCP: device='cuda' without CUDA",
                lambda: ci.TracInCP(_model(), _train(), [_model().state_dict()], device="cuda"),
                ("device", "CUDA"),
            ),
            Case(
                "TRAK: device='cuda' without CUDA",
                lambda: ci.TRAK(_model(), _train(), [_model().state_dict()], device="cuda"),
                ("device", "CUDA"),
            ),
        ]
    return cases


def _inf_at(x: torch.Tensor, row: int) -> torch.Tensor:
    x = x.clone()
    x[row, 0] = float("inf")
    return x


def _tensors(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_flatten(tuple(out) if isinstance(out, tuple) else out)[0]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def outcome(case: Case) -> tuple[str, str]:
    """("clear", message) when an error or warning names every expected part; else "NaN out",
    "silent wrong" (no error, no such warning) or "raw error", with what happened."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = case.run()
        except (ValueError, TypeError) as err:
            ok = all(part in str(err) for part in case.names)
            return ("clear" if ok else "raw error"), f"{type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - counted, not hidden
            return "raw error", f"{type(err).__name__}: {err}"
    named = [str(w.message) for w in caught if all(part in str(w.message) for part in case.names)]
    if any(not bool(torch.isfinite(t).all()) for t in _tensors(out)):
        return "NaN out", "returned NaN or inf"
    if named:
        return "clear", f"warning: {named[0]}"
    return "silent wrong", "no error and no warning naming the argument"


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_message(case: Case):
    kind, message = outcome(case)
    assert kind == "clear", f"{case.name}: {kind}: {message}"


def test_nan_checkpoint_is_named_even_when_its_weight_is_unused():
    model = _model()
    bad = {k: v.clone() for k, v in model.state_dict().items()}
    bad["2.bias"][0] = float("inf")
    with pytest.raises(ValueError, match=r"checkpoints: checkpoint 0 .*2\.bias"):
        ci.TracInCPFast(model, model[2], _train(), [bad]).influence(_test())


@pytest.mark.parametrize("call", ["influence", "influence_k", "self_influence"])
def test_scores_that_overflow_are_refused(call):
    def load(model, checkpoint):
        model.load_state_dict(checkpoint)
        return 1e38  # finite gradients whose weighted products overflow float32

    model = _model()
    tracin = ci.TracInCP(model, _train(), [model.state_dict()] * 2, load)
    x, y = _data()
    with pytest.raises(ValueError, match="overflow torch.float32"):
        CALLS[call](tracin, (x[:5], y[:5]))  # training examples: their own scores are ||g||^2 * 2e38


def test_good_inputs_still_pass():
    model = _model()
    for cls in TRACIN:
        scores = _tracin(cls, model, _train()).influence(_test(), k=None)
        assert scores.shape == (5, N_TRAIN) and torch.isfinite(scores).all()


def count() -> dict[str, int]:
    counts = {"tried": 0, "clear": 0, "NaN out": 0, "silent wrong": 0, "raw error": 0}
    for case in CASES:
        kind, message = outcome(case)
        counts["tried"] += 1
        counts[kind] += 1
        if kind != "clear":
            print(f"  {kind}: {case.name}: {message[:200]}")
    return counts


if __name__ == "__main__":
    counts = count()
    print(" / ".join(f"{k} {v}" for k, v in counts.items()))


def test_a_loader_whose_collate_fn_yields_bare_tensors_is_named():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    data = TensorDataset(torch.randn(10, 4), torch.randint(0, 3, (10,)))
    loader = DataLoader(data, batch_size=4, collate_fn=lambda items: torch.stack([x for x, _ in items]))
    with pytest.raises(ValueError, match="train_dataset: its loader yields a Tensor of shape"):
        ci.TracInCP(model, loader, [model.state_dict()]).self_influence()
