"""Scoring from a memory-mapped feature store in bounded memory: peak resident memory and time.

Synthetic features for n_train training examples at projection dimension k are written to a
FeatureStore with fill_rows (as featurisation would), then n_test targets are scored against
them from the memmap, a block of training rows at a time:
  - every score, streamed into an (n_test, n_train) array on disk (iter_score_blocks);
  - the top 10 training examples per target (topk);
  - for comparison (only where it fits in memory), the in-memory way: load every feature and
    compute the whole score matrix at once, as traker's BasicScoreComputer does.
Each step runs in its own process, whose peak resident memory (VmHWM, file-backed pages
included) is reported.

    python benchmarks/score_memory.py            # 1,000,000 x 1,000 at k = 2048 (4-8 GB on disk)
    python benchmarks/score_memory.py --quick    # 100,000 x 1,000 at k = 512
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captum_influence._backend import FeatureStore, fill_rows, iter_score_blocks, topk
from captum_influence._backend.store import release_pages

GiB = 2**30
BLOCK = 8192


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def queries(n_test: int, k: int) -> torch.Tensor:
    return torch.randn(n_test, k, generator=torch.Generator().manual_seed(1)) / k**0.5


def open_store(args) -> FeatureStore:
    return FeatureStore(args.dir, {"n_train": args.n_train, "k": args.k, "dtype": args.dtype})


def phase_write(args) -> dict:
    """Synthetic features through fill_rows into the store, as featurisation writes them."""
    n_batches = -(-args.n_train // BLOCK)
    batches = ((start, start) for start in range(0, args.n_train, BLOCK))

    def compute(start: int) -> torch.Tensor:
        rows = min(BLOCK, args.n_train - start)
        return torch.randn(rows, args.k, generator=torch.Generator().manual_seed(start)) / args.k**0.5

    fill_rows(
        batches,
        compute,
        n_rows=args.n_train,
        dim=args.k,
        n_batches=n_batches,
        store=open_store(args),
        dtype=getattr(torch, args.dtype),
    )
    return {}


def phase_stream(args) -> dict:
    """All n_test x n_train scores, block by block from the memmap into a memmap on disk."""
    keys = open_store(args).array("features", (args.n_train, args.k), np.dtype(args.dtype))
    out = open_store(args).array("scores", (args.n_test, args.n_train), np.dtype(args.dtype))
    checksum = 0.0
    for start, block in iter_score_blocks(queries(args.n_test, args.k), keys, block_size=BLOCK):
        out[:, start : start + block.shape[1]] = block.numpy()
        release_pages(out[:, start : start + block.shape[1]])
        checksum += float(block.sum())
    out.flush()
    return {"checksum": checksum}


def phase_topk(args) -> dict:
    keys = open_store(args).array("features", (args.n_train, args.k), np.dtype(args.dtype))
    values, indices = topk(queries(args.n_test, args.k), keys, 10, block_size=BLOCK)
    return {"top1": [int(i) for i in indices[:3, 0]]}


def phase_in_memory(args) -> dict:
    """The whole feature matrix loaded, then one product (traker's BasicScoreComputer)."""
    from trak.score_computers import BasicScoreComputer

    keys = torch.from_numpy(np.load(Path(args.dir) / "features.npy"))
    computer = BasicScoreComputer(dtype=keys.dtype, device="cpu")
    scores = torch.zeros(args.n_train, args.n_test, dtype=keys.dtype)  # traker's (n_train, n_targets)
    computer.get_scores(keys, queries(args.n_test, args.k).to(keys.dtype), scores)
    return {"shape": list(scores.shape)}


PHASES = {"write": phase_write, "stream": phase_stream, "topk": phase_topk, "in_memory": phase_in_memory}


def run_phase(name: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--dir",
        args.dir,
        "--n-train",
        str(args.n_train),
        "--n-test",
        str(args.n_test),
        "--k",
        str(args.k),
        "--dtype",
        args.dtype,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"])
    parser.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the store afterwards")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        torch.set_num_threads(int(os.environ.get("SCORE_THREADS", torch.get_num_threads())))
        start = time.perf_counter()
        result = PHASES[args.phase](args)
        print(json.dumps({**result, "seconds": time.perf_counter() - start, "peak_rss": peak_rss_bytes()}))
        return
    args.n_train = args.n_train or (100_000 if args.quick else 1_000_000)
    args.k = args.k or (512 if args.quick else 2048)
    owned = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="score_memory_")
    need32 = 4 * args.n_train * (args.k + args.n_test)  # features + streamed scores
    free = shutil.disk_usage(args.dir).free
    if args.dtype == "auto":
        args.dtype = "float32" if free > 1.5 * need32 else "float16"
    itemsize = np.dtype(args.dtype).itemsize
    if free < need32 * itemsize / 4 * 1.1:
        raise SystemExit(
            f"not enough disk space in {args.dir}: {free / GiB:.1f} GiB free, need {need32 * itemsize / 4 / GiB:.1f}"
        )
    feature_bytes = args.n_train * args.k * itemsize
    score_bytes = args.n_train * args.n_test * itemsize
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(
        f"{args.n_train:,} training examples x {args.n_test:,} targets, k = {args.k}, {args.dtype} store; "
        f"features {feature_bytes / GiB:.2f} GiB, all scores {score_bytes / GiB:.2f} GiB; "
        f"{torch.get_num_threads()} threads, {mem_total / GiB:.0f} GiB RAM, {free / GiB:.0f} GiB free disk"
    )
    steps = [
        ("write", "write the store (fill_rows, memmap)"),
        ("stream", "all scores, memmap -> memmap on disk"),
        ("topk", "top-10 per target (topk)"),
    ]
    if feature_bytes + 2 * score_bytes < mem_total / 4:
        steps.append(("in_memory", "in memory: traker BasicScoreComputer"))
    try:
        print(f"  {'step':44s} {'seconds':>8s} {'peak RSS':>10s}")
        for name, label in steps:
            res = run_phase(name, args)
            print(f"  {label:44s} {res['seconds']:8.1f} {res['peak_rss'] / GiB:8.2f} GiB")
        if ("in_memory", "in memory: traker BasicScoreComputer") not in steps:
            print(
                f"  in memory (traker BasicScoreComputer): not run; it holds every feature and score, "
                f"{(feature_bytes + score_bytes) / GiB:.1f} GiB at least"
            )
    finally:
        if owned and not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
