"""Mislabel detection on digits by TracIn self-influence: ours vs Captum 0.9, in one run.

10% of the training labels of scikit-learn's digits are flipped to another class, an MLP is
trained with SGD (a decaying learning rate) and a checkpoint is saved every few epochs with its
learning rate. Training examples are ranked by self-influence sum_c eta_c ||grad loss||^2; the
script prints, for each method, the fraction of flipped labels found in the top 10% and 20% of
the ranking, the ROC AUC (``ci.metrics.mislabel_detection_auc``) and the wall time. Methods: our
TracInCP (all parameters) and TracInCPFast (last layer, exact with its bias), Captum's TracInCP
(all parameters, sample_wise_grads_per_batch=True) and TracInCPFast (last layer, no bias term).

    python benchmarks/mislabel_detection.py            # 1,500 training examples, 6 checkpoints
    python benchmarks/mislabel_detection.py --quick    # 600 training examples, 3 checkpoints
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from captum.influence import TracInCP as CaptumTracInCP
from captum.influence import TracInCPFast as CaptumTracInCPFast
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import captum_influence as ci


def digits(n_train: int, n_test: int, seed: int = 0):
    """Standardised digits, shuffled with ``seed``: (x_train, y_train, x_test, y_test)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # constant pixels stay 0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train : n_train + n_test]
    return x[train], y[train], x[test], y[test]


def mlp(hidden: int = 64) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def train_with_checkpoints(
    model: nn.Module, x, y, directory: Path, epochs: int, every: int, lr: float = 0.1, seed: int = 0
):
    """SGD with a cosine-decaying learning rate; every ``every`` epochs saves
    ``{"state_dict", "lr"}`` to ``directory`` (the learning rate used in the epochs before it)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        used = opt.param_groups[0]["lr"]
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        schedule.step()
        if epoch % every == 0:
            torch.save({"state_dict": model.state_dict(), "lr": used}, directory / f"epoch_{epoch}.pt")
    model.eval()
    return sorted(directory.iterdir(), key=lambda p: int(p.stem.split("_")[1]))


def load_with_lr(model: nn.Module, path) -> float:
    checkpoint = torch.load(path, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    return checkpoint["lr"]


def flip_labels(y: torch.Tensor, fraction: float, seed: int = 0):
    """``y`` with ``fraction`` of its labels moved to another class, and the mask of flipped ones."""
    g = torch.Generator().manual_seed(seed)
    flipped = torch.zeros(len(y), dtype=torch.bool)
    flipped[torch.randperm(len(y), generator=g)[: int(round(fraction * len(y)))]] = True
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=g)) % 10
    return noisy, flipped


def found_in_top(self_influence: torch.Tensor, flipped: torch.Tensor, fraction: float) -> float:
    top = torch.argsort(self_influence, descending=True, stable=True)[: int(round(fraction * len(flipped)))]
    return float(flipped[top].sum()) / float(flipped.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    args = parser.parse_args()
    n_train, epochs, every = (600, 30, 10) if args.quick else (1500, 30, 5)

    torch.manual_seed(0)
    x, y, x_test, y_test = digits(n_train, 200)
    noisy, flipped = flip_labels(y, 0.10)
    model = mlp()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = train_with_checkpoints(model, x, noisy, Path(tmp), epochs, every)
        with torch.no_grad():
            train_acc = (model(x).argmax(1) == noisy).float().mean().item()
            test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(
            f"digits: {n_train} training examples, {int(flipped.sum())} labels flipped (10%); "
            f"{len(checkpoints)} checkpoints over {epochs} epochs; torch threads {torch.get_num_threads()}"
        )
        print(
            f"final model: accuracy {train_acc:.3f} on the noisy training labels, "
            f"{test_acc:.3f} on 200 clean test examples"
        )

        train = TensorDataset(x, noisy)
        sum_ce = nn.CrossEntropyLoss(reduction="sum")
        methods = {
            "ours TracInCP (all parameters)": lambda: ci.TracInCP(
                model, train, checkpoints, load_with_lr, batch_size=64
            ).self_influence(),
            "ours TracInCPFast (last layer)": lambda: ci.TracInCPFast(
                model, model[4], train, checkpoints, load_with_lr, batch_size=64
            ).self_influence(),
            "Captum TracInCP (all parameters)": lambda: CaptumTracInCP(
                model, train, checkpoints, load_with_lr, loss_fn=sum_ce, batch_size=64, sample_wise_grads_per_batch=True
            ).self_influence(DataLoader(train, batch_size=64)),
            "Captum TracInCPFast (last layer)": lambda: CaptumTracInCPFast(
                model, model[4], train, checkpoints, load_with_lr, loss_fn=sum_ce, batch_size=64
            ).self_influence(DataLoader(train, batch_size=64)),
        }
        print(f"\n{'method':<34} {'top 10%':>8} {'top 20%':>8} {'AUC':>7} {'time (s)':>9}")
        for name, run in methods.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start = time.perf_counter()
                scores = run().detach().cpu()
                elapsed = time.perf_counter() - start
            auc = ci.metrics.mislabel_detection_auc(scores, flipped)
            print(
                f"{name:<34} {found_in_top(scores, flipped, 0.1):>8.3f} {found_in_top(scores, flipped, 0.2):>8.3f} "
                f"{auc:>7.4f} {elapsed:>9.2f}"
            )
        print("(top k%: fraction of the flipped labels among the k% highest self-influence scores; chance = k%)")


if __name__ == "__main__":
    main()
