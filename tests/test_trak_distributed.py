"""TRAK under torch.distributed: two gloo ranks on CPU give the single-process scores bit for bit,
each rank featurising only its share of the training batches into the shared store."""

import os
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import checkpointed_classifier

import captum_influence as ci
from captum_influence._backend.sharding import shard_range

BATCH = 8
N_TRAIN = 42
N_BATCHES = -(-N_TRAIN // BATCH)


def results(store_dir) -> dict:
    model, states, train, test = checkpointed_classifier()
    # The inputs of the model's forwards with gradients, to see which training rows each rank
    # featurises (the task's no-grad look at the first batch, a check for logits, is not featurising).
    seen = []
    model.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().clone()) if torch.is_grad_enabled() else None
    )
    trak = ci.TRAK(model, train, states, projection_dim=32, batch_size=BATCH, store_dir=store_dir)
    top = trak.influence(test, k=4)
    out = {
        "scores": trak.influence(test),
        "top": (top.indices, top.influence_scores),
        "self": trak.self_influence(),
    }
    forwarded = torch.cat(seen)
    x_train = train.tensors[0]
    out["train_rows"] = sorted(i for i in range(N_TRAIN) if (forwarded == x_train[i]).all(1).any())
    return out


def store_contents(store: Path) -> dict:
    """Every array and tensor file of a store, by name (per-batch checksums included); left out is the metadata."""
    arrays = sorted(store.glob("*.npy"))
    contents = {f.name: torch.from_numpy(np.load(f)) for f in arrays}
    contents.update({f.name: torch.load(f) for f in sorted(store.glob("*.pt"))})
    return contents


def worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        store = Path(tmp) / "store"
        out = {"store": results(store), "memory": results(None)}
        dist.barrier()
        if rank == 0:  # damaged files are redone by the ranks together
            os.truncate(store / "grads_1.npy", 100)
            (store / "factor_0.pt").unlink()
        dist.barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["repaired"] = results(store)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_gloo_ranks_give_the_single_process_scores_exactly(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = results(tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    assert reference["train_rows"] == list(range(N_TRAIN))
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        # Rank r featurises the training rows of its contiguous share of the 6 batches, and no other.
        batches = shard_range(N_BATCHES, rank, 2)
        share = list(range(batches.start * BATCH, min(batches.stop * BATCH, N_TRAIN)))
        assert share and len(share) < N_TRAIN
        for mode, got in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert torch.equal(got["scores"], reference["scores"]), (rank, mode)
            assert all(torch.equal(a, b) for a, b in zip(got["top"], reference["top"])), (rank, mode)
            assert torch.equal(got["self"], reference["self"]), (rank, mode)
            if mode != "repaired":  # a repair redoes only the damaged files' batches
                assert got["train_rows"] == share, (rank, mode)
    # The ranks' shards together make the single-process store: every checkpoint's projected
    # gradients, the keys, the Cholesky factors and solves, file for file and bit for bit (after
    # rank 0 damaged two files and both ranks repaired them).
    single, shared = store_contents(tmp_path / "single"), store_contents(tmp_path / "store")
    assert {"grads_0.npy", "grads_1.npy", "keys.npy", "factor_0.pt", "factor_1.pt"} <= set(single)
    assert list(shared) == list(single)
    for name, expected in single.items():
        assert torch.equal(shared[name], expected), name


def stalled_rank_worker(rank: int, tmp: str) -> None:
    """Rank 1 never joins the computation; rank 0's TRAK (and TracInCP) must name it after
    their ``timeout`` instead of waiting for the process group's."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    if rank == 1:
        time.sleep(5)
        return
    model, states, train, test = checkpointed_classifier()
    for name, method in (
        ("TRAK", ci.TRAK(model, train, states, projection_dim=32, batch_size=BATCH, timeout=1.0)),
        ("TracInCP", ci.TracInCP(model, train, states, batch_size=BATCH, timeout=1.0)),
    ):
        began = time.monotonic()
        try:
            method.influence(test)
        except TimeoutError as err:
            Path(tmp, f"{name}.txt").write_text(f"{time.monotonic() - began:.1f} {err}")


@pytest.mark.slow  # two processes
def test_a_stalled_rank_is_named_after_the_methods_timeout(tmp_path):
    mp.spawn(stalled_rank_worker, args=(str(tmp_path),), nprocs=2)
    for name in ("TRAK", "TracInCP"):
        waited, message = (tmp_path / f"{name}.txt").read_text().split(" ", 1)
        assert float(waited) < 4.0, name
        assert "rank(s) [1] of 2 did not" in message, message


@pytest.mark.parametrize("bad", [0, -1.0, True, "1"])
def test_timeout_is_checked(bad):
    model, states, train, _ = checkpointed_classifier()
    with pytest.raises(ValueError, match="timeout"):
        ci.TRAK(model, train, states, timeout=bad)
