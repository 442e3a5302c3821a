"""TRAK's fast paths give the numbers of the slow ones: one forward for f and Q, projection
matrices generated once per checkpoint, the check skipped only where it cannot fail, the
default batch size."""

import pytest
import torch
from helpers import classification_q
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci
from captum_influence import trak as trak_module
from captum_influence._backend import projector as projector_module
from captum_influence._backend.layer_grads import LayerGrads, exact_by_construction


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) * 2


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        states.append({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    x, y = torch.randn(200, 8), torch.randint(0, 4, (200,))
    return model, states, TensorDataset(x, y), (torch.randn(9, 8), torch.randint(0, 4, (9,)))


def test_one_forward_per_batch_gives_f_and_q(setup):
    model, states, train_set, targets = setup
    sizes = []
    handle = model.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    try:
        trak = ci.TRAK(model, train_set, states[:1], projection_dim=32, batch_size=50)
        psi = trak.compute_intermediate_quantities(targets)
    finally:
        handle.remove()
    # training batches of 50 and the 9 targets, once each (single examples: the coupling guard), and
    # the first batch once more: the task's check, once per checkpoint, that the model returns logits
    assert sorted(s for s in sizes if s > 1) == [9, 50, 50, 50, 50, 50]
    weighted = trak.compute_intermediate_quantities(targets, as_train=True)
    model.load_state_dict(states[0])
    q = classification_q(model, targets).float()
    assert torch.allclose(weighted, psi * q[:, None], rtol=1e-5, atol=1e-7)


def test_projection_generated_once_per_checkpoint_when_the_matrices_do_not_fit(setup, monkeypatch):
    model, states, train_set, targets = setup
    reference = ci.TRAK(model, train_set, states, projection_dim=64).influence(targets)
    generated = []
    generate = projector_module.projection_block
    monkeypatch.setattr(projector_module, "projection_block", lambda *a: generated.append(a[0]) or generate(*a))
    small = trak_module.Projector

    def tight(*args, **kwargs):  # room for one checkpoint's matrix, not three
        return small(*args, **{**kwargs, "cache_bytes": 212 * 64 * 4})

    monkeypatch.setattr(trak_module, "Projector", tight)
    scores = ci.TRAK(model, train_set, states, projection_dim=64).influence(targets)
    assert len(generated) == len(set(generated)) == 3  # each checkpoint's matrix made once: fit and queries
    assert torch.allclose(scores, reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))


def test_check_skipped_only_where_it_cannot_fail(setup, monkeypatch):
    model, states, train_set, targets = setup
    assert exact_by_construction(model)
    assert exact_by_construction(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten()))
    assert not exact_by_construction(nn.Sequential(Custom(), nn.ReLU()))
    assert not exact_by_construction(nn.Sequential(nn.Linear(2, 2), nn.Softmax(dim=0)))  # mixes the batch
    assert not exact_by_construction(nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train())
    checked = []
    original = LayerGrads._check_hooks
    monkeypatch.setattr(LayerGrads, "_check_hooks", lambda self, *a: checked.append(1) or original(self, *a))
    plain = ci.TRAK(model, train_set, states[:1], projection_dim=32).influence(targets)
    assert checked == []
    custom = nn.Sequential(Custom(), nn.Tanh(), nn.Linear(4, 4))
    x, y = train_set.tensors
    ci.TRAK(custom, train_set, [custom.state_dict()], projection_dim=16).influence(targets)
    assert checked == [1]
    # the same scores as with the check
    checked_scores = ci.TRAK(model, train_set, states[:1], projection_dim=32, task=_Checked()).influence(targets)
    assert torch.allclose(plain, checked_scores, rtol=1e-5, atol=1e-6 * float(plain.abs().max()))


class _Checked(ci.tasks.ClassificationOutput):
    """The same task under another type: TRAK cannot vouch for it, so the check runs."""


def test_default_batch_size_from_the_model_and_same_scores(setup):
    model, states, train_set, targets = setup
    trak = ci.TRAK(model, train_set, states[:1], projection_dim=32)
    assert trak.batch_size == 1024  # 2^24 floats / 136 parameters in the largest layer, clamped
    wide = nn.Sequential(nn.Linear(8, 4096), nn.Tanh(), nn.Linear(4096, 4))  # 36,864 -> 455 -> 256
    assert ci.TRAK(wide, train_set, [wide.state_dict()], projection_dim=32).batch_size == 256
    huge = nn.Sequential(nn.Linear(8, 2**19))  # 4.7M parameters -> 3 -> 64
    assert ci.TRAK(huge, train_set, [huge.state_dict()], projection_dim=32).batch_size == 64
    small = ci.TRAK(model, train_set, states[:1], projection_dim=32, batch_size=7).influence(targets)
    scores = trak.influence(targets)
    assert torch.allclose(small, scores, rtol=1e-5, atol=1e-6 * float(scores.abs().max()))


def test_non_finite_rows_are_found_exactly_also_where_a_row_sum_overflows():
    rows = torch.randn(6, 5)
    rows[1, 2] = float("nan")
    rows[3] = 3e38  # finite entries whose sum overflows float32
    rows[4, 0], rows[4, 1] = float("inf"), float("-inf")  # a sum of NaN
    rows[5, 4] = float("-inf")
    expected = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten()
    assert trak_module._non_finite_rows(rows).tolist() == expected.tolist() == [1, 4, 5]
    assert trak_module._non_finite_rows(torch.randn(4, 3)).tolist() == []
