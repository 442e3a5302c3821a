from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci
from captum_influence import tracin


def problem():
    """Two Linear layers (factorised) around a LayerNorm (per-example gradients), two checkpoints,
    42 training examples in 6 batches (the last short)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 3))
    states = []
    for lr in (0.5, 0.25):
        states.append({"lr": lr, **{k: v.clone() for k, v in model.state_dict().items()}})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    train = TensorDataset(torch.randn(42, 6), torch.randint(0, 3, (42,)))
    test = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    return model, states, train, test


def load(model, checkpoint):
    model.load_state_dict({k: v for k, v in checkpoint.items() if k != "lr"})
    return checkpoint["lr"]


def results() -> dict:
    out = {}
    for name, make in {
        "cp": lambda m, s, t: ci.TracInCP(m, t, s, load, batch_size=8),
        "cp_projected": lambda m, s, t: ci.TracInCP(m, t, s, load, batch_size=8, projection_dim=16),
        "fast": lambda m, s, t: ci.TracInCPFast(m, m[3], t, s, load, batch_size=8),
    }.items():
        model, states, train, test = problem()
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
