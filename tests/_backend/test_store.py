import os

import numpy as np
import pytest
import torch
from helpers import neg_ce_fn

from captum_influence._backend import FeatureStore, Projector, fill_rows, per_example_grads


def _featurise(store, fail_at=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(50) % 3
    proj = Projector(sum(p.numel() for p in model.parameters()), 8, seed=0)
    calls = []

    def compute(batch):
        x, y = batch
        calls.append(len(calls))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt("killed midway")
        return proj.project(per_example_grads(model, neg_ce_fn, (x, y)))

    batches = [(s, (data[s : s + 8], labels[s : s + 8])) for s in range(0, 50, 8)]
    out = fill_rows(batches, compute, n_rows=50, dim=8, n_batches=len(batches), store=store)
    return (out.numpy().copy() if isinstance(out, torch.Tensor) else np.array(out)), len(calls)


def test_interrupted_run_resumes_to_byte_identical_features(tmp_path):
    meta = {"model": "mlp", "projection_dim": 8, "seed": 0, "n": 50}
    reference, _ = _featurise(FeatureStore(tmp_path / "whole", meta))
    with pytest.raises(KeyboardInterrupt):
        _featurise(FeatureStore(tmp_path / "resumed", meta), fail_at=4)
    resumed, calls = _featurise(FeatureStore(tmp_path / "resumed", meta))
    assert calls == 7 - 3  # the three finished batches are not redone
    assert resumed.tobytes() == reference.tobytes()
    in_memory, _ = _featurise(None)
    assert in_memory.tobytes() == reference.tobytes()


@pytest.mark.parametrize("damage", ["flip", "zero"])
def test_damaged_rows_of_an_unfinished_array_are_found_and_redone(tmp_path, damage):
    """Rows of finished batches in an array that is still being filled carry per-batch checksums:
    flipped or zeroed bytes there are found on resume and only that batch is computed again."""
    meta = {"model": "mlp", "projection_dim": 8, "seed": 0, "n": 50}
    reference, _ = _featurise(FeatureStore(tmp_path / "whole", meta))
    with pytest.raises(KeyboardInterrupt):
        _featurise(FeatureStore(tmp_path / "resumed", meta), fail_at=4)  # batches 0, 1, 2 finished
    rows = np.load(tmp_path / "resumed" / "features.npy", mmap_mode="r+")
    if damage == "flip":
        rows[9, 3] = -rows[9, 3]  # batch 1 holds rows 8..15
    else:
        rows[8:16] = 0
    rows.flush()
    del rows
    with pytest.warns(UserWarning, match=r"batches \[1\] of .*features.npy' do not match their checksums"):
        resumed, calls = _featurise(FeatureStore(tmp_path / "resumed", meta))
    assert calls == 7 - 2  # batches 0 and 2 are kept, batch 1 and the unfinished ones are computed
    assert resumed.tobytes() == reference.tobytes()


def test_store_with_other_settings_is_refused(tmp_path):
    FeatureStore(tmp_path, {"seed": 0, "projection_dim": 8})
    with pytest.raises(ValueError, match="seed: stored 0, now 1"):
        FeatureStore(tmp_path, {"seed": 1, "projection_dim": 8})
    store = FeatureStore(tmp_path, {"seed": 0, "projection_dim": 8})
    store.array("x", (4, 2))
    with pytest.raises(ValueError, match="shape"):
        store.array("x", (4, 3))


def test_empty_truncated_or_flipped_arrays_are_redone(tmp_path):
    meta = {"model": "mlp", "projection_dim": 8, "seed": 0, "n": 50}
    reference, _ = _featurise(FeatureStore(tmp_path / "whole", meta))
    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        _featurise(FeatureStore(store, meta), fail_at=4)
    (store / "features.npy").write_bytes(b"")  # an unfinished array left empty: every batch redone
    with pytest.warns(UserWarning, match="features.npy' is damaged \\(empty file\\)"):
        resumed, calls = _featurise(FeatureStore(store, meta))
    assert calls == 7 and resumed.tobytes() == reference.tobytes()
    for damage in (lambda f: os.truncate(f, f.stat().st_size - 8), lambda f: f.write_bytes(f.read_bytes()[:-1] + b"x")):
        damage(store / "features.npy")  # a finished array: its checksum no longer matches
        with pytest.warns(UserWarning, match="features.npy' is damaged"):
            resumed, calls = _featurise(FeatureStore(store, meta))
        assert calls == 7 and resumed.tobytes() == reference.tobytes()
    (store / "features.done.npy").unlink()  # flags lost: the rows are computed again
    with pytest.warns(UserWarning, match="features.done.npy' is damaged \\(missing\\)"):
        resumed, calls = _featurise(FeatureStore(store, meta))
    assert calls == 7 and resumed.tobytes() == reference.tobytes()
    _, calls = _featurise(FeatureStore(store, meta))
    assert calls == 0
