"""TracInCP speed on CPU: ours vs Captum 0.9's TracInCP (sample_wise_grads_per_batch=True), one run.

Both score every digits test example against every training example with the same MLP, the same
checkpoint files (each with its learning rate), the same data and batch size, exact gradients of
all parameters. Captum reloads every checkpoint for every training batch and takes dot products
of explicit gradients; ours loads each checkpoint once per pass and scores the Linear layers from
their factors, (d . d')(a . a' + 1). Prints each time (best of ``--repeats``), the ratio, and the
largest difference between the two score matrices; then the same for the top-10 proponents.

    python benchmarks/tracin_speed.py            # 1,500 train x 300 test, 5 checkpoints
    python benchmarks/tracin_speed.py --quick    # 600 train x 100 test, 3 checkpoints
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from captum.influence import TracInCP as CaptumTracInCP
from mislabel_detection import digits, load_with_lr, mlp, train_with_checkpoints
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci


def best_time(run, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    n_train, n_test, epochs, every = (600, 100, 15, 5) if args.quick else (1500, 300, 25, 5)

    torch.manual_seed(0)
    x, y, x_test, y_test = digits(n_train, n_test)
    model = mlp()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = train_with_checkpoints(model, x, y, Path(tmp), epochs, every)
        train, test = TensorDataset(x, y), (x_test, y_test)
        print(
            f"digits MLP ({n_params} parameters): {n_train} train x {n_test} test, {len(checkpoints)} checkpoint "
            f"files, batch size {args.batch_size}, torch threads {torch.get_num_threads()}, best of {args.repeats}"
        )

        def ours():
            return ci.TracInCP(model, train, checkpoints, load_with_lr, batch_size=args.batch_size)

        def captum():
            return CaptumTracInCP(
                model,
                train,
                checkpoints,
                load_with_lr,
                batch_size=args.batch_size,
                loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                sample_wise_grads_per_batch=True,
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for label, call in (
                ("influence (all scores)", lambda t: t.influence(test)),
                ("influence, k=10", lambda t: t.influence(test, k=10)),
            ):
                t_ours, r_ours = best_time(lambda: call(ours()), args.repeats)
                t_captum, r_captum = best_time(lambda: call(captum()), args.repeats)
                if isinstance(r_ours, torch.Tensor):
                    relative = float((r_ours - r_captum).abs().max() / r_captum.abs().max())
                    agree = f"max |ours - Captum| / max |Captum| = {relative:.1e}"
                else:
                    same = (r_ours.indices == r_captum.indices).float().mean()
                    agree = f"same proponent indices: {float(same):.1%}"
                print(
                    f"{label:<24} ours {t_ours:7.2f} s   Captum {t_captum:7.2f} s   "
                    f"ratio Captum / ours {t_captum / t_ours:5.1f}x   ({agree})"
                )


if __name__ == "__main__":
    main()
