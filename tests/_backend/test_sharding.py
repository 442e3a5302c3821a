import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import neg_ce_fn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_influence._backend import FeatureStore, Projector, fill_rows, param_shapes, scores, topk
from captum_influence._backend.layer_grads import LayerGrads
from captum_influence._backend.sharding import (
    fill_rows_sharded,
    iter_loader_shard,
    scores_sharded,
    shard_range,
    topk_sharded,
)
from captum_influence._data import iter_batches

N, BATCH, K, BLOCK = 45, 4, 16, 8  # 12 batches, the last one short; 6 key blocks


def problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(N, 5), torch.randint(0, 3, (N,))
    test = (torch.randn(7, 5), torch.randint(0, 3, (7,)))
    projector = Projector(param_shapes(model, [n for n, _ in model.named_parameters()]), K, seed=3)
    return model, DataLoader(TensorDataset(x, y), batch_size=BATCH), test, projector


def with_start(items):
    return ((start, (start, batch)) for start, batch in items)


def worker(rank: int, world: int, tmp: str, run: str, die_after) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/{run}.rendezvous", rank=rank, world_size=world)
    try:
        model, loader, test, projector = problem()
        lg = LayerGrads(model)
        computed = []

        def compute(item):
            start, batch = item
            if die_after is not None and rank == 1 and len(computed) == die_after:
                os._exit(3)  # killed midway, after its first batches were flushed
            computed.append(start)
            return lg.project(neg_ce_fn, batch, projector)

        store = FeatureStore(Path(tmp) / "store", {"k": K, "seed": 3})
        feats = fill_rows_sharded(loader, compute, n_rows=N, dim=K, store=store, batches=with_start)
        into_store = list(computed)
        in_memory = fill_rows_sharded(loader, compute, n_rows=N, dim=K, batches=with_start)
        q = lg.project(neg_ce_fn, test, projector)
        out = {
            "computed": into_store,
            "features": torch.from_numpy(np.array(feats)),
            "in_memory": in_memory,
            "scores": scores_sharded(q, feats, block_size=BLOCK),
            "weighted": scores_sharded(q, feats, block_size=BLOCK, transform=lambda b, s, e: b * torch.arange(s, e)),
            "topk": topk_sharded(q, feats, 5, block_size=BLOCK),
            "bottomk": topk_sharded(q, feats, 3, largest=False, block_size=BLOCK, query_block_size=4),
        }
        torch.save(out, Path(tmp) / f"{run}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shard_range_covers_everything_once():
    for n in (0, 1, 7, 12):
        for world in (1, 2, 3, 5):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(4, 2, 2)


def test_loader_shard_loads_only_its_batches():
    _, loader, _, _ = problem()
    everything = list(iter_batches(loader))
    for batches in (range(0, 5), range(5, 12), range(11, 12)):
        got = list(iter_loader_shard(loader, batches))
        assert [s for s, _ in got] == [everything[i][0] for i in batches]
        assert all(torch.equal(a[0], everything[i][1][0]) for (_, a), i in zip(got, batches))
    # A loader without a fixed batch size is walked and the other batches skipped.
    by_sampler = DataLoader(loader.dataset, batch_sampler=loader.batch_sampler)
    got = list(iter_loader_shard(by_sampler, range(3, 6)))
    assert [s for s, _ in got] == [everything[i][0] for i in range(3, 6)]


def test_two_gloo_ranks_equal_one_process_and_resume_after_a_kill(tmp_path):
    model, loader, test, projector = problem()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lg = LayerGrads(model)
        ref = fill_rows(
            with_start(iter_batches(loader)),
            lambda item: lg.project(neg_ce_fn, item[1], projector),
            n_rows=N,
            dim=K,
            n_batches=len(loader),
        )
        q = lg.project(neg_ce_fn, test, projector)
        ref_scores = scores(q, ref, block_size=BLOCK)
        ref_weighted = scores(q, ref, block_size=BLOCK, transform=lambda b, s, e: b * torch.arange(s, e))
        ref_top = topk(q, ref, 5, block_size=BLOCK)
        ref_bottom = topk(q, ref, 3, largest=False, block_size=BLOCK, query_block_size=4)
    finally:
        torch.set_num_threads(threads)

    # Rank 1 dies after one batch; the launcher stops rank 0 too.
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(worker, args=(2, str(tmp_path), "killed", 1), nprocs=2)
    done = np.load(tmp_path / "store" / "features.done.npy").astype(bool)
    rank1 = shard_range(len(loader), 1, 2)
    assert done[rank1.start] and not done[rank1.start + 1 :].any()

    # The same command again: only the unfinished batches are computed.
    mp.spawn(worker, args=(2, str(tmp_path), "rerun", None), nprocs=2)
    results = [torch.load(tmp_path / f"rerun.rank{r}.pt") for r in range(2)]
    starts = [s for s, _ in iter_batches(loader)]
    redone = sorted(s for res in results for s in res["computed"])
    assert redone == [starts[i] for i in range(len(loader)) if not done[i]]
    for res in results:  # every rank ends with every row and the full, exact results
        assert torch.equal(res["features"], ref)
        assert torch.equal(res["in_memory"], ref)
        assert torch.equal(res["scores"], ref_scores)
        assert torch.equal(res["weighted"], ref_weighted)
        assert all(torch.equal(a, b) for a, b in zip(res["topk"], ref_top))
        assert all(torch.equal(a, b) for a, b in zip(res["bottomk"], ref_bottom))


def silent_rank_worker(rank: int, tmp: str) -> None:
    """Rank 1 stays away (frozen); rank 0 waits at a barrier and must name it within the timeout:
    collective_timeout's, then the process group's."""
    import time
    from datetime import timedelta

    from captum_influence._backend.sharding import barrier, collective_timeout

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2, timeout=timedelta(seconds=2)
    )
    if rank == 1:
        time.sleep(6)
        return
    for name, seconds in (("collective_timeout", 1.0), ("process_group", None)):
        began = time.monotonic()
        try:
            with collective_timeout(seconds):
                barrier()
        except TimeoutError as err:
            Path(tmp, f"{name}.txt").write_text(f"{time.monotonic() - began:.1f} {err}")


def test_a_rank_that_does_not_answer_is_named_after_the_timeout(tmp_path):
    mp.spawn(silent_rank_worker, args=(str(tmp_path),), nprocs=2)
    for name, limit in (("collective_timeout", 1.0), ("process_group", 2.0)):
        waited, message = (tmp_path / f"{name}.txt").read_text().split(" ", 1)
        assert limit <= float(waited) < limit + 1.5, name
        assert "rank(s) [1] of 2 did not reach a barrier" in message


def test_collective_timeout_is_checked():
    from captum_influence._backend.sharding import collective_timeout

    with pytest.raises(ValueError, match="timeout: expected a positive number"):
        with collective_timeout(0):
            pass
