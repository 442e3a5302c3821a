"""Integrated Gradients and completeness on CPU: ours vs Captum 0.9, side by side.

On scikit-learn's digits, with an MLP and a small CNN trained briefly:
1. the same attributions (n_steps=50, Gauss-Legendre): time for each and the largest difference;
2. completeness: Captum's relative error |delta| / |F(x) - F(x')| at fixed n_steps, against ours
   with n_steps="auto" (rtol 1e-3), with the steps each example needed, in logits and in probs;
3. the DeepLift scenario: relative completeness error of Captum's DeepLift on an MLP that subtracts
   torch.max and calls softmax functionally, on the same MLP ending in nn.Softmax, and on
   ci.select_output(model, "logits"), with check_completeness's verdict and suspects.

    python benchmarks/integrated_gradients.py [--quick] [--examples 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from captum.attr import DeepLift
from captum.attr import IntegratedGradients as CaptumIG
from sklearn.datasets import load_digits
from torch import nn

import captum_influence as ci


def digits():
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float32) / 16, torch.tensor(data.target)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, loss=F.cross_entropy) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


class MaxSoftmaxMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)

    def forward(self, x):
        z = self.fc2(self.relu(self.fc1(x)))
        return F.softmax(z - torch.max(z, dim=1, keepdim=True)[0], dim=1)


class SoftmaxModuleMLP(MaxSoftmaxMLP):
    def __init__(self):
        super().__init__()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        return self.softmax(self.fc2(self.relu(self.fc1(x))))


def timed(fn, repeats):
    """Median wall time of ``repeats`` calls after one warm-up call (first-call costs left out on both sides)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def relative_error(delta, model, x, y):
    rows = torch.arange(len(x))
    with torch.no_grad():
        change = model(x)[rows, y] - model(torch.zeros_like(x))[rows, y]
    return (delta.abs() / change.abs()).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (16 examples, 1 repeat)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    n, repeats = (16, 1) if opts.quick else (opts.examples, opts.repeats)
    torch.manual_seed(0)
    x, y = digits()
    xs, ys = x[-n:], y[-n:]
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {n} test examples, median of {repeats}")

    models = {"mlp": train(mlp(), x, y, 4), "cnn": train(cnn(), x, y, 4)}
    print("\n1. Same attributions, n_steps=50, gausslegendre")
    print(f"{'model':6} {'captum s':>9} {'ours s':>9} {'ours/captum':>11} {'max |diff|':>11}")
    for name, model in models.items():
        t_ref, ref = timed(lambda: CaptumIG(model).attribute(xs, target=ys, n_steps=50), repeats)
        t_ours, ours = timed(lambda: ci.IntegratedGradients(model).attribute(xs, target=ys, n_steps=50), repeats)
        print(f"{name:6} {t_ref:9.3f} {t_ours:9.3f} {t_ours / t_ref:11.2f} {float((ours - ref).abs().max()):11.2e}")

    print("\n2. Completeness |delta| / |F(x) - F(x')|: Captum at fixed steps vs ours with n_steps='auto' (rtol 1e-3)")
    print(f"{'model':6} {'space':6} {'captum@50 max':>13} {'captum@50 >1e-3':>15} {'captum@200 max':>14} "
          f"{'auto max':>9} {'auto steps mean/max':>19} {'auto s':>7}")
    for name, model in models.items():
        for space in ("logits", "probs"):
            forward = ci.select_output(model, space)
            errors = {}
            for steps in (50, 200):
                _, delta = CaptumIG(forward).attribute(xs, target=ys, n_steps=steps, return_convergence_delta=True)
                errors[steps] = relative_error(delta, forward, xs, ys)
            ig = ci.IntegratedGradients(forward)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t_auto, _ = timed(lambda: ig.attribute(xs, target=ys, n_steps="auto"), repeats)
            conv = ig.convergence
            print(f"{name:6} {space:6} {float(errors[50].max()):13.2e} {int((errors[50] > 1e-3).sum()):>10d}/{n:<4d} "
                  f"{float(errors[200].max()):14.2e} {float(conv.relative_error.max()):9.2e} "
                  f"{float(conv.n_steps.double().mean()):>12.1f}/{int(conv.n_steps.max()):<6d} {t_auto:7.3f}")

    print("\n3. DeepLift completeness on 6 digits, zero baseline (Captum 0.9)")
    print(f"{'model':42} {'max rel. error':>14}  verdict, suspects")
    scenario = {}
    for cls in (MaxSoftmaxMLP, SoftmaxModuleMLP):
        scenario[cls.__name__] = train(cls(), x, y, 3, loss=lambda p, t: F.nll_loss(torch.log(p + 1e-12), t))
    six, targets = x[:6], y[:6]
    cases = [
        ("functional softmax + torch.max", scenario["MaxSoftmaxMLP"]),
        ("nn.Softmax module", scenario["SoftmaxModuleMLP"]),
        ("select_output(functional one, 'logits')", ci.select_output(scenario["MaxSoftmaxMLP"], "logits")),
        ("select_output(nn.Softmax one, 'logits')", ci.select_output(scenario["SoftmaxModuleMLP"], "logits")),
    ]
    for label, model in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = ci.check_completeness(DeepLift(model), six, target=targets)
        verdict = "passed" if report.passed else "FAILED: " + ", ".join(s.kind for s in report.suspects)
        print(f"{label:42} {float(report.relative_error.max()):14.3g}  {verdict}")


if __name__ == "__main__":
    main()
