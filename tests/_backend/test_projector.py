import math

import pytest
import torch

import captum_influence as ci


def test_same_output_for_any_batch_size_and_chunking():
    grads = torch.randn(37, 1000)
    proj = ci.Projector(1000, 64, seed=3)
    full = proj.project(grads)
    by_rows = torch.cat([proj.project(grads[i : i + 5]) for i in range(0, 37, 5)])
    # Equal up to float32 rounding: BLAS may order the sum differently for another batch size.
    assert (by_rows - full).abs().max() <= 1e-6 * full.abs().max()
    # Block size only changes the order of the sum over rows, never the matrix.
    small_blocks = ci.Projector(1000, 64, seed=3, block_rows=97)
    assert torch.equal(small_blocks.matrix(), proj.matrix())
    assert (small_blocks.project(grads) - full).abs().max() <= 1e-6 * full.abs().max()
    # A fresh projector (no cache) regenerates the same matrix.
    assert torch.equal(ci.Projector(1000, 64, seed=3, cache_bytes=0).matrix(), proj.matrix())


def test_dict_of_param_grads_equals_flat_projection():
    shapes = {"a.weight": (7, 11), "a.bias": (7,), "b.weight": (3, 7)}
    grads = {name: torch.randn(9, *s, dtype=torch.float64) for name, s in shapes.items()}
    flat = torch.cat([g.reshape(9, -1) for g in grads.values()], dim=1)
    proj = ci.Projector(shapes, 16, seed=1, dtype=torch.float64, block_rows=10)
    assert torch.allclose(proj.project(grads), flat @ proj.matrix(), atol=1e-12)
    ident = ci.Projector(shapes, None, kind="identity", dtype=torch.float64)
    assert torch.equal(ident.project(grads), flat)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_within_jl_bound(kind):
    n, d, k, eps = 40, 5000, 2048, 0.25
    x = torch.randn(n, d, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    px = ci.Projector(d, k, kind=kind, seed=0, dtype=torch.float64).project(x)
    exact, approx = x @ x.T, px @ px.T
    # JL: for unit vectors |<Px,Py> - <x,y>| <= eps with probability >= 1 - 4 exp(-k eps^2 / 8) per pair.
    assert 4 * math.exp(-k * eps**2 / 8) * n * n < 1e-3
    assert (approx - exact).abs().max() < eps
    assert (torch.diagonal(approx) - 1).abs().max() < eps


def test_entries_look_random():
    m = ci.Projector(4096, 256, kind="rademacher", seed=0).matrix() * 16
    assert set(m.unique().tolist()) == {-1.0, 1.0}
    assert abs(m.mean().item()) < 0.01
    g = ci.Projector(4096, 256, kind="gaussian", seed=0).matrix() * 16
    assert abs(g.mean().item()) < 0.01 and abs(g.std().item() - 1) < 0.01
    col_corr = torch.corrcoef(g.T)
    assert (col_corr - torch.eye(256)).abs().max() < 0.1


def test_seed_changes_matrix_and_is_reproducible():
    a = ci.Projector(500, 32, seed=0).matrix()
    assert torch.equal(a, ci.Projector(500, 32, seed=0).matrix())
    b = ci.Projector(500, 32, seed=1).matrix()
    assert (a != b).float().mean() > 0.4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_matrix_on_gpu():
    cpu = ci.Projector(3000, 128, seed=5)
    gpu = ci.Projector(3000, 128, seed=5, device="cuda")
    assert torch.equal(gpu.matrix().cpu(), cpu.matrix())
    g = ci.Projector(3000, 128, seed=5, kind="gaussian")
    assert torch.allclose(
        ci.Projector(3000, 128, seed=5, kind="gaussian", device="cuda").matrix().cpu(), g.matrix(), atol=1e-6
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="projection_dim"):
        ci.Projector(100, 0)
    with pytest.raises(ValueError, match="kind"):
        ci.Projector(100, 10, kind="sparse")
    with pytest.raises(ValueError, match="grad_dim"):
        ci.Projector(0, 10)
    with pytest.raises(ValueError, match="grads"):
        ci.Projector(100, 10).project(torch.randn(3, 99))
    with pytest.raises(ValueError, match="grads"):
        ci.Projector({"w": (3, 3)}, 4).project({"v": torch.randn(2, 3, 3)})


def test_rademacher_blocks_equal_the_int64_hash_formula():
    """Blocks are made in wrapping int32 arithmetic; they equal the module docstring's hash computed
    in int64: sign = 1 - 2 * bit31(mix32(key(row) ^ key(col)))."""
    from captum_influence._backend import projector as module

    for seed in (0, 3, 2**40 + 7):
        salt = int(module._mix32(torch.tensor(seed & module._M32)).item()) ^ ((seed >> 32) & module._M32)
        rows = module._key(torch.arange(5, 1200, dtype=torch.int64), salt)
        cols = module._key(torch.arange(333, dtype=torch.int64), salt ^ 0x5BD1E995)
        reference = (1 - 2 * (module._mix32(rows[:, None] ^ cols[None, :]) >> 31)).float()
        assert torch.equal(module.projection_block(seed, 5, 1200, 333, "rademacher", torch.float32, "cpu"), reference)
