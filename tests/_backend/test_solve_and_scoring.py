import numpy as np
import pytest
import torch

from captum_influence._backend import auto_damping, damped_cholesky, damped_solve, gram, merge_topk, scores, topk


def test_damped_solve_matches_linalg_solve():
    phi = torch.randn(300, 40, dtype=torch.float64)
    g = gram(phi, block_size=64)
    assert torch.allclose(g, phi.T @ phi)
    rhs = torch.randn(40, 5, dtype=torch.float64)
    for damping in (0.0, 0.1, 10.0):
        expected = torch.linalg.solve(phi.T @ phi + damping * torch.eye(40, dtype=torch.float64), rhs)
        assert torch.allclose(damped_solve(g, rhs, damping), expected, rtol=1e-10, atol=1e-12)


def test_float32_features_accumulate_in_float64_from_memmap(tmp_path):
    phi = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float16)
    mm = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=phi.shape)
    mm[:] = phi
    g = gram(mm, block_size=128)
    assert g.dtype == torch.float64
    ref = torch.from_numpy(phi.astype(np.float64))
    assert torch.allclose(g, ref.T @ ref, rtol=1e-12)


def test_singular_gram_needs_damping():
    phi = torch.randn(5, 20, dtype=torch.float64)
    g = gram(phi)
    with pytest.raises(ValueError, match="damping"):
        damped_cholesky(g, 0.0)
    lam = auto_damping(g)
    assert lam > 0
    damped_cholesky(g, lam)
    with pytest.raises(ValueError, match="damping"):
        damped_cholesky(g, -1.0)


def test_blockwise_scores_and_topk_match_full_argsort():
    q, keys = torch.randn(13, 8), torch.randn(101, 8)
    keys[50] = keys[7]  # a tie: the lower index comes first, as a stable argsort
    full = q @ keys.T
    assert torch.allclose(scores(q, keys, block_size=10), full, atol=1e-6)
    for largest in (True, False):
        values, idx = topk(q, keys.numpy(), 5, largest=largest, block_size=17, query_block_size=4)
        ref = torch.argsort(-full if largest else full, dim=1, stable=True)[:, :5]
        assert torch.equal(idx, ref)
        assert torch.allclose(values, full.gather(1, ref), atol=1e-6)
    with pytest.raises(ValueError, match="k"):
        topk(q, keys, 0)
    with pytest.raises(ValueError, match="queries"):
        scores(torch.randn(2, 3), keys)


def test_merge_topk_equals_stable_argsort_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    full = torch.randint(0, 4, (20, 90), generator=g).float()  # many ties at the k-th value
    full[3, 40] = full[7, 0] = full[7, 89] = float("nan")
    full[11] = 0.0
    full[12, ::2] = -0.0
    for k in (1, 5, 30, 90):
        for largest in (True, False):
            for width in (7, 25, 90):
                blocks = [(s, full[:, s : s + width]) for s in range(0, 90, width)]
                for order in (blocks, blocks[::-1]):
                    values, idx = merge_topk(order, k, largest=largest)
                    ref = torch.argsort(-full if largest else full, dim=1, stable=True)[:, :k]
                    assert torch.equal(idx, ref), (k, largest, width)
                    assert torch.equal(values.nan_to_num(7.0), full.gather(1, ref).nan_to_num(7.0))


def test_merge_topk_sorts_only_the_running_candidates(monkeypatch):
    """Each block is reduced by torch.topk: no sort is wider than 2k when the scores are distinct."""
    widths = []
    argsort = torch.argsort

    def recording(x, *args, **kwargs):
        widths.append(x.shape[-1])
        return argsort(x, *args, **kwargs)

    full = torch.randn(6, 1000)
    monkeypatch.setattr(torch, "argsort", recording)
    values, idx = merge_topk([(s, full[:, s : s + 250]) for s in range(0, 1000, 250)], 4)
    monkeypatch.undo()
    assert widths and max(widths) <= 8
    assert torch.equal(idx, torch.argsort(-full, dim=1, stable=True)[:, :4])
