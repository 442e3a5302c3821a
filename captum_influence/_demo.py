"""The end-to-end example on scikit-learn's digits (nothing downloaded)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ._backend import Projector, per_example_grads, topk


def _check_out_dir(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out: cannot create {out!r}: {err.strerror}") from err
    if not os.access(path, os.W_OK):
        raise ValueError(f"--out: {out!r} is not writable")
    return path


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device: unknown device {device!r}; use cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda was asked for but no GPU is available")
    return dev


def run_demo(out: str, device: str = "cpu") -> Path:
    """Train a softmax regression on digits, project per-example gradients, find proponents."""
    from sklearn.datasets import load_digits

    out_dir = _check_out_dir(out)
    dev = _check_device(device)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32, device=dev)
    y = torch.tensor(digits.target, device=dev)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x[:1500]), y[:1500]).backward()
        opt.step()
    fn = lambda m, x, y: -F.cross_entropy(m(x), y, reduction="none")
    start = time.perf_counter()
    proj = Projector({n: p.shape for n, p in model.named_parameters()}, 256, seed=0, device=dev)
    train = proj.project(per_example_grads(model, fn, (x[:1500], y[:1500]), chunk_size=500))
    test = proj.project(per_example_grads(model, fn, (x[1500:], y[1500:])))
    _, idx = topk(test, train, 5)
    seconds = time.perf_counter() - start
    same_label = (y[:1500][idx] == y[1500:, None]).float().mean().item()
    report = out_dir / "report.md"
    report.write_text(
        "# captum_influence demo\n\n"
        f"Gradient-similarity proponents for {len(test)} test digits from {len(train)} training digits "
        f"(projection 256) in {seconds:.2f} s.\n\n"
        f"Fraction of top-5 proponents sharing the test label: {same_label:.3f}\n"
    )
    return report
