"""Linear datamodeling score (LDS) on digits: ours vs traker 0.3.2 vs Captum's TracInCP, one run.

Ground truth: an MLP is retrained on many random halves S_j of the training set and each target's
margin f_t(S_j) is recorded. A method's scores tau (n_targets, n_train) predict
g_t(S_j) = sum_{i in S_j} tau[t, i]; LDS is the Spearman correlation over j of g_t and f_t,
averaged over targets (``ci.metrics.lds``). The attributed models are the same MLP trained on the
whole training set with different seeds (the ensemble). Prints LDS and wall time of each method:
ours (default settings) with 1 and 8 models, traker with its default settings and over a sweep of
proj_dim with 1 and 8 models (its best is reported), and Captum's TracInCP on checkpoints of one
training run.

    python benchmarks/lds.py            # 1,000 train, 200 targets, 100 subsets
    python benchmarks/lds.py --quick    # 500 train, 100 targets, 40 subsets (about 2 minutes)
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # traker's progress bars (read when tqdm is imported)

import numpy as np
import torch
import torch.nn.functional as F
from captum.influence import TracInCP
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset
from trak import TRAKer

import captum_influence as ci

HIDDEN = 32
EPOCHS = 60
TRACIN_CHECKPOINTS = 5


def mlp(hidden: int = HIDDEN) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def digits(n_train: int, n_targets: int):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # constant pixels stay 0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:n_train], order[n_train : n_train + n_targets]
    return x[train], y[train], x[test], y[test]


def train(x, y, seed: int, on_epoch=None, hidden: int = HIDDEN, epochs: int = EPOCHS) -> nn.Module:
    """Minibatch Adam with weight decay; ``on_epoch(model, epoch)`` sees the model after each epoch."""
    torch.manual_seed(seed)
    model = mlp(hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(model, epoch)
    return model.eval()


def margin_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin g_y - logsumexp_{j != y} g_j of each row, differentiable."""
    correct = logits.gather(1, y[:, None])[:, 0]
    return correct - logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)


def margins(model: nn.Module, x, y) -> torch.Tensor:
    with torch.no_grad():
        return margin_of(model(x), y)


def kronfluence_task():
    """kronfluence's Task for these classifiers: summed cross-entropy (labels sampled from the model
    when it asks, for its true Fisher) and the summed margin as measurement."""
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return margin_of(model(x), y).sum()

    return Classification()


def ground_truth(xtr, ytr, xte, yte, n_subsets: int, hidden: int = HIDDEN, epochs: int = EPOCHS):
    """Masks (m, n_train) of random halves and the target margins (m, n_targets) of models trained on them."""
    return retrained_on_halves(
        len(ytr),
        n_subsets,
        lambda idx, seed: margins(train(xtr[idx], ytr[idx], seed=seed, hidden=hidden, epochs=epochs), xte, yte),
    )


def retrained_on_halves(n_train: int, n_subsets: int, target_outputs):
    """LDS ground truth: masks (m, n_train) of seeded random halves S_j, and the outputs (m, n_targets)
    that ``target_outputs(indices of S_j, seed 1000 + j)`` gives for a model retrained on each."""
    rng = np.random.default_rng(1)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    rows = []
    for j in range(n_subsets):
        masks[j, rng.choice(n_train, n_train // 2, replace=False)] = True
        rows.append(np.asarray(target_outputs(torch.from_numpy(np.flatnonzero(masks[j])), 1000 + j)))
    return masks, np.stack(rows).astype(np.float64)


def run_ours(model, states, train_set, targets):
    return ci.TRAK(model, train_set, states).influence(targets)


def run_traker(model, states, n_train, train_set, targets, **kwargs):
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=n_train,
            save_dir=save_dir,
            device="cpu",
            logging_level=logging.ERROR,
            **kwargs,
        )
        xtr, ytr = train_set.tensors
        for m, state in enumerate(states):
            traker.load_checkpoint(state, model_id=m)
            for s in range(0, n_train, 100):
                traker.featurize((xtr[s : s + 100], ytr[s : s + 100]), num_samples=len(ytr[s : s + 100]))
        traker.finalize_features()
        for m, state in enumerate(states):
            traker.start_scoring_checkpoint("targets", state, model_id=m, num_targets=len(targets[1]))
            traker.score(targets, num_samples=len(targets[1]))
        return torch.tensor(np.asarray(traker.finalize_scores("targets")), dtype=torch.float32).T


def run_tracin(model, checkpoint_states, train_set, targets):
    def load(m, state):
        m.load_state_dict(state)
        return 1e-2  # the learning rate

    tracin = TracInCP(
        model,
        train_set,
        checkpoint_states,
        checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="none"),
        batch_size=100,
    )
    return tracin.influence(targets)


def evaluate(name, run, masks, outputs):
    start = time.perf_counter()
    scores = run()
    seconds = time.perf_counter() - start
    finite = bool(torch.isfinite(scores).all())
    value = ci.metrics.lds(scores.numpy(), masks, outputs, on_constant="skip") if finite else float("nan")
    print(f"{name:<44} LDS {value:6.3f}   {seconds:7.1f} s{'' if finite else '   (non-finite scores)'}", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 2 minutes)")
    args = parser.parse_args()
    n_train, n_targets, n_subsets = (500, 100, 40) if args.quick else (1000, 200, 100)
    # from 128: at 64 traker's one-block projector is freed by finalize_features and never rebuilt
    sweep = (128, 256, 512, 1024, 2048) if args.quick else (128, 256, 512, 1024, 2048, 4096)
    warnings.filterwarnings("ignore", category=UserWarning)
    xtr, ytr, xte, yte = digits(n_train, n_targets)
    train_set, targets = TensorDataset(xtr, ytr), (xte, yte)

    start = time.perf_counter()
    masks, outputs = ground_truth(xtr, ytr, xte, yte, n_subsets)
    ensemble = [{k: v.clone() for k, v in train(xtr, ytr, seed=s).state_dict().items()} for s in range(8)]
    trajectory = []
    every = EPOCHS // TRACIN_CHECKPOINTS
    train(
        xtr,
        ytr,
        seed=0,
        on_epoch=lambda m, e: (e + 1) % every or trajectory.append({k: v.clone() for k, v in m.state_dict().items()}),
    )
    model = mlp()
    params = sum(p.numel() for p in model.parameters())
    print(
        f"digits: {n_train} training examples, {n_targets} targets, {n_subsets} models on random halves "
        f"(MLP 64-{HIDDEN}-10, {params} parameters), trained in {time.perf_counter() - start:.0f} s"
    )
    print(
        f"ours 'auto' projection_dim here: {ci.TRAK(model, train_set, ensemble[:1]).projection_dim}; "
        f"{torch.get_num_threads()} torch threads"
    )

    results = {}
    for m in (1, 8):
        results[f"ours {m}"] = evaluate(
            f"ours (defaults), {m} model{'s' * (m > 1)}",
            lambda: run_ours(model, ensemble[:m], train_set, targets),
            masks,
            outputs,
        )
    results["traker default"] = evaluate(
        "traker 0.3.2 (defaults: proj_dim 2048, fp16), 8 models",
        lambda: run_traker(model, ensemble, n_train, train_set, targets),
        masks,
        outputs,
    )
    best = {}
    for m in (1, 8):
        swept = {}
        for k in sweep:
            swept[k] = evaluate(
                f"traker 0.3.2 proj_dim {k}, fp32, {m} model{'s' * (m > 1)}",
                lambda: run_traker(
                    model, ensemble[:m], n_train, train_set, targets, proj_dim=k, use_half_precision=False
                ),
                masks,
                outputs,
            )
        best[m] = max(swept, key=lambda k: np.nan_to_num(swept[k], nan=-np.inf))
        results[f"traker best {m}"] = swept[best[m]]
    results["tracin"] = evaluate(
        f"Captum TracInCP, {TRACIN_CHECKPOINTS} checkpoints of one run",
        lambda: run_tracin(model, trajectory, train_set, targets),
        masks,
        outputs,
    )
    for m in (1, 8):
        print(
            f"{m} model{'s' * (m > 1)}: traker's best over its sweep is proj_dim {best[m]}, LDS "
            f"{results[f'traker best {m}']:.3f}; ours (defaults) - traker's best: "
            f"{results[f'ours {m}'] - results[f'traker best {m}']:+.3f}"
        )


if __name__ == "__main__":
    main()
