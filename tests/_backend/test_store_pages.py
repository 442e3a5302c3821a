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
    # Non-contiguous views and plain arrays are accepted.
    assert gram(keys[:, :8], block_size=1000).shape == (8, 8)
    release_pages(np.zeros((3, 3)))
