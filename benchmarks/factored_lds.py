"""Factored against dense TRAK projection: LDS at equal k, and wall time, on an MLP and a tiny transformer.

TRAK projects each per-example gradient g (P,) to k features. ``projection="dense"`` multiplies by one
seeded random (k, P) matrix; ``projection="factored"`` projects each Linear (or transformers Conv1D)
layer's gradient sum_t d_t a_t^T as (P_out^T d_t)(P_in^T a_t)^T, the Kronecker matrix P_out (x) P_in
applied without forming the gradient, and the other parameters densely. Both have
E[<phi_i, phi_j>] = <g_i, g_j>; the question is what the structured matrix costs in LDS at the same k.

Two setups, each with LDS ground truth from models retrained on random halves S_j of the training set
(the target margins f_t(S_j), ``lds.ground_truth``) and an ensemble of models trained on the whole set
with seeds 0, 1, ...:

  digits   the MLP 64-128-10 of ``lds_time.py`` (``lds.digits``, ``lds.train``): 1,000 training
           examples, 200 targets, 100 halves (``--quick``: 500, 100, 40)
  text     a 2-layer BERT (hidden 32, 2 heads, vocab 30, random init) for sequences of 16 tokens
           [CLS] + 15 tokens in which markers A and B occur 1-5 times each (different counts):
           label 1 if B occurs more often than A, with 10% of the labels flipped so that single
           training examples matter; 500 training examples, 100 targets, 40 halves (``--quick``:
           300, 60, 24). Batches are ``(input_ids, labels)``: the default classification task
           calls ``model(input_ids)`` and reads ``.logits``.

For k in (512, 2048) and 1 and 4 models: LDS of ``ci.TRAK(model, train, ensemble[:m],
projection_dim=k, projection=...)`` with everything else default, ``influence(targets)`` timed end
to end (TRAK does not expose its split between featurisation, solve and scoring), and the throughput
(n_train + n_targets) * m / seconds: examples featurised per second, including the solve and scores;
the same per second of the process's CPU time (all threads), which other jobs on the machine disturb less.
Each row is timed over ``--rounds`` runs (default 3; the median is printed), dense and factored runs of
the same (k, m) alternating so that both see the same machine load.
The factored layout rounds each layer's k_out k_in down to a product, so its k is at most the one asked
for: the column ``k made`` says how many features it has.

    python benchmarks/factored_lds.py --cache /tmp/factored_lds    # full size (ground truth ~11 min, then ~8)
    python benchmarks/factored_lds.py --quick --cache /tmp/fq         # smaller
    python benchmarks/factored_lds.py --smoke                         # tiny sizes, for the test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
import torch.nn.functional as F
from lds import digits, ground_truth, mlp, retrained_on_halves, train
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci

HIDDEN = 128  # the MLP of lds_time.py
VOCAB, LENGTH, WIDTH = 30, 16, 32
CLS, MARK_A, MARK_B = 1, 2, 3  # 0 is BERT's padding id; tokens 4.. are filler
LABEL_NOISE = 0.1
TEXT_EPOCHS, TEXT_LR = 10, 3e-3
MODELS = (1, 4)


class Sizes(NamedTuple):
    digits: tuple[int, int, int]  # (n_train, n_targets, n_subsets)
    text: tuple[int, int, int]
    ks: tuple[int, ...]  # the projection dims
    models: tuple[int, ...]  # the ensemble sizes


SIZES = {
    "full": Sizes((1000, 200, 100), (500, 100, 40), (512, 2048), MODELS),
    "quick": Sizes((500, 100, 40), (300, 60, 24), (512, 2048), MODELS),
    "smoke": Sizes((200, 40, 8), (160, 40, 8), (256,), (1,)),
}


@dataclass
class Setup:
    name: str
    model: nn.Module  # the architecture; TRAK loads each state of the ensemble into it
    train_set: TensorDataset
    targets: tuple
    ensemble: list
    masks: np.ndarray
    outputs: np.ndarray


def _state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) per example: TRAK's classification output."""
    correct = logits.gather(1, y[:, None])[:, 0]
    return correct - logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)


def cached(cache: Optional[str], name: str, make: Callable[[], tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(masks, outputs) from ``cache/name.npz``, or made and written there."""
    path = Path(cache) / f"{name}.npz" if cache else None
    if path is not None and path.exists():
        saved = np.load(path)
        return saved["masks"], saved["outputs"]
    masks, outputs = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, masks=masks, outputs=outputs)
    return masks, outputs


# --- digits -------------------------------------------------------------------------------------


def digits_setup(sizes: tuple[int, int, int], cache: Optional[str], n_models: int) -> Setup:
    n_train, n_targets, n_subsets = sizes
    xtr, ytr, xte, yte = digits(n_train, n_targets)
    masks, outputs = cached(
        cache,
        f"digits_{n_train}_{n_targets}_{n_subsets}",
        lambda: ground_truth(xtr, ytr, xte, yte, n_subsets, hidden=HIDDEN),
    )
    ensemble = [_state(train(xtr, ytr, seed=s, hidden=HIDDEN)) for s in range(n_models)]
    return Setup("digits", mlp(HIDDEN), TensorDataset(xtr, ytr), (xte, yte), ensemble, masks, outputs)


# --- text ---------------------------------------------------------------------------------------


def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences [CLS, ...] (n, LENGTH) and labels (n,): 1 if MARK_B occurs more often than
    MARK_A (each 1-5 times, never equally often), then a fraction LABEL_NOISE of labels flipped."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    ids[:, 0] = CLS
    a = torch.randint(1, 6, (n,), generator=g)
    b = torch.randint(1, 5, (n,), generator=g)
    counts = torch.stack([a, b + (b >= a).long()], 1)  # B's count: 1..5 without A's
    for i, (a, b) in enumerate(counts.tolist()):
        where = torch.randperm(LENGTH - 1, generator=g)[: a + b] + 1
        ids[i, where[:a]], ids[i, where[a:]] = MARK_A, MARK_B
    labels = (counts[:, 1] > counts[:, 0]).long()
    flip = torch.rand(n, generator=g) < LABEL_NOISE
    return ids, torch.where(flip, 1 - labels, labels)


def bert(seed: int = 0) -> nn.Module:
    """BertForSequenceClassification, 2 layers of width WIDTH, random init, no dropout, 2 labels."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(  # type: ignore[call-arg]  # its keywords pass through **kwargs
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=LENGTH,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config).eval()


def train_text(ids: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int = TEXT_EPOCHS) -> nn.Module:
    """Minibatch Adam (batches of 32, weight decay 1e-3); deterministic in ``seed``."""
    model = bert(seed).train()
    opt = torch.optim.Adam(model.parameters(), lr=TEXT_LR, weight_decay=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(ids[idx]).logits, labels[idx]).backward()
            opt.step()
    return model.eval()


def text_margins(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _margins(model(ids).logits, labels)


def accuracy(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits.argmax(1) == labels).float().mean())


def text_ground_truth(xtr, ytr, xte, yte, n_subsets: int, epochs: int):
    """As ``lds.ground_truth``: masks (m, n_train) of random halves, target margins (m, n_targets)."""

    def target_margins(idx: torch.Tensor, seed: int) -> torch.Tensor:
        return text_margins(train_text(xtr[idx], ytr[idx], seed=seed, epochs=epochs), xte, yte)

    return retrained_on_halves(len(ytr), n_subsets, target_margins)


def text_setup(sizes: tuple[int, int, int], cache: Optional[str], n_models: int, epochs: int) -> Setup:
    n_train, n_targets, n_subsets = sizes
    ids, labels = sequences(n_train + n_targets, seed=0)
    xtr, ytr, xte, yte = ids[:n_train], labels[:n_train], ids[n_train:], labels[n_train:]
    masks, outputs = cached(
        cache,
        f"text_{n_train}_{n_targets}_{n_subsets}_{epochs}",
        lambda: text_ground_truth(xtr, ytr, xte, yte, n_subsets, epochs),
    )
    models = [train_text(xtr, ytr, seed=s, epochs=epochs) for s in range(n_models)]
    train_acc = [accuracy(m, xtr, ytr) for m in models]
    target_acc = [accuracy(m, xte, yte) for m in models]
    each = ", ".join(f"{a:.3f}" for a in train_acc)
    print(
        f"text: ensemble training accuracy {np.mean(train_acc):.3f} (per model {each}), "
        f"target accuracy {np.mean(target_acc):.3f}; chance 0.5, labels {LABEL_NOISE:.0%} flipped"
    )
    return Setup("text", bert(), TensorDataset(xtr, ytr), (xte, yte), [_state(m) for m in models], masks, outputs)


# --- the runs -----------------------------------------------------------------------------------


def run(setup: Setup, projection: str, k: int, m: int) -> tuple[int, float, float, float]:
    """(features made, LDS, wall seconds, CPU seconds) of one TRAK run; a failure is printed with its
    traceback. The process's CPU time (all threads) is kept beside the wall time: on a shared machine
    it is the less disturbed of the two."""
    start, cpu = time.perf_counter(), time.process_time()
    try:
        trak = ci.TRAK(setup.model, setup.train_set, setup.ensemble[:m], projection_dim=k, projection=projection)
        scores = trak.influence(setup.targets)
    except Exception:
        print(f"  {setup.name} {projection} k {k} models {m} failed:\n{traceback.format_exc()}", flush=True)
        return 0, float("nan"), float("nan"), float("nan")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finite = bool(torch.isfinite(scores).all())
    lds = ci.metrics.lds(scores.numpy(), setup.masks, setup.outputs, on_constant="skip") if finite else float("nan")
    return trak.feature_dim, lds, seconds, cpu


def table(setup: Setup, ks: tuple[int, ...], models: tuple[int, ...], rounds: int) -> None:
    n = len(setup.train_set) + len(setup.targets[1])
    params = sum(p.numel() for p in setup.model.parameters())
    print(
        f"\n{setup.name}: {len(setup.train_set)} training examples, {len(setup.targets[1])} targets, "
        f"{len(setup.masks)} retrained halves; model {type(setup.model).__name__}, {params:,} parameters"
    )
    # one untimed run first: imports, hook set-up and the allocator's first pages are not charged to a row
    run(setup, "dense", ks[0], 1)
    print(
        f"{'projection':<10} {'k':>5} {'k made':>6} {'models':>6} {'LDS':>6} {'seconds':>8} {'cpu s':>7} "
        f"{'examples/s':>10} {'per cpu s':>9}"
    )
    for k in ks:
        for m in models:
            # rounds alternate the two projections, so that both see the same machine load
            results: dict[str, list] = {"dense": [], "factored": []}
            for _ in range(rounds):
                for projection, got in results.items():
                    got.append(run(setup, projection, k, m))
            for projection, got in results.items():
                made, lds = got[0][:2]  # the scores, hence the LDS, are the same in every round
                seconds, cpu = (statistics.median(r[i] for r in got) for i in (2, 3))
                print(
                    f"{projection:<10} {k:>5} {made:>6} {m:>6} {lds:>6.3f} {seconds:>8.2f} {cpu:>7.2f} "
                    f"{n * m / seconds:>10.0f} {n * m / cpu:>9.0f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (see the docstring)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes, one k and one model (for the test)")
    parser.add_argument("--cache", default=None, help="a directory keeping the retrained models' margins (npz)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each row; the median is printed")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = SIZES[mode]
    epochs = 6 if args.smoke else TEXT_EPOCHS
    n_models = max(sizes.models)
    start = time.perf_counter()
    setups = [digits_setup(sizes.digits, args.cache, n_models)]
    setups.append(text_setup(sizes.text, args.cache, n_models, epochs))
    print(
        f"{mode} run: ground truth and ensembles ready in {time.perf_counter() - start:.0f} s; "
        f"{torch.get_num_threads()} torch threads; seconds: influence() end to end (fit, solve, scores), the median "
        f"of {1 if args.smoke else args.rounds} round(s), wall and CPU; examples/s = (n_train + n_targets) * models "
        "/ seconds"
    )
    for setup in setups:
        table(setup, sizes.ks, sizes.models, 1 if args.smoke else args.rounds)


if __name__ == "__main__":
    main()
