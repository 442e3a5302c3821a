import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import captum_influence as ci


def _cnn(dtype=torch.float64, dropout=0.0):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 5),
    ).to(dtype)


# Written independently of the module: softmax then log is fine in float64 for a reference.
_REFERENCE_TARGETS = {
    "log_probs": lambda z, y: torch.log(torch.softmax(z, 1)).sum(1),
    "true_log_prob": lambda z, y: (
        (y * torch.log(torch.softmax(z, 1))).sum(1)
        if y.is_floating_point()
        else torch.log(torch.softmax(z, 1)).gather(1, y[:, None])[:, 0]
    ),
    "logits": lambda z, y: z.sum(1),
}


def _loop_penalty(model, inputs, labels, masks, target):
    """sum_b sum_i ||mask_i * d t(x_b) / d x_i[b]||^2, one autograd call per example."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        xb = [x[b : b + 1].clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = _REFERENCE_TARGETS[target](model(*xb), labels[b : b + 1])[0]
        wrt = [x for x, m in zip(xb, masks) if m is not None]
        grads = torch.autograd.grad(out, wrt)
        used = [m for m in masks if m is not None]
        for m, g in zip(used, grads):
            m = m if m.shape[:1] != labels.shape else m[b : b + 1]
            total = total + ((m * g) ** 2).sum()
    return total


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "target,soft", [("log_probs", False), ("true_log_prob", False), ("true_log_prob", True), ("logits", False)]
)
def test_penalty_matches_per_example_loop(target, soft, reduction):
    model = _cnn().eval()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1) if soft else torch.randint(0, 5, (7,))
    mask = (torch.rand(8, 8) < 0.3).to(torch.float64) * 2.0  # broadcast over batch and channel
    loss_fn = ci.RRRLoss(l2_grads=0.7, target=target, reduction=reduction)
    loss = loss_fn(model, x, y, mask)

    penalty = _loop_penalty(model, (x,), y, (mask,), target)
    scale = 1 / 7 if reduction == "mean" else 1.0
    expected = F.cross_entropy(model(x), y, reduction=reduction) + 0.7 * scale * penalty
    assert penalty > 0
    assert torch.allclose(loss_fn.last_terms.penalty, scale * penalty, rtol=1e-6, atol=0)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)


class _TwoInputs(nn.Module):
    """An image, a vector and integer ids: the ids have no input gradient."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.vec = nn.Linear(3, 8)
        self.emb = nn.Embedding(4, 8)
        self.head = nn.Linear(2 * 6 * 6 + 8, 3)

    def forward(self, image, vector, ids):
        h = torch.tanh(self.conv(image)).flatten(1)
        v = torch.tanh(self.vec(vector) + self.emb(ids))
        return self.head(torch.cat([h, v], 1))


def test_tuple_inputs_have_a_mask_per_tensor():
    model = _TwoInputs().double()
    image = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    vector = torch.randn(5, 3, dtype=torch.float64)
    ids = torch.randint(0, 4, (5,))
    y = torch.randint(0, 3, (5,))
    masks = (torch.rand(8, 8) < 0.5, torch.rand(5, 3, dtype=torch.float64), None)
    loss_fn = ci.RRRLoss(l2_grads=1.3)
    loss = loss_fn(model, (image, vector, ids), y, masks)

    ref_masks = (masks[0].double(), masks[1], None)
    penalty = _loop_penalty(model, (image, vector, ids), y, ref_masks, "log_probs") / 5
    assert torch.allclose(loss_fn.last_terms.penalty, penalty, rtol=1e-6, atol=0)
    assert torch.allclose(loss, F.cross_entropy(model(image, vector, ids), y) + 1.3 * penalty, rtol=1e-6, atol=0)
    # Only the masked input changes the penalty.
    loss_fn(model, (image, vector, ids), y, (masks[0], None, None))
    image_only = _loop_penalty(model, (image, vector, ids), y, (ref_masks[0], None, None), "log_probs") / 5
    assert torch.allclose(loss_fn.last_terms.penalty, image_only, rtol=1e-6, atol=0)
    assert image_only < penalty


def test_parameter_gradient_matches_finite_differences():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    mask = torch.zeros(5, 5, dtype=torch.float64)
    mask[:, :3] = 1.0
    loss_fn = ci.RRRLoss(l2_grads=1000.0)
    params = list(model.parameters())
    loss_fn(model, x, y, mask).backward()
    analytic = torch.cat([p.grad.flatten() for p in params])
    assert loss_fn.last_terms.penalty * 1000.0 > 0.1 * loss_fn.last_terms.cross_entropy

    eps = 1e-6
    numeric = []
    with torch.no_grad():
        for p in params:
            flat = p.view(-1)
            for j in range(flat.numel()):
                old = flat[j].item()
                flat[j] = old + eps
                up = loss_fn(model, x, y, mask)
                flat[j] = old - eps
                down = loss_fn(model, x, y, mask)
                flat[j] = old
                numeric.append((up - down) / (2 * eps))
    numeric = torch.stack(numeric)
    assert torch.allclose(analytic, numeric, rtol=1e-6, atol=1e-8)
    # The penalty moves the gradient: the optimiser sees both terms.
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = torch.cat([p.grad.flatten() for p in params])
    assert (plain - numeric).norm() > 0.1 * numeric.norm()


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_zero_mask_is_plain_training_exactly(optimizer):
    reference = _cnn(torch.float32, dropout=0.3).train()
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 5, (16,))

    def one_step(loss_of):
        model = _cnn(torch.float32, dropout=0.3).train()
        model.load_state_dict(reference.state_dict())
        opt = optimizer(model.parameters(), lr=0.1)
        torch.manual_seed(7)  # the same dropout draws for both
        loss = loss_of(model)
        loss.backward()
        opt.step()
        return loss.detach(), [p.detach() for p in model.parameters()]

    plain_loss, plain_params = one_step(lambda m: F.cross_entropy(m(x), y))
    for mask in (torch.zeros(8, 8), torch.zeros(16, 1, 8, 8, dtype=torch.bool)):
        rrr_loss, rrr_params = one_step(lambda m: ci.RRRLoss(l2_grads=100.0)(m, x, y, mask))
        assert torch.equal(rrr_loss, plain_loss)
        assert all(torch.equal(a, b) for a, b in zip(rrr_params, plain_params))


def test_bad_inputs_raise_clear_errors():
    model = _cnn(torch.float32)
    x = torch.randn(4, 1, 8, 8)
    y = torch.randint(0, 5, (4,))
    mask = torch.ones(8, 8)
    with pytest.raises(TypeError, match="l2_grads"):
        ci.RRRLoss(l2_grads="1")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="l2_grads"):
            ci.RRRLoss(l2_grads=bad)
    with pytest.raises(ValueError, match="target.*log_probs"):
        ci.RRRLoss(l2_grads=1.0, target="probs")
    with pytest.raises(ValueError, match="reduction"):
        ci.RRRLoss(l2_grads=1.0, reduction="none")
    loss_fn = ci.RRRLoss(l2_grads=1.0)
    with pytest.raises(ValueError, match=r"mask.*\(3, 3\).*\(4, 1, 8, 8\)"):
        loss_fn(model, x, y, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"mask.*\(2, 1, 8, 8\).*\(4, 1, 8, 8\)"):
        loss_fn(model, x, y, torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="mask.*one mask per input"):
        loss_fn(model, x, y, (mask, mask))
    with pytest.raises(ValueError, match="mask.*None"):
        loss_fn(model, x, y, (None,))
    with pytest.raises(TypeError, match="mask"):
        loss_fn(model, x, y, [[1.0]])
    with pytest.raises(TypeError, match="inputs"):
        loss_fn(model, x.numpy(), y, mask)
    with pytest.raises(TypeError, match=r"inputs\[2\].*int64"):
        loss_fn(_TwoInputs(), (x, torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), y, (mask, None, mask))
    with pytest.raises(ValueError, match=r"labels.*\(4,\)"):
        loss_fn(model, x, y[:3], mask)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(model, x, y.float(), mask)
    with pytest.raises(ValueError, match=r"model.*logits.*\(4,\)"):
        loss_fn(lambda x: model(x)[:, 0], x, y, mask)
    with pytest.raises(ValueError, match="labels.*probabilities"):
        loss_fn(model, x, torch.full((4, 3), 1 / 3), mask)


def test_warns_once_on_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    x, y, mask = torch.randn(8, 6), torch.randint(0, 3, (8,)), torch.ones(6)
    loss_fn = ci.RRRLoss(l2_grads=1.0)
    with pytest.warns(UserWarning, match=r"'1'.*BatchNorm1d.*training mode"):
        loss_fn(model, x, y, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(model, x, y, mask)  # once only
        ci.RRRLoss(l2_grads=1.0)(model.eval(), x, y, mask)  # eval mode: exact, no warning


def test_warns_when_the_model_returns_probabilities():
    model = nn.Sequential(nn.Linear(6, 3), nn.Softmax(dim=1))
    with pytest.warns(UserWarning, match="probabilities.*logits"):
        ci.RRRLoss(l2_grads=1.0)(model, torch.randn(5, 6), torch.randint(0, 3, (5,)), torch.ones(6))


def test_training_removes_a_shortcut_feature():
    # Feature 0 copies the label on the training set only; features 1-4 carry it through noise
    # (Bayes accuracy about 0.94 without feature 0).
    def data(n, shortcut):
        y = torch.randint(0, 2, (n,))
        x = torch.randn(n, 5) + 0.8 * (2 * y[:, None] - 1)
        decoy = y if shortcut else torch.randint(0, 2, (n,))
        x[:, 0] = 2.0 * (2 * decoy - 1) + 0.3 * torch.randn(n)
        return x, y

    x, y = data(256, shortcut=True)
    x_test, y_test = data(512, shortcut=False)
    mask = torch.tensor([1.0, 0, 0, 0, 0])

    def test_accuracy(l2_grads):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        loss_fn = ci.RRRLoss(l2_grads=l2_grads)
        for _ in range(100):
            opt.zero_grad()
            loss_fn(model, x, y, mask).backward()
            opt.step()
        return (model(x_test).argmax(1) == y_test).float().mean().item()

    assert test_accuracy(0.0) < 0.8
    assert test_accuracy(10.0) > 0.85


def _peak_bytes(step) -> int:
    """Peak of the CPU allocator's running total (allocations minus frees) during ``step()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return peak


def test_batched_penalty_peak_memory_is_at_most_three_times_a_plain_step():
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )
    x = torch.randn(128, 1, 8, 8)
    y = torch.randint(0, 10, (128,))
    mask = torch.ones(8, 8)
    loss_fn = ci.RRRLoss(l2_grads=1.0)

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def rrr():
        model.zero_grad(set_to_none=True)
        loss_fn(model, x, y, mask).backward()

    plain(), rrr()  # warm-up: one-off allocations are not part of either step
    plain_peak, rrr_peak = _peak_bytes(plain), _peak_bytes(rrr)
    activation = 128 * 32 * 8 * 8 * 4  # one float32 output of the second convolution
    ratio = rrr_peak / plain_peak
    print(
        f"peak memory: plain step {plain_peak / 2**20:.2f} MiB, RRR step {rrr_peak / 2**20:.2f} MiB, ratio {ratio:.2f}"
    )
    assert plain_peak > 2 * activation  # the measurement sees the activations
    assert ratio <= 3.0, f"RRR step peak {rrr_peak} bytes is {ratio:.2f}x the plain step's {plain_peak}"


def test_nan_loss_from_the_model_names_the_examples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y, mask = torch.randn(5, 4), torch.randint(0, 3, (5,)), torch.ones(4)
    with torch.no_grad():
        model[0].weight[1, 0] = float("inf")  # examples with x[:, 0] != 0 get inf / NaN logits
    with pytest.raises(ValueError, match=r"model: the loss is NaN or inf for examples \[0, 1, 2, 3, 4\]"):
        ci.RRRLoss(l2_grads=1.0)(model, x, y, mask)
    loss = ci.RRRLoss(l2_grads=1.0, check_finite=False)(model, x, y, mask)
    assert not torch.isfinite(loss)
    with pytest.raises(TypeError, match="check_finite"):
        ci.RRRLoss(l2_grads=1.0, check_finite="yes")
