import sys

import numpy as np
import pytest
import torch

from captum_influence._backend.solve import as_tensor_block, gram
from captum_influence._backend.store import FeatureStore, release_pages


def rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_a_store_block_by_block_keeps_one_block_resident(tmp_path):
    n, d, block = 32768, 512, 1024  # 64 MiB of float32, read 2 MiB at a time
    store = FeatureStore(tmp_path, {"test": 1})
    arr = store.array("features", (n, d))
    rng = np.random.default_rng(0)
    for start in range(0, n, 4096):
        arr[start : start + 4096] = rng.standard_normal((4096, d), dtype=np.float32)
        release_pages(arr[start : start + 4096])
    arr.flush()
    del arr
    for mode in ("r", "r+"):
        keys = np.load(tmp_path / "features.npy", mmap_mode=mode)
        before = rss_file_kib()
        total = torch.zeros(d, dtype=torch.float64)
        for start in range(0, n, block):
            total += as_tensor_block(keys, start, start + block, torch.float64).sum(0)
        grown = rss_file_kib() - before
        assert grown < 4 * block * d * 4 / 1024, f"{mode}: {grown} KiB resident after reading"
        # The released pages read back unchanged.
        assert torch.allclose(total, torch.from_numpy(np.asarray(keys, dtype=np.float64).sum(0)))
    # Non-contiguous views are accepted: the Gram matrix of 8 columns read block by block.
    columns = np.asarray(keys[:, :8], dtype=np.float64)
    assert torch.allclose(gram(keys[:, :8], block_size=1000).double(), torch.from_numpy(columns.T @ columns))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_pages_drops_whole_pages_of_the_block_and_keeps_every_byte(tmp_path):
    n, d = 4096, 1024  # 16 MiB of float32, 4 KiB per row
    path = tmp_path / "block.npy"
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    written = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    arr[:] = written  # every page resident and dirty, not flushed
    resident = rss_file_kib()
    half = arr[: n // 2]
    release_pages(half)
    dropped = resident - rss_file_kib()
    assert 0.9 * half.nbytes / 1024 <= dropped <= half.nbytes / 1024 + 64, f"{dropped} KiB dropped"
    # Nothing is lost: the dropped pages, never flushed, read back from the page cache, through this
    # mapping and through another.
    assert np.array_equal(arr, written)
    assert np.array_equal(np.load(path, mmap_mode="r"), written)
    # A block smaller than a page drops nothing (its page holds other rows too); a strided view
    # drops only the whole pages inside its bounds.
    resident = rss_file_kib()
    release_pages(arr[10, :100])
    assert rss_file_kib() >= resident - 4
    release_pages(arr[n // 2 :: 2])
    assert 0 < resident - rss_file_kib() <= arr[n // 2 :].nbytes / 1024 + 64
    assert np.array_equal(arr, written)
    # Arrays that are not memory-mapped, and empty blocks, are left as they are.
    plain = written[:4].copy()
    release_pages(plain)
    release_pages(arr[:0])
    assert np.array_equal(plain, written[:4]) and np.array_equal(arr, written)
