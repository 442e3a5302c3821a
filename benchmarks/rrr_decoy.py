"""Decoy digits: does ``RRRLoss`` stop a model from learning a shortcut?

On scikit-learn's 8x8 digits (half for training, half for testing), a 2x2 patch in the top-left
corner, where the digits have no ink, gets an intensity that encodes the label on the training
set, ``decoy_scale * (1 - 0.1 * y)``, and the intensity of a wrong label (drawn uniformly among
the other nine) on the test set. The same MLP is trained three ways, with the same seeds:

- decoy-free: plain cross-entropy on the original images, tested on the original images;
- plain: plain cross-entropy on the decoy images;
- RRR: ``RRRLoss`` with the patch as the mask, on the decoy images;

and the decoy models are tested on the decoy test images. The share of input-gradient mass on
the patch, sum_patch |g| / sum |g| with g = d/dx sum_k log p_k(x) averaged over the test images,
says where each model looks (a uniform model puts 4/64 = 6.25% there).

Targets: RRR within 3 points of the decoy-free accuracy and at least 20 points above plain.

The patch is brighter than the strokes (``--decoy-scale 3``: up to three times the strongest ink).
At ink intensity (``--decoy-scale 1``) this small MLP learns the strokes first and leans on the
decoy less: plain training then keeps about 80% accuracy, and no method can gain 20 points on it.

Run: ``python benchmarks/rrr_decoy.py`` (about a minute on two CPU cores), ``--quick`` for one seed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import captum_influence as ci
from captum_influence._backend import input_grads

PATCH = (slice(0, 2), slice(0, 2))


def load_split():
    """Digits scaled to [0, 1] as (N, 8, 8) images, split in half, stratified."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 8, 8)
    y = torch.tensor(y)
    return train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)


def decoy_mask() -> torch.Tensor:
    mask = torch.zeros(8, 8)
    mask[PATCH] = 1.0
    return mask


def add_decoy(images: torch.Tensor, code_labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Paint the patch with the intensity that encodes ``code_labels``."""
    out = images.clone()
    out[:, PATCH[0], PATCH[1]] = (scale * (1.0 - 0.1 * code_labels.float()))[:, None, None]
    return out


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(x, y, loss_of, *, seed: int, epochs: int, batch_size: int = 64, lr: float = 1e-3) -> tuple[nn.Module, float]:
    """Adam on minibatches; ``loss_of(model, xb, yb)`` is the loss. Returns the model and seconds per epoch."""
    torch.manual_seed(seed)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            loss_of(model, x[idx], y[idx]).backward()
            opt.step()
    return model.eval(), (time.perf_counter() - start) / epochs


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def patch_gradient_share(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over images of sum_patch |d/dx sum_k log p_k| / sum |d/dx sum_k log p_k|."""
    (g,) = input_grads(lambda x: torch.log_softmax(model(x), 1).sum(1), (x,))
    g = g.abs()
    return ((g * mask).sum((1, 2)) / g.sum((1, 2))).mean().item()


def run_seed(seed: int, args, data) -> dict[str, float]:
    x_train, x_test, y_train, y_test = data
    gen = torch.Generator().manual_seed(seed)
    wrong = (y_test + torch.randint(1, 10, y_test.shape, generator=gen)) % 10
    decoy_train = add_decoy(x_train, y_train, args.decoy_scale)
    decoy_test = add_decoy(x_test, wrong, args.decoy_scale)
    mask = decoy_mask()
    ce = lambda model, xb, yb: F.cross_entropy(model(xb), yb)
    rrr_loss = ci.RRRLoss(l2_grads=args.l2_grads)
    rrr = lambda model, xb, yb: rrr_loss(model, xb, yb, mask)

    clean_model, _ = train(x_train, y_train, ce, seed=seed, epochs=args.epochs)
    plain_model, plain_epoch = train(decoy_train, y_train, ce, seed=seed, epochs=args.epochs)
    rrr_model, rrr_epoch = train(decoy_train, y_train, rrr, seed=seed, epochs=args.epochs)
    return {
        "decoy_free": accuracy(clean_model, x_test, y_test),
        "plain": accuracy(plain_model, decoy_test, y_test),
        "rrr": accuracy(rrr_model, decoy_test, y_test),
        "plain_share": patch_gradient_share(plain_model, decoy_test, mask),
        "rrr_share": patch_gradient_share(rrr_model, decoy_test, mask),
        "plain_epoch_s": plain_epoch,
        "rrr_epoch_s": rrr_epoch,
        "plain_train_acc": accuracy(plain_model, decoy_train, y_train),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--l2-grads", type=float, default=10.0)
    parser.add_argument("--decoy-scale", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="one seed")
    args = parser.parse_args()
    if args.quick:
        args.seeds = 1
    torch.set_num_threads(2)
    data = load_split()
    print(
        f"decoy digits: {len(data[0])} train / {len(data[1])} test images, 2x2 patch at top-left, "
        f"decoy scale {args.decoy_scale}, MLP 64-128-10, {args.epochs} epochs, l2_grads={args.l2_grads}"
    )
    header = f"{'seed':>4}  {'decoy-free':>10}  {'plain':>6}  {'RRR':>6}  {'plain patch':>11}  {'RRR patch':>9}"
    print(header)
    rows = []
    for seed in range(args.seeds):
        r = run_seed(seed, args, data)
        rows.append(r)
        print(
            f"{seed:>4}  {r['decoy_free']:>10.3f}  {r['plain']:>6.3f}  {r['rrr']:>6.3f}  "
            f"{r['plain_share']:>11.3%}  {r['rrr_share']:>9.3%}"
        )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    print(
        f"{'mean':>4}  {mean['decoy_free']:>10.3f}  {mean['plain']:>6.3f}  {mean['rrr']:>6.3f}  "
        f"{mean['plain_share']:>11.3%}  {mean['rrr_share']:>9.3%}"
    )
    print(f"plain model's accuracy on its own (decoy) training set: {mean['plain_train_acc']:.3f}")
    print(
        f"seconds per epoch: plain {mean['plain_epoch_s']:.3f}, RRR {mean['rrr_epoch_s']:.3f} "
        f"({mean['rrr_epoch_s'] / mean['plain_epoch_s']:.1f}x)"
    )
    gap_free = 100 * (mean["decoy_free"] - mean["rrr"])
    gain = 100 * (mean["rrr"] - mean["plain"])
    met_free, met_gain = gap_free <= 3.0, gain >= 20.0
    print(
        f"target 1, RRR within 3 points of decoy-free: {gap_free:+.1f} points below "
        f"-> {'met' if met_free else 'NOT met'}"
    )
    print(f"target 2, RRR >= 20 points above plain: {gain:+.1f} points -> {'met' if met_gain else 'NOT met'}")


if __name__ == "__main__":
    main()
