from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import checkpointed_classifier, load_with_lr
from torch import nn

import captum_influence as ci
from captum_influence import tracin


def results() -> dict:
    out = {}
    for name, make in {
        "cp": lambda m, s, t: ci.TracInCP(m, t, s, load_with_lr, batch_size=8),
        "cp_projected": lambda m, s, t: ci.TracInCP(m, t, s, load_with_lr, batch_size=8, projection_dim=16),
        "fast": lambda m, s, t: ci.TracInCPFast(m, m[3], t, s, load_with_lr, batch_size=8),
    }.items():
        # Two Linear layers (factorised) around a LayerNorm (per-example gradients).
        model, states, train, test = checkpointed_classifier(nn.LayerNorm(10), nn.Tanh(), learning_rates=(0.5, 0.25))
        seen = []  # examples through the model's forward, to see that each rank does only its share
        model.register_forward_hook(lambda m, args, y: seen.append(len(args[0])))
        method = make(model, states, train)
        top = method.influence(test, k=4)
        out[name] = {
            "scores": method.influence(test),
            "top": (top.indices, top.influence_scores),
            "opponents": method.influence(test, k=3, proponents=False).indices,
            "self": method.self_influence(),
            "factored": [layer for layer, *_ in method._layout.factored],
            "forward_examples": sum(seen),
        }
    return out


# Factorised score blocks of 8 keys for 5 queries, so that scoring too is split over the ranks.
SMALL_BLOCKS = 5 * 8


def worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    tracin._BLOCK_ELEMENTS = SMALL_BLOCKS
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        torch.save(results(), Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_gloo_ranks_give_the_single_process_tracin_scores_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(tracin, "_BLOCK_ELEMENTS", SMALL_BLOCKS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = results()
    finally:
        torch.set_num_threads(threads)
    # The factorised and the per-example-gradient paths are both exercised.
    assert reference["cp"]["factored"] == ["0", "3"] and reference["fast"]["factored"] == ["3"]
    assert reference["cp_projected"]["factored"] == []
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2)
    for rank in range(2):
        for name, got in torch.load(tmp_path / f"rank{rank}.pt").items():
            expected = reference[name]
            assert got["factored"] == expected["factored"], (rank, name)
            assert torch.equal(got["scores"], expected["scores"]), (rank, name)
            assert all(torch.equal(a, b) for a, b in zip(got["top"], expected["top"])), (rank, name)
            assert torch.equal(got["opponents"], expected["opponents"]), (rank, name)
            assert torch.equal(got["self"], expected["self"]), (rank, name)
            assert got["forward_examples"] < 0.75 * expected["forward_examples"], (rank, name)
