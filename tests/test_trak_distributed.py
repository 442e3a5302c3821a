import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci


def problem():
    """A small classifier, two checkpoints, 42 training examples in 6 batches (the last short)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    states = []
    for _ in range(2):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    train = TensorDataset(torch.randn(42, 6), torch.randint(0, 3, (42,)))
    test = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    return model, states, train, test


def results(store_dir) -> dict:
    model, states, train, test = problem()
    seen = []  # examples through the model's forward, to see that each rank does only its share
    model.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    trak = ci.TRAK(model, train, states, projection_dim=32, batch_size=8, store_dir=store_dir)
    top = trak.influence(test, k=4)
    return {
        "scores": trak.influence(test),
        "top": (top.indices, top.influence_scores),
        "self": trak.self_influence(),
        "forward_examples": sum(seen),
    }


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


def test_two_gloo_ranks_give_the_single_process_scores_exactly(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = results(None)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        for mode, got in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert torch.equal(got["scores"], reference["scores"]), (rank, mode)
            assert all(torch.equal(a, b) for a, b in zip(got["top"], reference["top"])), (rank, mode)
            assert torch.equal(got["self"], reference["self"]), (rank, mode)
            assert got["forward_examples"] < 0.75 * reference["forward_examples"], (rank, mode)
    # Each rank wrote its own shard of every checkpoint's features into the shared store.
    assert (tmp_path / "store" / "grads_0.npy").exists() and (tmp_path / "store" / "grads_1.npy").exists()


def stalled_rank_worker(rank: int, tmp: str) -> None:
    """Rank 1 never joins the computation; rank 0's TRAK (and TracInCP) must name it after
    their ``timeout`` instead of waiting for the process group's."""
    import time
    from datetime import timedelta

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    if rank == 1:
        time.sleep(5)
        return
    model, states, train, test = problem()
    for name, method in (
        ("TRAK", ci.TRAK(model, train, states, projection_dim=32, batch_size=8, timeout=1.0)),
        ("TracInCP", ci.TracInCP(model, train, states, batch_size=8, timeout=1.0)),
    ):
        began = time.monotonic()
        try:
            method.influence(test)
        except TimeoutError as err:
            Path(tmp, f"{name}.txt").write_text(f"{time.monotonic() - began:.1f} {err}")


def test_a_stalled_rank_is_named_after_the_methods_timeout(tmp_path):
    mp.spawn(stalled_rank_worker, args=(str(tmp_path),), nprocs=2)
    for name in ("TRAK", "TracInCP"):
        waited, message = (tmp_path / f"{name}.txt").read_text().split(" ", 1)
        assert float(waited) < 4.0, name
        assert "rank(s) [1] of 2 did not" in message, message


def test_timeout_is_checked():
    model, states, train, _ = problem()
    for bad in (0, -1.0, True, "1"):
        try:
            ci.TRAK(model, train, states, timeout=bad)
        except ValueError as err:
            assert "timeout" in str(err)
        else:
            raise AssertionError(f"timeout={bad!r} accepted")
