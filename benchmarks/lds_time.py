"""LDS against wall time on digits, every library in one run: which method reaches a given LDS first.

The setup of ``lds.py`` with the issue's MLP 64-128-10: 1,000 training examples, 200 targets, LDS
against 100 models retrained on random halves (``--quick``: 500, 100 and 40). Each method gets the
same ensemble (MLPs trained on the whole training set with different seeds) or, for TracIn, the
checkpoints of one training run:

  ours                TRAK with default settings, 1, 2, 4 and 8 models (nothing else varied); and our
                      EK-FAC and Arnoldi influence functions with defaults, one model (shown, not matched)
  traker 0.3.2        its defaults (proj_dim 2048, fp16) and proj_dim 128 / 256 / 512, 1 and 8 models
  dattri 0.3 TRAK     its default (proj_dim 512) and proj_dim 128 / 256, 1 and 8 models
  dattri 0.3 TracIn   its default projection (512) and 128 / 2048, 5 checkpoints
  kronfluence EK-FAC  its default damping (1e-8) and 1e-6 / 1e-4 / 1e-2 / its heuristic (None)
  Captum TracInCP     5 checkpoints (its defaults) and the last one only
  Captum Arnoldi      its default projection_dim 50 and 100

Every configuration runs once per round, rounds interleave all of them (ours next to the peers,
under the same load), and the time reported is the median over rounds. Printed: LDS, seconds, the
ratio to ours with one model, each peer's default and best, whether some ours configuration has
at least the same LDS in no more time, and a plot of LDS against time (``--plot``).

    python benchmarks/lds_time.py --cache /tmp/lds_truth.npz            # the full run
    python benchmarks/lds_time.py --quick --rounds 1 --cache /tmp/q.npz  # a few minutes
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars (read when tqdm is imported)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from lds import (
    EPOCHS,
    TRACIN_CHECKPOINTS,
    digits,
    ground_truth,
    kronfluence_task,
    margin_of,
    mlp,
    run_tracin,
    run_traker,
    train,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import captum_influence as ci

HIDDEN = 128
LR = 1e-2  # the learning rate of ``lds.train``: TracIn's checkpoint weight


@dataclass
class Config:
    library: str
    setting: str
    models: int
    run: Callable[[], torch.Tensor]
    default: bool = False
    seconds: list = field(default_factory=list)
    lds: float = float("nan")
    time: float = float("nan")  # median of ``seconds``


# --- peers -------------------------------------------------------------------------------------


def run_dattri_trak(model, states, train_set, targets, proj_dim: Optional[int]):
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    def margin(params, pair):  # dattri's TRAK target: log(p / (1 - p)) of one example
        x, y = pair
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return margin_of(logits, y.unsqueeze(0))[0]

    def probability(params, pair):
        x, y = pair
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.exp(-F.cross_entropy(logits, y.unsqueeze(0)))

    task = AttributionTask(loss_func=margin, model=model, checkpoints=list(states))
    # its default projection, passed each time: dattri updates one dict shared by its attributors
    kwargs = {"device": "cpu", "proj_seed": 0, "proj_max_batch_size": 32, "proj_dim": proj_dim or 512}
    attributor = TRAKAttributor(task=task, correct_probability_func=probability, device="cpu", projector_kwargs=kwargs)
    with torch.no_grad():
        attributor.cache(DataLoader(train_set, batch_size=100, shuffle=False))
        scores = attributor.attribute(DataLoader(TensorDataset(*targets), batch_size=100, shuffle=False))
    return _as_test_by_train(scores, len(targets[1]))


def run_dattri_tracin(model, trajectory, train_set, targets, proj_dim: Optional[int]):
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask

    def loss(params, pair):
        x, y = pair
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return F.cross_entropy(logits, y.unsqueeze(0))

    task = AttributionTask(loss_func=loss, model=model, checkpoints=list(trajectory))
    kwargs = {"device": "cpu", "proj_seed": 0, "proj_max_batch_size": 32, "proj_dim": proj_dim or 512}
    attributor = TracInAttributor(
        task=task,
        weight_list=torch.full((len(trajectory),), LR),
        normalized_grad=False,
        projector_kwargs=kwargs,
        device="cpu",
    )
    scores = attributor.attribute(
        DataLoader(train_set, batch_size=100, shuffle=False),
        DataLoader(TensorDataset(*targets), batch_size=100, shuffle=False),
    )
    return _as_test_by_train(scores, len(targets[1]))


def _as_test_by_train(scores: torch.Tensor, n_test: int) -> torch.Tensor:
    scores = torch.as_tensor(scores).float()
    return scores if scores.shape[0] == n_test else scores.T


def run_kronfluence(model, state, train_set, targets, damping: Optional[float]):
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    net = copy.deepcopy(model)
    net.load_state_dict(state)
    task = kronfluence_task()
    net = prepare_model(net.eval(), task)
    with tempfile.TemporaryDirectory() as out:
        analyzer = Analyzer("lds", net, task, cpu=True, disable_tqdm=True, output_dir=out, log_level=logging.ERROR)
        analyzer.fit_all_factors(
            "ekfac",
            train_set,
            per_device_batch_size=250,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        analyzer.compute_pairwise_scores(
            "s",
            "ekfac",
            TensorDataset(*targets),
            train_set,
            per_device_query_batch_size=len(targets[1]),
            per_device_train_batch_size=250,
            score_args=ScoreArguments(damping_factor=damping),
            overwrite_output_dir=True,
        )
        scores = analyzer.load_pairwise_scores("s")["all_modules"]
    # kronfluence scores the change of the measurement when the example is removed: a helpful
    # example has a negative score, so the sign is flipped to Captum's orientation.
    return -scores.float()


def run_captum_arnoldi(model, state, train_set, targets, projection_dim: int):
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction  # not exported in 0.9

    net = copy.deepcopy(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/model.pt"
        torch.save(state, path)

        def load(m, p):
            m.load_state_dict(torch.load(p))
            return 1.0

        def test_loss(logits, y):  # the target's output as a loss: minus its margin, one per example
            return -margin_of(logits, y)

        arnoldi = ArnoldiInfluenceFunction(
            net,
            train_set,
            path,
            load,
            loss_fn=nn.CrossEntropyLoss(reduction="none"),
            test_loss_fn=test_loss,
            batch_size=100,
            projection_dim=projection_dim,
        )
        return arnoldi.influence(targets).float()


# --- the run ----------------------------------------------------------------------------------


def configurations(model, ensemble, trajectory, train_set, targets, n_train, quick: bool) -> list[Config]:
    ours = [
        Config(
            "ours TRAK",
            "defaults",
            m,
            lambda m=m: ci.TRAK(model, train_set, ensemble[:m]).influence(targets),
            default=True,
        )
        for m in (1, 2, 4, 8)
    ]
    # our influence functions with defaults, one model: shown beside the peers, not used for matching
    ours.append(
        Config(
            "ours EK-FAC",
            "defaults",
            1,
            lambda: ci.EKFACInfluence(model, train_set, ensemble[0], task="classification").influence(targets),
            default=True,
        )
    )
    ours.append(
        Config(
            "ours Arnoldi",
            "defaults",
            1,
            lambda: ci.ArnoldiInfluenceFunction(model, train_set, ensemble[0], task="classification").influence(
                targets
            ),
            default=True,
        )
    )
    peers: list[Config] = []
    for m in (1, 8):
        peers.append(
            Config(
                "traker 0.3.2",
                "defaults (proj 2048, fp16)",
                m,
                lambda m=m: run_traker(model, ensemble[:m], n_train, train_set, targets),
                default=True,
            )
        )
        for k in (128, 256, 512):
            peers.append(
                Config(
                    "traker 0.3.2",
                    f"proj {k}, fp32",
                    m,
                    lambda m=m, k=k: run_traker(
                        model, ensemble[:m], n_train, train_set, targets, proj_dim=k, use_half_precision=False
                    ),
                )
            )
        for k in (None, 128, 256):
            peers.append(
                Config(
                    "dattri 0.3 TRAK",
                    "defaults (proj 512)" if k is None else f"proj {k}",
                    m,
                    lambda m=m, k=k: run_dattri_trak(model, ensemble[:m], train_set, targets, k),
                    default=k is None,
                )
            )
    for k in (None, 128, 2048):
        peers.append(
            Config(
                "dattri 0.3 TracIn",
                "defaults (proj 512)" if k is None else f"proj {k}",
                TRACIN_CHECKPOINTS,
                lambda k=k: run_dattri_tracin(model, trajectory, train_set, targets, k),
                default=k is None,
            )
        )
    for d in (1e-8, 1e-6, 1e-4, 1e-2, None):
        peers.append(
            Config(
                "kronfluence 1.0.1 EK-FAC",
                "defaults (damping 1e-8)" if d == 1e-8 else f"damping {'heuristic' if d is None else d}",
                1,
                lambda d=d: run_kronfluence(model, ensemble[0], train_set, targets, d),
                default=d == 1e-8,
            )
        )
    peers.append(
        Config(
            "Captum 0.9 TracInCP",
            "defaults",
            TRACIN_CHECKPOINTS,
            lambda: run_tracin(model, trajectory, train_set, targets),
            default=True,
        )
    )
    peers.append(
        Config(
            "Captum 0.9 TracInCP", "last checkpoint", 1, lambda: run_tracin(model, trajectory[-1:], train_set, targets)
        )
    )
    for k in (50, 100):
        peers.append(
            Config(
                "Captum 0.9 Arnoldi",
                "defaults (k 50)" if k == 50 else f"k {k}",
                1,
                lambda k=k: run_captum_arnoldi(model, ensemble[0], train_set, targets, k),
                default=k == 50,
            )
        )
    # ours interleaved among the peers, so that each runs under the load the peers saw
    order: list[Config] = []
    step = max(1, len(peers) // len(ours))
    for i, config in enumerate(ours):
        order += [config] + peers[i * step : (i + 1) * step]
    return order + peers[len(ours) * step :]


def measure(configs: list[Config], masks, outputs, rounds: int) -> None:
    for r in range(rounds):
        for config in configs:
            start = time.perf_counter()
            try:
                scores = config.run()
            except Exception as err:  # a peer that fails is reported, not fatal
                print(
                    f"  {config.library} {config.setting}: failed ({type(err).__name__}: {str(err)[:200]})", flush=True
                )
                config.seconds.append(float("nan"))
                continue
            config.seconds.append(time.perf_counter() - start)
            if r == 0:
                finite = bool(torch.isfinite(scores).all())
                config.lds = (
                    ci.metrics.lds(scores.numpy(), masks, outputs, on_constant="skip") if finite else float("nan")
                )
            print(
                f"  round {r + 1}: {config.library:<26} {config.models} model(s) {config.setting:<28} "
                f"LDS {config.lds:6.3f}  {config.seconds[-1]:6.1f} s",
                flush=True,
            )


def report(configs: list[Config], plot: Optional[str]) -> None:
    for c in configs:
        c.time = statistics.median(c.seconds) if c.seconds else float("nan")
    base = next(c for c in configs if c.library == "ours TRAK" and c.models == 1).time
    ours = [c for c in configs if c.library == "ours TRAK"]
    libraries = list(dict.fromkeys(c.library for c in configs))
    print("\n| method | models | setting | LDS | time (s) | time / ours 1 model |\n|---|---|---|---|---|---|")
    for lib in libraries:
        for c in sorted((c for c in configs if c.library == lib), key=lambda c: (c.models, not c.default)):
            print(f"| {c.library} | {c.models} | {c.setting} | {c.lds:.3f} | {c.time:.1f} | {c.time / base:.2f} |")
    print(
        "\neach peer: default and best of its sweep; is there an ours (defaults, only the number of models"
        " varied) with at least the same LDS in no more time?"
    )
    misses = 0
    for lib in (lib for lib in libraries if not lib.startswith("ours")):
        group = [c for c in configs if c.library == lib and np.isfinite(c.lds)]
        if not group:
            print(f"  {lib}: no result")
            continue
        best = max(group, key=lambda c: c.lds)
        default = next((c for c in group if c.default), None)
        print(
            f"  {lib}: default LDS {default.lds if default else float('nan'):.3f}; best {best.lds:.3f} "
            f"({best.models} model(s), {best.setting})"
        )
        for c in group:
            winner = min((o for o in ours if o.lds >= c.lds and o.time <= c.time), key=lambda o: o.time, default=None)
            misses += winner is None
            verdict = (
                f"yes: ours {winner.models} model(s), LDS {winner.lds:.3f} in {winner.time:.1f} s" if winner else "NO"
            )
            print(f"    {c.models} model(s) {c.setting:<28} LDS {c.lds:.3f} in {c.time:6.1f} s -> {verdict}")
    print(f"peer configurations not matched by ours: {misses}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for lib in libraries:
            group = [c for c in configs if c.library == lib and np.isfinite(c.lds)]
            ax.plot(
                [c.time for c in group],
                [c.lds for c in group],
                "o-" if lib == "ours TRAK" else ("s" if lib.startswith("ours") else "o"),
                label=lib,
                alpha=0.85,
            )
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s, median of rounds; log scale)")
        ax.set_ylabel("LDS")
        ax.set_title("digits MLP 64-128-10: LDS against time")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot written to {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 train, 100 targets, 40 subsets")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (median reported)")
    parser.add_argument("--cache", default=None, help="an .npz file keeping the retrained models' margins")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("lds_time.png")))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    n_train, n_targets, n_subsets = (500, 100, 40) if args.quick else (1000, 200, 100)
    xtr, ytr, xte, yte = digits(n_train, n_targets)
    train_set, targets = TensorDataset(xtr, ytr), (xte, yte)
    start = time.perf_counter()
    if args.cache and Path(args.cache).exists():
        saved = np.load(args.cache)
        masks, outputs = saved["masks"], saved["outputs"]
    else:
        masks, outputs = ground_truth(xtr, ytr, xte, yte, n_subsets, hidden=HIDDEN)
        if args.cache:
            np.savez(args.cache, masks=masks, outputs=outputs)
    ensemble = [
        {k: v.clone() for k, v in train(xtr, ytr, seed=s, hidden=HIDDEN).state_dict().items()} for s in range(8)
    ]
    trajectory: list = []
    every = EPOCHS // TRACIN_CHECKPOINTS
    train(
        xtr,
        ytr,
        seed=0,
        hidden=HIDDEN,
        on_epoch=lambda m, e: (e + 1) % every or trajectory.append({k: v.clone() for k, v in m.state_dict().items()}),
    )
    model = mlp(HIDDEN)
    print(
        f"digits: {n_train} training examples, {n_targets} targets, {len(masks)} models on random halves "
        f"(MLP 64-{HIDDEN}-10, {sum(p.numel() for p in model.parameters())} parameters), ready in "
        f"{time.perf_counter() - start:.0f} s; {torch.get_num_threads()} torch threads, {args.rounds} round(s)"
    )
    configs = configurations(model, ensemble, trajectory, train_set, targets, n_train, args.quick)
    measure(configs, masks, outputs, args.rounds)
    report(configs, args.plot)


if __name__ == "__main__":
    main()
