"""The feature store under faults: a process killed while each kind of file is written, and each
kind of file truncated, zeroed, flipped, filled with NaN or deleted. A rerun must give the
uninterrupted run's scores bit for bit, or refuse with an error naming the damaged file."""

import json
import multiprocessing as mp
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpointed_classifier
from torch import nn
from torch.utils.data import TensorDataset

import captum_influence as ci
from captum_influence._backend import store as store_module

FILES = [
    "metadata.json",
    "grads_0.npy",
    "grads_0.done.npy",
    "grads_1.npy",
    "keys.npy",
    "keys.done.npy",
    "factor_0.pt",
    "solve_1.pt",
]


def scores(store_dir, *hidden: nn.Module, data_seed: int = 1) -> torch.Tensor:
    model, states, train, test = checkpointed_classifier(*hidden, data_seed=data_seed)
    trak = ci.TRAK(model, train, states, projection_dim=32, batch_size=8, store_dir=store_dir)
    return torch.cat([trak.influence(test), trak.self_influence()[None]])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return scores(tmp_path_factory.mktemp("reference"))


def resumed(store_dir) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scores(store_dir)


# --- a process killed while writing ---------------------------------------------------------


def _killed_run(store_dir: str, target: str, nth: int, phase: str) -> None:
    """Featurise into ``store_dir`` and SIGKILL this process at the ``nth`` write of ``target``:
    before its temporary file is written, with half of it written, or once it is in place."""
    torch.set_num_threads(1)
    atomic_write, seen = store_module._atomic_write, []

    def dying_write(path, write):
        if path.name == target:
            seen.append(path)
            if len(seen) == nth:
                if phase == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                if phase == "midway":

                    def half(tmp):
                        write(tmp)
                        os.truncate(tmp, os.path.getsize(tmp) // 2)
                        os.kill(os.getpid(), signal.SIGKILL)

                    return atomic_write(path, half)
        atomic_write(path, write)
        if path.name == target and len(seen) == nth and phase == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    store_module._atomic_write = dying_write
    if target == "batch":  # between a batch's rows and its done flag
        flush, calls = np.memmap.flush, []

        def dying_flush(self):
            flush(self)
            calls.append(1)
            if len(calls) == nth:
                os.kill(os.getpid(), signal.SIGKILL)

        np.memmap.flush = dying_flush
    scores(store_dir)


KILLS = [(f, 1, phase) for f in FILES[1:] if f != "grads_1.npy" for phase in ("before", "midway", "after")]
KILLS += [
    ("metadata.json", 1, "before"),
    ("metadata.json", 1, "midway"),
    ("metadata.json", 1, "after"),
    ("metadata.json", 4, "midway"),
    ("metadata.json", 9, "after"),
    ("batch", 5, ""),
    ("batch", 14, ""),
]


@pytest.mark.slow  # a process per case
@pytest.mark.parametrize("target,nth,phase", KILLS)
def test_killed_writer_resumes_bit_identical(tmp_path, reference, target, nth, phase):
    process = mp.get_context("fork").Process(target=_killed_run, args=(str(tmp_path), target, nth, phase))
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL
    assert torch.equal(resumed(tmp_path), reference)


# --- damaged files ----------------------------------------------------------------------------


def _truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def _zero(file: Path) -> None:
    os.truncate(file, 0)


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-7] ^= 0xFF
    file.write_bytes(bytes(data))


def _delete(file: Path) -> None:
    file.unlink()


def _nan(file: Path) -> None:
    arr = np.load(file, mmap_mode="r+")
    arr[3] = np.nan
    arr.flush()


DAMAGES = {"truncated": _truncate, "zeroed": _zero, "flipped": _flip, "deleted": _delete}
CASES = [(f, d) for f in FILES for d in DAMAGES] + [("keys.npy", "nan"), ("grads_1.npy", "nan")]


@pytest.mark.parametrize("name,damage", CASES)
def test_damaged_file_is_redone_or_refused_by_name(tmp_path, reference, name, damage):
    scores(tmp_path)
    file = tmp_path / name
    (_nan if damage == "nan" else DAMAGES[damage])(file)
    if name == "metadata.json":
        message = "is damaged" if damage != "deleted" else "no metadata.json"
        with pytest.raises(ValueError, match=f"store_dir: .*{message}"):
            scores(tmp_path)
        return
    with pytest.warns(UserWarning, match=f"store_dir: .*{name}' is damaged"):
        again = scores(tmp_path)
    assert torch.equal(again, reference)
    assert torch.equal(resumed(tmp_path), reference)  # and the repaired store is whole again


def test_store_of_other_data_or_architecture_is_refused(tmp_path):
    scores(tmp_path)
    with pytest.raises(ValueError, match="other settings \\(data: stored"):
        scores(tmp_path, data_seed=2)  # the same sizes, other values
    with pytest.raises(ValueError, match="other settings \\(model: stored .*Tanh.*ReLU"):
        scores(tmp_path, nn.ReLU())  # the same parameter shapes


class Items(torch.utils.data.Dataset):
    """A dataset that is not a TensorDataset: fingerprinted batch by batch."""

    def __init__(self, data: TensorDataset):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def test_store_of_other_data_through_a_plain_dataset_is_refused(tmp_path):
    model, states, train, _ = checkpointed_classifier()
    ci.TRAK(model, Items(train), states, projection_dim=32, batch_size=8, store_dir=tmp_path)
    _, _, other, _ = checkpointed_classifier(data_seed=2)
    with pytest.raises(ValueError, match="other settings \\(data: stored"):
        ci.TRAK(model, Items(other), states, projection_dim=32, batch_size=8, store_dir=tmp_path)


def test_edited_metadata_that_is_still_json_is_damaged(tmp_path):
    scores(tmp_path)
    file = tmp_path / "metadata.json"
    file.write_text(file.read_text().replace('"batch_size": 8', '"batch_size": 9'))
    with pytest.raises(ValueError, match="store_dir: .*metadata.json' is damaged \\(checksum mismatch\\)"):
        scores(tmp_path)


@pytest.mark.slow  # a second process
def test_temporaries_of_killed_writers_are_removed(tmp_path):
    process = mp.get_context("fork").Process(target=_killed_run, args=(str(tmp_path), "keys.npy", 1, "midway"))
    process.start()
    process.join(60)
    assert list(tmp_path.glob("*.tmp"))
    assert torch.equal(resumed(tmp_path), scores(None))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_directory_with_files_but_no_metadata_is_not_a_store(tmp_path):
    (tmp_path / "keys.npy").write_bytes(b"old")
    with pytest.raises(ValueError, match="store_dir: .*no metadata.json"):
        scores(tmp_path)


def test_store_of_an_older_format_is_refused(tmp_path):
    scores(tmp_path)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    meta["format"] = 1
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="store_dir: .*store format 1"):
        scores(tmp_path)


def test_empty_or_read_only_store_dir_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="store_dir: expected a directory path"):
        scores("")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    # chmod does not stop root: the check is made to see the directory as read-only instead.
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != read_only)
    with pytest.raises(ValueError, match="store_dir: .*not writable"):
        scores(read_only)


def test_stored_scores_equal_in_memory_scores(reference):
    assert torch.equal(reference, scores(None))
