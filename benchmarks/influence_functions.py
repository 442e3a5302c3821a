"""Influence functions on digits: ours (damping "auto") against Captum, kronfluence and dattri, one run.

Ground truth as in benchmarks/lds.py: models retrained on random halves S_j of the training set,
each target's margin f_t(S_j) recorded; a method's scores tau predict sum_{i in S_j} tau[t, i],
and LDS is their Spearman correlation over the halves, averaged over the targets. Two setups:

A. digits, MLP 64-128-10: lds.py's recipe (Tanh, Adam lr 1e-2, weight decay 1e-3, 60 epochs of
   batches of 64) with 128 hidden units; 1,000 training examples, 200 targets, 100 halves. The
   attributed model is trained on the whole training set with seeds 0, 1 and 2: LDS is the mean
   (+- std) over the three, times the mean.
B. benchmarks/lds.py's own setup: the same with 32 hidden units, one attributed model (seed 0).

Each row gives the LDS of the method's defaults and its wall time (fit and scores of all targets),
and for the peers also the best LDS over a sweep of their damping or rank (chosen on the ground
truth: a reference users cannot reach) with its time. Ours run with defaults only, whose damping
is chosen from the training data (``hessian_reg="auto"`` / ``damping="auto"``). Each library is
warmed up once on a small problem first (imports and first-call costs are not timed); the two
EK-FAC rows compared for time are run ``--repeats`` times and the fastest run is reported.

Peers: Captum 0.9 (NaiveInfluenceFunction, ArnoldiInfluenceFunction), kronfluence 1.0.1 (EK-FAC
and K-FAC with sampled-label Fisher, its defaults), dattri 0.3 (IFAttributorCG, IFAttributorEKFAC).
Their damping units: kronfluence and dattri damp the Hessian of the mean loss; Captum and ours the
Hessian of the summed loss (n times larger).

    python benchmarks/influence_functions.py            # about 40 minutes on 2 CPU cores
    python benchmarks/influence_functions.py --quick    # setup A only, tiny, one seed (about 25 s, imports included)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds import digits, ground_truth, kronfluence_task, mlp, train  # noqa: E402  (benchmarks/lds.py's data, model and recipe)

import captum_influence as ci  # noqa: E402

# kronfluence and dattri are not in the dev extras (kronfluence's requirements would replace the
# installed torch build): install them to compare; without them their rows say "not installed".
HAVE = {name: importlib.util.find_spec(name) is not None for name in ("kronfluence", "dattri")}

# --- setups, training and ground truth ----------------------------------------------------------


@dataclass
class Setup:
    name: str
    hidden: int
    seeds: tuple
    n_train: int = 1000
    n_targets: int = 200
    n_subsets: int = 100
    epochs: int = 60


@dataclass
class Problem:
    """One attributed model of a setup: its state and the data."""

    hidden: int
    state: dict
    train_set: TensorDataset
    targets: tuple
    path: str  # the state saved for Captum, which loads checkpoints from files

    def model(self) -> nn.Module:
        model = mlp(self.hidden)
        model.load_state_dict(self.state)
        return model.eval()

    @property
    def n(self) -> int:
        return len(self.train_set)


# --- ours -----------------------------------------------------------------------------------------

CE = nn.CrossEntropyLoss(reduction="none")


def ours_naive(p: Problem):
    return ci.NaiveInfluenceFunction(p.model(), p.train_set, p.state, loss_fn=CE, batch_size=250).influence(p.targets)


def ours_arnoldi(p: Problem):
    return ci.ArnoldiInfluenceFunction(p.model(), p.train_set, p.state, loss_fn=CE, batch_size=250).influence(p.targets)


def ours_ekfac(p: Problem):
    return ci.EKFACInfluence(p.model(), p.train_set, p.state, loss_fn=CE, batch_size=250).influence(p.targets)


def ours_trak(p: Problem):
    return ci.TRAK(p.model(), p.train_set, [p.state]).influence(p.targets)


def exact_damped(p: Problem, damping: float):
    """The exact influence function grad L_test^T (H + damping I)^{-1} grad L with H the Hessian of
    the mean training loss (dattri's and kronfluence's units), by a dense solve."""
    naive = ci.NaiveInfluenceFunction(p.model(), p.train_set, p.state, loss_fn=CE, batch_size=250)
    hessian = naive.hessian() / p.n
    model = p.model()
    fn = lambda m, x, y: F.cross_entropy(m(x), y, reduction="none")  # noqa: E731
    grads = lambda x, y: torch.cat([g.reshape(len(y), -1) for g in ci.per_example_grads(model, fn, (x, y)).values()], 1)  # noqa: E731
    g_train, g_test = grads(*p.train_set.tensors).double(), grads(*p.targets).double()
    solved = torch.linalg.solve(hessian + damping * torch.eye(len(hessian), dtype=torch.float64), g_train.T)
    return (g_test @ solved / p.n).float()


# --- peers ---------------------------------------------------------------------------------------


def _quiet():
    """Peers print progress bars and warnings; keep the table readable."""
    return contextlib.redirect_stderr(io.StringIO())


def captum_scores(p: Problem, method: str, **kwargs):
    """Captum's ``NaiveInfluenceFunction`` or ``ArnoldiInfluenceFunction`` (``method``), the whole
    training set as one batch: their scores of the targets."""
    from captum.influence import NaiveInfluenceFunction
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction  # not exported in 0.9

    cls = {"naive": NaiveInfluenceFunction, "arnoldi": ArnoldiInfluenceFunction}[method]
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        influence = cls(p.model().requires_grad_(True), p.train_set, p.path, loss_fn=CE, batch_size=p.n, **kwargs)
        return influence.influence(p.targets)


def kronfluence_runs(p: Problem, strategy: str, dampings: list) -> dict:
    """{damping: (scores, seconds)}: the factors are fitted once; each damping's time is the fit's
    plus its own scoring. Its task: summed cross-entropy (labels sampled from the model for the
    true Fisher when asked), the margin as measurement (scores negated: positive helps)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    out = {}
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as directory, _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        task = kronfluence_task()
        model = prepare_model(p.model(), task)
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=directory)
        analyzer.fit_all_factors(
            "factors",
            p.train_set,
            per_device_batch_size=250,
            factor_args=FactorArguments(strategy=strategy),
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter() - start
        for damping in dampings:
            start = time.perf_counter()
            analyzer.compute_pairwise_scores(
                "scores",
                "factors",
                TensorDataset(*p.targets),
                p.train_set,
                per_device_query_batch_size=len(p.targets[1]),
                per_device_train_batch_size=250,
                score_args=ScoreArguments(damping_factor=damping),
                overwrite_output_dir=True,
            )
            scores = -analyzer.load_pairwise_scores("scores")["all_modules"]
            out[damping] = (scores, fitted + time.perf_counter() - start)
    logging.disable(logging.NOTSET)
    return out


def _dattri_task(p: Problem):
    from dattri.task import AttributionTask

    model = p.model()

    def loss(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return AttributionTask(loss_func=loss, model=model, checkpoints=p.state)


def dattri_cg(p: Problem, regularization: float):
    """dattri's CG (its default 10 iterations) on the mean loss of the whole training set as one batch."""
    from dattri.algorithm.influence_function import IFAttributorCG

    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attributor = IFAttributorCG(_dattri_task(p), regularization=regularization)
        attributor.cache(DataLoader(p.train_set, batch_size=p.n))
        return attributor.attribute(
            DataLoader(p.train_set, batch_size=250), DataLoader(TensorDataset(*p.targets), batch_size=len(p.targets[1]))
        ).T.detach()


def dattri_ekfac_runs(p: Problem, dampings: list) -> dict:
    """{damping: (scores, seconds)}: dattri's EK-FAC (empirical Fisher of the mean loss), the factors
    cached once."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    out = {}
    with _quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        attributor = IFAttributorEKFAC(_dattri_task(p), damping=dampings[0])
        attributor.cache(DataLoader(p.train_set, batch_size=250))
        fitted = time.perf_counter() - start
        for damping in dampings:
            start = time.perf_counter()
            attributor.damping = damping
            scores = attributor.attribute(
                DataLoader(p.train_set, batch_size=250),
                DataLoader(TensorDataset(*p.targets), batch_size=len(p.targets[1])),
            )
            out[damping] = (scores.T.detach(), fitted + time.perf_counter() - start)
    return out


# --- rows ----------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    default: Any = None  # the default setting's label
    lds: dict = field(default_factory=dict)  # setting -> [LDS per seed]
    seconds: dict = field(default_factory=dict)  # setting -> [seconds per seed]

    def add(self, setting, value: float, seconds: float) -> None:
        self.lds.setdefault(setting, []).append(value)
        self.seconds.setdefault(setting, []).append(seconds)

    def mean(self, setting) -> float:
        return float(np.mean(self.lds[setting]))

    def best(self):
        return max(self.lds, key=lambda s: np.nan_to_num(self.mean(s), nan=-np.inf))

    def text(self, setting) -> str:
        values = self.lds[setting]
        if not np.isfinite(values).all():
            return "non-finite scores"
        spread = f" +- {np.std(values):.3f}" if len(values) > 1 else ""
        return f"{np.mean(values):.3f}{spread}"


def lds_of(scores, masks, outputs) -> float:
    scores = torch.as_tensor(scores).detach().double()
    if not bool(torch.isfinite(scores).all()):
        return float("nan")
    return ci.metrics.lds(scores.numpy(), masks, outputs, on_constant="skip")


def timed(run: Callable[[], Any], repeats: int = 1) -> tuple[Any, float]:
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return result, best


def label(setting) -> str:
    if setting is None:
        return "heuristic"
    if isinstance(setting, float):
        return f"{setting:g}"
    return str(setting)


def print_table(setup: Setup, rows: list) -> None:
    print(f"\n{'method':<52} {'default LDS':>16} {'time':>8}   {'best LDS over its sweep':>30} {'time':>8}")
    for row in rows:
        default = row.default
        if not row.lds:
            missing = next((name for name in HAVE if not HAVE[name] and name in row.name), None)
            print(f"{row.name:<52} {'(not installed)' if missing else '(not run)':>16}")
            continue
        if default not in row.lds:
            cells = f"{row.name:<52} {'-':>16} {'':>8}"
        else:
            cells = f"{row.name:<52} {row.text(default):>16} {np.mean(row.seconds[default]):7.1f}s"
        if len(row.lds) > 1:
            best = row.best()
            cells += f"   {row.text(best) + ' (' + label(best) + ')':>30} {np.mean(row.seconds[best]):7.1f}s"
        print(cells, flush=True)


def run_setup(setup: Setup, args, sweeps: dict) -> dict:
    xtr, ytr, xte, yte = digits(setup.n_train, setup.n_targets)
    start = time.perf_counter()
    masks, outputs = ground_truth(xtr, ytr, xte, yte, setup.n_subsets, hidden=setup.hidden, epochs=setup.epochs)
    states = [
        {k: v.clone() for k, v in train(xtr, ytr, s, hidden=setup.hidden, epochs=setup.epochs).state_dict().items()}
        for s in setup.seeds
    ]
    params = sum(p.numel() for p in mlp(setup.hidden).parameters())
    print(
        f"\n== {setup.name}: {setup.n_train} training examples, {setup.n_targets} targets, {setup.n_subsets} "
        f"retrained halves, MLP 64-{setup.hidden}-10 ({params} parameters), seeds {list(setup.seeds)}; "
        f"trained in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    rows = {
        "trak": Row("ours TRAK (defaults, 1 model)"),
        "naive": Row("ours NaiveInfluenceFunction (defaults)"),
        "arnoldi": Row("ours ArnoldiInfluenceFunction (defaults)"),
        "ekfac": Row("ours EKFACInfluence (defaults)"),
        "exact": Row("exact Hessian, damping 0.01 (mean-loss units)"),
        "captum naive": Row("Captum NaiveInfluenceFunction (defaults, k 50)", default=50),
        "captum arnoldi": Row("Captum ArnoldiInfluenceFunction (k = projection_dim)", default=50),
        "kron ekfac": Row("kronfluence EK-FAC (damping_factor)", default=1e-8),
        "kron kfac": Row("kronfluence K-FAC (damping_factor)", default=1e-8),
        "kron ekfac 1": Row("kronfluence EK-FAC, torch.set_num_threads(1)", default=1e-8),
        "dattri cg": Row("dattri IFAttributorCG (regularization)", default=0.0),
        "dattri ekfac": Row("dattri IFAttributorEKFAC (damping)", default=0.0),
    }
    skip_exact = args.no_exact and setup.hidden > 64
    with tempfile.TemporaryDirectory() as directory:
        for seed, state in zip(setup.seeds, states):
            path = os.path.join(directory, f"model_{seed}.pt")
            torch.save(state, path)
            p = Problem(setup.hidden, state, TensorDataset(xtr, ytr), (xte, yte), path)

            def measure(key, run, setting=None, repeats=1):
                scores, seconds = timed(run, repeats)
                rows[key].add(setting, lds_of(scores, masks, outputs), seconds)
                if args.verbose:
                    print(
                        f"      {rows[key].name} [{label(setting)}]: {rows[key].lds[setting][-1]:.3f} {seconds:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )

            measure("trak", lambda: ours_trak(p))
            measure("ekfac", lambda: ours_ekfac(p), repeats=args.repeats)
            measure("arnoldi", lambda: ours_arnoldi(p))
            if not skip_exact:
                measure("naive", lambda: ours_naive(p))
                measure("exact", lambda: exact_damped(p, 0.01))
            if setup.hidden <= 64 and not args.quick:  # Captum's explicit Hessian: 2,410 parameters, not 9,610
                measure("captum naive", lambda: captum_scores(p, "naive"), setting=50)
            for k in sweeps["captum_k"]:
                settings = {"projection_dim": k, "arnoldi_dim": sweeps["arnoldi_dim"]}
                measure("captum arnoldi", lambda: captum_scores(p, "arnoldi", **settings), k)
            for strategy, key in (("ekfac", "kron ekfac"), ("kfac", "kron kfac")) if HAVE["kronfluence"] else ():
                repeats = args.repeats if strategy == "ekfac" else 1
                best_runs = None
                for _ in range(repeats):  # the fastest of the repeats, as for ours
                    runs = kronfluence_runs(p, strategy, sweeps["kronfluence"])
                    if best_runs is None or runs[1e-8][1] < best_runs[1e-8][1]:
                        best_runs = runs
                for damping, (scores, seconds) in best_runs.items():
                    rows[key].add(damping, lds_of(scores, masks, outputs), seconds)
            if HAVE["kronfluence"]:
                # LAPACK's threaded eigh is very slow on small matrices here (see symmetric_eigh); ours
                # runs it on one thread, kronfluence does not: its default EK-FAC on one thread too.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    runs = min(
                        (kronfluence_runs(p, "ekfac", [1e-8]) for _ in range(args.repeats)), key=lambda r: r[1e-8][1]
                    )
                finally:
                    torch.set_num_threads(threads)
                rows["kron ekfac 1"].add(1e-8, lds_of(runs[1e-8][0], masks, outputs), runs[1e-8][1])
            if HAVE["dattri"]:
                for reg in sweeps["dattri_cg"]:
                    measure("dattri cg", lambda: dattri_cg(p, reg), reg)
                for damping, (scores, seconds) in dattri_ekfac_runs(p, sweeps["dattri_ekfac"]).items():
                    rows["dattri ekfac"].add(damping, lds_of(scores, masks, outputs), seconds)
            print(
                f"   seed {seed}: ours EK-FAC {rows['ekfac'].lds[None][-1]:.3f}, "
                f"Arnoldi {rows['arnoldi'].lds[None][-1]:.3f}, TRAK {rows['trak'].lds[None][-1]:.3f}",
                flush=True,
            )
    print_table(setup, list(rows.values()))
    return rows


def summary(a: dict, b: dict, quick: bool) -> None:
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print("\n== targets (defaults, damping chosen from the training data; LDS means over the seeds)")
    ours, kron = a["ekfac"], a["kron ekfac"]
    value = ours.mean(None)
    print(f"A: ours EK-FAC {value:.3f} >= 0.56: {verdict(value >= 0.56)}")
    for what, keys in (
        ("Kronecker-factored ", ("kron ekfac", "kron kfac", "dattri ekfac")),
        ("", ("kron ekfac", "kron kfac", "captum arnoldi", "dattri cg", "dattri ekfac")),
    ):
        peers = [a[k] for k in keys if a[k].lds]
        if not peers:
            continue
        best_peer = max(peers, key=lambda r: r.mean(r.best()))
        best = best_peer.mean(best_peer.best())
        print(
            f"A: ours EK-FAC {value:.3f} >= the best tuned {what}peer here ({best_peer.name} at "
            f"{label(best_peer.best())}, {best:.3f}): {verdict(value >= best)}"
        )
    ours_time = np.mean(ours.seconds[None])
    for row in (kron, a["kron ekfac 1"]) if kron.lds else ():
        kron_time = np.mean(row.seconds[1e-8])
        print(
            f"A: ours EK-FAC time {ours_time:.1f} s <= {row.name}: {kron_time:.1f} s: {verdict(ours_time <= kron_time)}"
        )
    captum_best = a["captum arnoldi"].mean(a["captum arnoldi"].best())
    value = a["arnoldi"].mean(None)
    print(
        f"A: ours Arnoldi {value:.3f} >= Captum Arnoldi's best {captum_best:.3f} (and >= 0.50): "
        f"{verdict(value >= captum_best and value >= 0.50)}"
    )
    for key in ("naive", "arnoldi"):
        if b is not None and b[key].lds:
            value = b[key].mean(None)
            print(f"B: ours {key.capitalize()} {value:.3f} >= 0.65: {verdict(value >= 0.65)}")
    if quick:
        print("(--quick: small sizes, the targets are for the full run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="setup A only at tiny sizes, one seed, short sweeps: every row runs (for the tests)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="attributed models of setup A (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the EK-FAC rows, the fastest kept")
    parser.add_argument(
        "--no-exact", action="store_true", help="skip the explicit-Hessian rows of setup A (minutes each)"
    )
    parser.add_argument("--verbose", action="store_true", help="each run's LDS and time on stderr as it finishes")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.quick:
        a = Setup("A (quick)", hidden=12, seeds=(0,), n_train=80, n_targets=12, n_subsets=5, epochs=4)
        b = None  # one setup: the quick run only checks that every row runs
        sweeps = {
            "captum_k": (50,),
            "arnoldi_dim": 20,
            "kronfluence": [1e-8, 1e-4],
            "dattri_cg": [0.0],
            "dattri_ekfac": [0.0, 1e-2],
        }
        args.repeats = 1
    else:
        a = Setup("A: digits MLP 64-128-10", hidden=128, seeds=tuple(range(args.seeds)))
        b = Setup("B: benchmarks/lds.py setup (64-32-10)", hidden=32, seeds=(0,))
        sweeps = {
            "captum_k": (10, 50, 100, 150),
            "arnoldi_dim": 200,
            "kronfluence": [1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, None],
            "dattri_cg": [0.0, 1e-3, 1e-2, 0.1, 1.0],
            "dattri_ekfac": [0.0, 1e-4, 1e-3, 1e-2, 1e-1],
        }
    print(f"{torch.get_num_threads()} torch threads", flush=True)
    if not args.quick:  # imports and first calls are not timed
        print("warming up every library on a small problem (not timed)", flush=True)
        warm = Setup("warm-up", hidden=8, seeds=(0,), n_train=60, n_targets=10, n_subsets=3, epochs=2)
        with contextlib.redirect_stdout(io.StringIO()):
            run_setup(
                warm,
                argparse.Namespace(no_exact=False, repeats=1, verbose=False, quick=True),
                {
                    "captum_k": (50,),
                    "arnoldi_dim": 60,
                    "kronfluence": [1e-8],
                    "dattri_cg": [0.0],
                    "dattri_ekfac": [0.0],
                },
            )
    rows_a = run_setup(a, args, sweeps)
    rows_b = run_setup(b, args, sweeps) if b is not None else None
    summary(rows_a, rows_b, args.quick)


if __name__ == "__main__":
    main()
