"""TRAK featurisation throughput on CPU, side by side in one run: ours, traker 0.3.2, and the
batched forward + backward of the same model and batch.

Both featurise scikit-learn's digits (1,797 examples) with the same model, batch size, projection
dimension and TRAK's classification margin. Ours is TRAK's own per-batch step (per-example
gradients from the engine's hooks projected as they are produced, and Q from the same forward),
with a dense Rademacher matrix generated once (TRAK keeps one per checkpoint) and with the
factored projection (``projection="factored"``); traker runs its FunctionalGradientComputer and
BasicProjector (its CPU path). The methods are timed interleaved, one pass of each per repeat,
median over repeats. Prints examples/s, ours / traker, and each method against the batched
forward + backward.

    python benchmarks/backend_speed.py [--proj-dim 2048] [--batch-size N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import ImageClassificationModelOutput
from trak.projectors import BasicProjector, ProjectionType
from trak.utils import vectorize

import captum_influence as ci
from captum_influence.trak import _auto_batch_size


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
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def ours(model, batches, proj_dim, projection):
    """TRAK's featurisation step for each batch, its projector made (and its matrix generated) first."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    trak = ci.TRAK(
        model,
        TensorDataset(x, y),
        [model.state_dict()],
        projection_dim=proj_dim,
        projection=projection,
        batch_size=len(batches[0][1]),
    )
    projector = trak._projector(0)
    if projection == "dense":
        projector.matrix()
    start = 0

    def run():
        nonlocal start
        for batch in batches:
            trak._grads_and_q(projector, start, batch, 0, "train_dataset")

    run()  # the engine's one-time work (the check) out of the timing
    return run


def traker(model, batches, proj_dim):
    grad_dim = sum(p.numel() for p in model.parameters())
    computer = FunctionalGradientComputer(model, ImageClassificationModelOutput(), grad_dim, torch.float32, "cpu")
    projector = BasicProjector(grad_dim, proj_dim, 0, ProjectionType.rademacher, "cpu")

    def run():
        for x, y in batches:
            grads = computer.compute_per_sample_grad((x, y))
            projector.project(vectorize(grads, device="cpu"), model_id=0)

    return run


def forward_backward(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for x, y in batches:
            torch.autograd.grad(margin(model, x, y).sum(), params)

    return run


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Floating-point operations of one forward per example (matmuls and convolutions, as torch
    counts them); a forward+backward costs about three forwards."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / len(x)


def interleaved(runs: dict, n: int, repeats: int) -> dict:
    """Examples/s of each run: one pass of each per repeat, in turn, median over repeats."""
    times: dict = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: n / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=None, help="default: TRAK's default for the model")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print(f"digits: {len(y)} examples, projection dim {args.proj_dim}, median of {args.repeats}, methods interleaved")
    print(f"{'model':<6} {'params':>8} {'ours ex/s':>10} {'traker ex/s':>12} {'ratio':>6}")
    against = []
    for name, build, shape in (("MLP", mlp, (-1, 64)), ("CNN", cnn, (-1, 1, 8, 8))):
        torch.manual_seed(0)
        model = build().eval()
        names = [n for n, _ in model.named_parameters()]
        batch = args.batch_size or _auto_batch_size(model, names)
        batches = [(x[s : s + batch].reshape(shape), y[s : s + batch]) for s in range(0, len(y), batch)]
        # Same numbers before timing: the gradients agree (projections differ only by their random matrices).
        g_ours = ci.per_example_grads(model, margin, batches[0])
        g_trak = FunctionalGradientComputer(
            model, ImageClassificationModelOutput(), 1, torch.float32, "cpu"
        ).compute_per_sample_grad(batches[0])
        assert all(torch.allclose(g_ours[k], g_trak[k], atol=1e-5) for k in g_ours)
        runs = {
            "batched fwd+bwd": forward_backward(model, batches),
            "ours dense": ours(model, batches, args.proj_dim, "dense"),
            "ours factored": ours(model, batches, args.proj_dim, "factored"),
            "traker BasicProjector": traker(model, batches, args.proj_dim),
        }
        params = sum(p.numel() for p in model.parameters())
        fwd_bwd = 3 * forward_flops(model, batches[0][0])
        dense = fwd_bwd + 2 * params * args.proj_dim  # plus a (P, k) matrix product per example
        rates = interleaved(runs, len(y), args.repeats)
        print(
            f"{name:<6} {params:>8} {rates['ours dense']:>10.0f} {rates['traker BasicProjector']:>12.0f} "
            f"{rates['ours dense'] / rates['traker BasicProjector']:>5.2f}x"
        )
        against.append((name, batch, rates, fwd_bwd, dense))
    print(
        f"\nfeaturisation (per-example gradients + projection to {args.proj_dim}) against the batched forward+backward:"
    )
    print(f"  {'model':<6} {'batch':>5} {'method':<22} {'ex/s':>10} {'vs fwd+bwd':>11}")
    for name, batch, rates, _, _ in against:
        ref = rates["batched fwd+bwd"]
        for method, rate in rates.items():
            print(f"  {name:<6} {batch:>5} {method:<22} {rate:>10.0f} {rate / ref:>11.3f}")
    print("\nthe arithmetic: a dense projection adds 2 P k FLOPs per example to the fwd+bwd's (about 3 forwards):")
    for name, _, _, fwd_bwd, dense in against:
        print(
            f"  {name:<6} fwd+bwd {fwd_bwd / 1e6:.2f} MFLOP per example, with a dense projection to {args.proj_dim}: "
            f"{dense / 1e6:.1f}; at equal FLOP rates dense featurisation reaches at most {fwd_bwd / dense:.3f} of "
            "the fwd+bwd rate"
        )


if __name__ == "__main__":
    main()
