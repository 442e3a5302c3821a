"""Integrated Gradients and completeness on CPU: ours vs Captum 0.9, side by side.

On scikit-learn's digits, with an MLP and a small CNN trained briefly:
1. the same attributions (n_steps=50, Gauss-Legendre): time for each and the largest difference;
2. completeness, per model and space (logits, probs): Captum's largest relative error
   |delta| / |F(x) - F(x')| and time at 50, 300 and 1,000 steps; ours with n_steps="auto" at rtol 1e-3
   and at each error Captum reached, with its largest error, mean evaluations per example (gradients,
   i.e. forward+backward, and forward-mode passes that place the nodes) and time. Models: a ReLU MLP,
   a CNN with one convolution and max-pooling, and a CNN with two 3x3 convolutions, ReLU and
   max-pooling whose logits are scaled by 3;
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
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


class Scaled(nn.Module):
    """logits * 3: sharper probabilities, so the path crosses them faster."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return 3 * self.net(x)


def cnn2() -> nn.Module:
    return Scaled(
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )
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


def output_change(model, x, y):
    """F(x) - F(0) of the target class, from the model itself."""
    rows = torch.arange(len(x))
    with torch.no_grad():
        return model(x)[rows, y] - model(torch.zeros_like(x))[rows, y]


def relative_error(delta, model, x, y):
    return (delta.abs() / output_change(model, x, y).abs()).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (8 examples, 1 repeat)")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    opts = parser.parse_args()
    n, repeats = (8, 1) if opts.quick else (opts.examples, opts.repeats)
    torch.manual_seed(0)
    x, y = digits()
    xs, ys = x[-n:], y[-n:]
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {n} test examples, median of {repeats}"
    )

    models = {"mlp": train(mlp(), x, y, 4), "cnn": train(cnn(), x, y, 4), "cnn2x3": train(cnn2(), x, y, 3)}
    print("\n1. Same attributions, n_steps=50, gausslegendre")
    print(f"{'model':6} {'captum s':>9} {'ours s':>9} {'ours/captum':>11} {'max |diff|':>11}")
    for name, model in models.items():
        t_ref, ref = timed(lambda: CaptumIG(model).attribute(xs, target=ys, n_steps=50), repeats)
        t_ours, ours = timed(lambda: ci.IntegratedGradients(model).attribute(xs, target=ys, n_steps=50), repeats)
        print(f"{name:6} {t_ref:9.3f} {t_ours:9.3f} {t_ours / t_ref:11.2f} {float((ours - ref).abs().max()):11.2e}")

    print("\n2. Completeness |delta| / |F(x) - F(x')| (largest over the examples): Captum at fixed steps, ours with")
    print("   n_steps='auto' at rtol 1e-3 and at the error Captum reached. evals: mean per example, gradient")
    print("   (forward+backward) + forward-mode passes; Captum's are its steps.")
    print(
        f"{'model':6} {'space':6} {'method':22} {'max rel err':>11} {'> 1e-3':>7} {'evals grad+fwd':>15} {'time s':>7}"
    )
    for name, model in models.items():
        for space in ("logits", "probs"):
            forward = ci.select_output(model, space)
            targets = [1e-3]
            for steps in (50, 300, 1000):
                seconds, (_, delta) = timed(
                    lambda: CaptumIG(forward).attribute(xs, target=ys, n_steps=steps, return_convergence_delta=True),
                    repeats,
                )
                error = relative_error(delta, forward, xs, ys)
                targets.append(float(error.max()))
                print(
                    f"{name:6} {space:6} {f'Captum {steps} steps':22} {float(error.max()):11.2e} "
                    f"{int((error > 1e-3).sum()):>3d}/{n:<3d} {steps:>15d} {seconds:7.3f}"
                )
            for rtol in targets:
                ig = ci.IntegratedGradients(forward)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    seconds, attr = timed(
                        lambda: ig.attribute(xs, target=ys, n_steps="auto", completeness_rtol=rtol), repeats
                    )
                conv = ig.convergence
                error = relative_error(attr.sum(1) - output_change(forward, xs, ys), forward, xs, ys)
                evals = (
                    f"{float(conv.n_steps.double().mean()):.0f}+{float(conv.forward_evaluations.double().mean()):.0f}"
                )
                print(
                    f"{name:6} {space:6} {f'ours auto rtol {rtol:.2g}':22} {float(error.max()):11.2e} "
                    f"{int((error > 1e-3).sum()):>3d}/{n:<3d} {evals:>15} {seconds:7.3f}"
                )

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
