"""Per-example gradient + projection throughput on CPU: ours vs traker 0.3.2, side by side.

Both featurise scikit-learn's digits (1,797 examples) with the same model, batch size, projection
dimension and TRAK's classification margin; traker runs its FunctionalGradientComputer and
BasicProjector (its CPU path). Prints examples/s for each and the ratio ours / traker.

    python benchmarks/backend_speed.py [--proj-dim 1024] [--batch-size 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import ImageClassificationModelOutput
from trak.projectors import BasicProjector, ProjectionType
from trak.utils import vectorize

import captum_influence as ci


def margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's classification output g_y - logsumexp_{j != y} g_j, one per example."""
    logits = model(x)
    correct = logits.gather(1, y[:, None])[:, 0]
    others = logits.masked_fill(torch.arange(logits.shape[1]) == y[:, None], float("-inf"))
    return correct - others.logsumexp(1)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


def ours(model, batches, proj_dim):
    names = [n for n, _ in model.named_parameters()]
    projector = ci.Projector(ci._backend.param_shapes(model, names), proj_dim, seed=0)
    return torch.cat([projector.project(ci.per_example_grads(model, margin, (x, y))) for x, y in batches])


def traker(model, batches, proj_dim):
    grad_dim = sum(p.numel() for p in model.parameters())
    computer = FunctionalGradientComputer(model, ImageClassificationModelOutput(), grad_dim, torch.float32, "cpu")
    projector = BasicProjector(grad_dim, proj_dim, 0, ProjectionType.rademacher, "cpu")
    out = []
    for x, y in batches:
        grads = computer.compute_per_sample_grad((x, y))
        out.append(projector.project(vectorize(grads, device="cpu"), model_id=0))
    return torch.cat(out)


def throughput(run, model, batches, proj_dim, repeats):
    n = sum(len(y) for _, y in batches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(model, batches, proj_dim)
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proj-dim", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"digits: {len(y)} examples, batch {args.batch_size}, projection dim {args.proj_dim}, median of {args.repeats}")
    print(f"{'model':<6} {'params':>8} {'ours ex/s':>10} {'traker ex/s':>12} {'ratio':>6}")
    for name, build, shape in (("MLP", mlp, (-1, 64)), ("CNN", cnn, (-1, 1, 8, 8))):
        torch.manual_seed(0)
        model = build().eval()
        batches = [(x[s : s + args.batch_size].reshape(shape), y[s : s + args.batch_size]) for s in range(0, len(y), args.batch_size)]
        # Same numbers before timing: the gradients agree (projections differ only by their random matrices).
        g_ours = ci.per_example_grads(model, margin, batches[0])
        g_trak = FunctionalGradientComputer(model, ImageClassificationModelOutput(), 1, torch.float32, "cpu").compute_per_sample_grad(batches[0])
        assert all(torch.allclose(g_ours[k], g_trak[k], atol=1e-5) for k in g_ours)
        rate_ours = throughput(ours, model, batches, args.proj_dim, args.repeats)
        rate_trak = throughput(traker, model, batches, args.proj_dim, args.repeats)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<6} {params:>8} {rate_ours:>10.0f} {rate_trak:>12.0f} {rate_ours / rate_trak:>5.2f}x")


if __name__ == "__main__":
    main()
