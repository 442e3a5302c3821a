"""On-disk feature store: memory-mapped arrays, their settings, and per-batch progress.

A store directory holds ``metadata.json`` (the store format, the settings that produced it, and
the size and SHA-256 of every finished file), ``NAME.npy`` arrays (numpy memmaps), ``NAME.done.npy``
flags, one per batch, set only after the batch's rows are flushed, and ``NAME.pt`` tensors.

Every file appears under its final name only once it is complete (written under a temporary
name, fsynced, renamed), so a killed job leaves either no file or a whole one. An array being
filled is resumable: a rerun with the same settings skips the finished batches; once every batch
is done its checksum is recorded. On open, a file that is empty, of the wrong size, fails its
checksum or (where asked) holds NaN or inf is damaged: its work is redone with a warning, or, for
``metadata.json``, the store is refused. A store written with other settings, or a directory with
files but no ``metadata.json``, is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import re
import socket
import uuid
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from .._progress import progress

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: metadata updates are not locked
    fcntl = None  # type: ignore[assignment]

# Raised when the layout or meaning of the files changes; a store of another format is refused.
STORE_FORMAT = 2
_METADATA = "metadata.json"
_LOCK = ".lock"
_CHUNK = 1 << 24
_TEMPORARY = re.compile(r"-(?P<pid>\d+)-[0-9a-f]{32}\.tmp$")


def _normalise(metadata: dict) -> dict:
    return json.loads(json.dumps(metadata, sort_keys=True, default=str))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    # A temporary name of its own, so that processes writing the same file (ranks of one job
    # saving the same metadata) never move each other's half-written file into place.
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)


def _remove_dead_temporaries(directory: Path) -> None:
    """Delete the temporaries left by killed writers of this host (their process is gone)."""
    host = socket.gethostname()
    for file in directory.glob("*.tmp"):
        match = _TEMPORARY.search(file.name)
        if match is None or f".{host}-{match['pid']}-" not in file.name:
            continue
        try:
            os.kill(int(match["pid"]), 0)
        except ProcessLookupError:
            file.unlink(missing_ok=True)
        except OSError:
            pass


def _is_transient(name: str) -> bool:
    """Files of ours that hold no results: the lock and temporaries of killed writers."""
    return name == _LOCK or name.endswith(".tmp")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _update_digest(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"array {value.dtype} {value.shape};".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):  # dicts and tokenizers' encodings
        h.update(f"mapping {len(value)};".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _update_digest(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _update_digest(h, item)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def data_fingerprint(loader: Any) -> dict:
    """SHA-256 over every example's tensors (inputs and labels) of a fixed-order loader: the
    dataset's tensors directly for a ``TensorDataset``, else one pass over the loader's batches
    (so the data must load the same way each time: no random augmentation)."""
    h = hashlib.sha256()
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, torch.utils.data.TensorDataset):
        _update_digest(h, list(dataset.tensors))
        return {"n": len(dataset), "tensors_sha256": h.hexdigest()}
    n = 0
    for batch in loader:
        batch = tuple(batch)
        _update_digest(h, batch)
        n += len(batch[-1])
    return {"n": n, "batches_sha256": h.hexdigest()}


def _module_source(module: torch.nn.Module) -> Optional[str]:
    """A digest of the ``forward`` source of a module class defined outside torch, whose
    functional calls (``F.relu`` against ``torch.tanh``) the module list cannot show."""
    cls = type(module)
    if cls.__module__.startswith("torch."):
        return None
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(cls.forward).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


def model_fingerprint(model: torch.nn.Module) -> list:
    """The model's architecture: every module's path, class and settings (``extra_repr``), with
    the ``forward`` source of classes defined outside torch, and every parameter's shape and dtype."""
    modules = []
    for name, module in model.named_modules():
        cls = type(module)
        entry = [name, f"{cls.__module__}.{cls.__qualname__}", module.extra_repr()]
        source = _module_source(module)
        if source is not None:
            entry.append(source)
        modules.append(entry)
    params = [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters()]
    return [modules, params]


def _metadata_digest(stored: dict) -> str:
    content = {k: v for k, v in stored.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _damaged(file: Path, why: str) -> str:
    return f"store_dir: {str(file)!r} is damaged ({why}); delete it or use another store_dir."


def _npy_damage(file: Path, shape: tuple, dtype: np.dtype) -> Optional[str]:
    """Why ``file`` is not a whole .npy array (None if it is one); raises on another shape."""
    size = file.stat().st_size
    if size == 0:
        return "empty file"
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                return f"unknown .npy version {version}"
            stored_shape, fortran, stored_dtype = read[version](f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, EOFError) as err:
        return f"not a .npy array: {err}"
    if fortran or tuple(stored_shape) != tuple(shape) or stored_dtype != np.dtype(dtype):
        raise ValueError(
            f"store_dir: array {file.stem!r} has shape {tuple(stored_shape)} {stored_dtype}; "
            f"expected {tuple(shape)} {np.dtype(dtype)}."
        )
    expected = offset + math.prod(shape) * np.dtype(dtype).itemsize
    if size != expected:
        return f"{size} bytes, expected {expected}: truncated or extended"
    return None


class FeatureStore:
    """A directory of arrays and tensors tied to the settings in ``metadata``."""

    def __init__(self, path: Union[str, os.PathLike], metadata: dict):
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise ValueError(f"store_dir: expected a directory path (or None for no store); got {path!r}.")
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"store_dir: cannot create {str(self.path)!r}: {err}.") from err
        if not os.access(self.path, os.R_OK | os.W_OK | os.X_OK):
            raise ValueError(f"store_dir: {str(self.path)!r} is not writable; pass a directory this process can write.")
        self.metadata = _normalise(metadata)
        with self._locked():
            _remove_dead_temporaries(self.path)
            stored = self._read_metadata()
            if stored is None:
                held = sorted(p.name for p in self.path.iterdir() if not _is_transient(p.name))
                if held:
                    raise ValueError(
                        f"store_dir: {str(self.path)!r} holds files "
                        f"({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}) "
                        f"but no {_METADATA}: it is not a feature store (or its metadata was deleted), so what it "
                        "holds cannot be trusted. Use an empty directory or delete these files."
                    )
                self._write_metadata({"format": STORE_FORMAT, "settings": self.metadata, "files": {}})
                return
        settings = stored["settings"]
        differing = sorted(k for k in set(settings) | set(self.metadata) if settings.get(k) != self.metadata.get(k))
        if differing:
            details = "; ".join(
                f"{k}: stored {settings.get(k)!r:.300}, now {self.metadata.get(k)!r:.300}" for k in differing
            )
            raise ValueError(
                f"store_dir: {str(self.path)!r} was written with other settings ({details}). "
                "Use another store_dir or delete this one."
            )

    # --- metadata and file records ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive access to ``metadata.json`` among the processes sharing the store."""
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(self.path / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ValueError(f"store_dir: cannot write in {str(self.path)!r}: {err}.") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_metadata(self) -> Optional[dict]:
        file = self.path / _METADATA
        try:
            text = file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            stored = json.loads(text.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(_damaged(file, f"not valid JSON: {err}")) from err
        if (
            not isinstance(stored, dict)
            or not isinstance(stored.get("settings"), dict)
            or not isinstance(stored.get("files"), dict)
        ):
            if isinstance(stored, dict) and "format" not in stored:
                raise ValueError(
                    f"store_dir: {str(self.path)!r} was written by an older version (no store format); "
                    "use another store_dir or delete this one."
                )
            raise ValueError(_damaged(file, "not a store's metadata"))
        if stored.get("format") != STORE_FORMAT:
            raise ValueError(
                f"store_dir: {str(self.path)!r} was written in store format {stored.get('format')!r}; this version "
                f"reads format {STORE_FORMAT}. Use another store_dir or delete this one."
            )
        if stored.get("sha256") != _metadata_digest(stored):
            raise ValueError(_damaged(file, "checksum mismatch"))
        return stored

    def _write_metadata(self, stored: dict) -> None:
        stored = {**stored, "sha256": _metadata_digest(stored)}
        try:
            _atomic_write(
                self.path / _METADATA, lambda p: Path(p).write_text(json.dumps(stored, indent=1, sort_keys=True))
            )
        except PermissionError as err:
            raise ValueError(f"store_dir: cannot write in {str(self.path)!r}: {err}.") from err

    def _records(self) -> dict:
        stored = self._read_metadata()
        return stored["files"] if stored is not None else {}

    def _set_record(self, file: str, record: Optional[dict]) -> None:
        with self._locked():
            stored = self._read_metadata()
            if stored is None:
                raise ValueError(_damaged(self.path / _METADATA, "deleted while the store was in use"))
            if record is None:
                stored["files"].pop(file, None)
            else:
                stored["files"][file] = record
            self._write_metadata(stored)

    def _record(self, file: Path) -> None:
        self._set_record(file.name, {"size": file.stat().st_size, "sha256": file_digest(file)})

    def _check(self, file: Path, record: dict, finite: bool = False) -> Optional[str]:
        """Why a finished file does not match its record (None if it does)."""
        if not file.exists():
            return "missing"
        size = file.stat().st_size
        if size != record["size"]:
            return f"{size} bytes, expected {record['size']}"
        if file_digest(file) != record["sha256"]:
            return "checksum mismatch"
        if finite and file.suffix == ".npy":
            arr = np.load(file, mmap_mode="r")
            for start in range(0, arr.shape[0] if arr.ndim else 0, 4096):
                if not np.isfinite(arr[start : start + 4096]).all():
                    return "NaN or inf values"
        return None

    def _discard(self, name: str, why: str) -> None:
        """Remove array ``name`` (and its flags: its work is redone), warning why."""
        warnings.warn(f"store_dir: {str(self.path / f'{name}.npy')!r} is damaged ({why}); its rows are computed again.")
        stems = [name] if name.endswith(".done") else [name, f"{name}.done", f"{name}.sums"]
        for stem in stems:
            (self.path / f"{stem}.npy").unlink(missing_ok=True)
            self._set_record(f"{stem}.npy", None)
        if name.endswith(".done"):  # its array's rows are all rewritten: no longer finished
            self._set_record(f"{name[: -len('.done')]}.npy", None)

    # --- arrays -------------------------------------------------------------------------------

    def array(self, name: str, shape: tuple, dtype=np.float32, *, finite: bool = False) -> np.memmap:
        """The array ``name`` of ``shape``, created zero-filled or reopened for update. A damaged
        file is removed (with its flags) and created anew; ``finite``: NaN or inf in a finished
        array is damage too."""
        file = self.path / f"{name}.npy"
        record = self._records().get(file.name)
        if record is not None:
            why = self._check(file, record, finite)
            if why is None:
                why = _npy_damage(file, shape, dtype)
        elif file.exists():
            why = _npy_damage(file, shape, dtype)
        else:
            why = None
        if why is not None:
            self._discard(name, why)
        if file.exists():
            return np.load(file, mmap_mode="r+")

        def create(tmp: str) -> None:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            arr.flush()
            del arr

        try:
            _atomic_write(file, create)
        except PermissionError as err:
            raise ValueError(f"store_dir: cannot write in {str(self.path)!r}: {err}.") from err
        return np.load(file, mmap_mode="r+")

    def flags(self, name: str, count: int) -> np.memmap:
        """Per-batch completion flags of ``name``."""
        return self.array(f"{name}.done", (count,), np.uint8)

    def finish(self, name: str) -> None:
        """Record the size and checksum of array ``name`` and its flags once every batch is done
        (a no-op for one already recorded)."""
        records = self._records()
        for stem in (name, f"{name}.done", f"{name}.sums"):
            file = self.path / f"{stem}.npy"
            if file.name not in records and file.exists():
                self._record(file)

    def unfinish(self, name: str) -> None:
        """Forget array ``name``'s checksum before rows of it are written again."""
        if f"{name}.npy" in self._records():
            self._set_record(f"{name}.npy", None)

    # --- tensors ------------------------------------------------------------------------------

    def save_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (moved to the CPU) as ``name.pt``, atomically, and record its checksum."""
        file = self.path / f"{name}.pt"
        try:
            _atomic_write(file, lambda p: torch.save(tensor.cpu(), p))
        except PermissionError as err:
            raise ValueError(f"store_dir: cannot write in {str(self.path)!r}: {err}.") from err
        self._record(file)

    def load_tensor(self, name: str) -> Optional[torch.Tensor]:
        """The tensor ``name``, or None when it was never finished or is damaged (with a warning:
        the caller computes it again)."""
        file = self.path / f"{name}.pt"
        record = self._records().get(file.name)
        if record is None:
            return None  # never recorded: a writer was killed before finishing it
        why = self._check(file, record)
        if why is None:
            try:
                return torch.load(file, weights_only=True)
            except Exception as err:  # the bytes match the record, yet torch cannot read them
                why = f"unreadable: {err}"
        warnings.warn(f"store_dir: {str(file)!r} is damaged ({why}); it is computed again.")
        file.unlink(missing_ok=True)
        self._set_record(file.name, None)
        return None


def release_pages(block: np.ndarray) -> None:
    """Drop a memory-mapped block's pages from this process's resident memory once it has been
    read or written. The page cache keeps them (the store's mappings are shared, so nothing is
    lost and a later read sees the same bytes); reading a large store block by block then holds
    about one block resident instead of the whole file. A no-op for other arrays or platforms."""
    mapping = getattr(block, "_mmap", None)
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or block.size == 0:
        return
    low, high = np.lib.array_utils.byte_bounds(block)
    base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    page = mmap.PAGESIZE
    start, stop = -(-(low - base) // page) * page, (high - base) // page * page  # whole pages inside
    if stop > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _rows_checksum(block: np.ndarray) -> int:
    """CRC-32 of a block of rows, plus one (0 marks a batch without a checksum)."""
    return zlib.crc32(np.ascontiguousarray(block).tobytes()) + 1


def _recheck_batches(
    out: np.ndarray, done: np.memmap, sums: np.ndarray, indices: range, store: FeatureStore, name: str
) -> None:
    """Before resuming an unfinished array: a finished batch whose rows no longer match their
    checksum (flipped bytes, rows zeroed) is marked unfinished, so that only it is computed again."""
    if done.all() and name + ".npy" in store._records():
        return  # finished and recorded: the whole file's checksum was checked on open
    damaged = []
    for index in indices:
        if not done[index]:
            continue
        start, stop, checksum = (int(v) for v in sums[index])
        if checksum == 0 or stop > out.shape[0] or _rows_checksum(out[start:stop]) != checksum:
            done[index] = 0
            damaged.append(index)
    if damaged:
        done.flush()
        store.unfinish(name)
        warnings.warn(
            f"store_dir: batches {damaged[:20]}{' ...' if len(damaged) > 20 else ''} of "
            f"{str(store.path / (name + '.npy'))!r} do not match their checksums; they are computed again."
        )


def fill_rows(
    batches: Iterable[tuple[int, Any]],
    compute: Callable[[Any], torch.Tensor],
    *,
    n_rows: int,
    dim: int,
    n_batches: int,
    store: Optional[FeatureStore] = None,
    name: str = "features",
    dtype: torch.dtype = torch.float32,
    show_progress: bool = False,
    desc: str = "featurising",
    indices: Optional[range] = None,
) -> Union[torch.Tensor, np.memmap]:
    """Rows ``compute(batch)`` written at each batch's ``start``: a tensor, or with ``store`` a memmap
    whose finished batches are skipped on a rerun (byte-identical to an uninterrupted run).

    ``indices``: the batch numbers (out of ``n_batches``) of the batches given, when they are one
    shard of the loader (default: all of them, in order); rows of other batches stay zero."""
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    indices = range(n_batches) if indices is None else indices
    if store is None:
        tensor = torch.zeros(n_rows, dim, dtype=dtype)
    else:
        mapped = store.array(name, (n_rows, dim), np_dtype)
        done = store.flags(name, n_batches)
        sums = store.array(f"{name}.sums", (n_batches, 3), np.uint64)
        _recheck_batches(mapped, done, sums, indices, store, name)
    bar = progress(total=len(indices), desc=desc, show=show_progress)
    for index, (start, batch) in zip(indices, batches):
        if store is not None and done[index]:
            bar.update()
            continue
        rows = compute(batch).detach().to("cpu", dtype)
        if store is None:
            tensor[start : start + rows.shape[0]] = rows
        else:
            mapped[start : start + rows.shape[0]] = rows.numpy()
            mapped.flush()
            # The batch's rows and their checksum are on disk before its flag: a kill in between
            # leaves the batch unfinished, and rows damaged later are found on resume.
            sums[index] = (start, start + rows.shape[0], _rows_checksum(mapped[start : start + rows.shape[0]]))
            sums.flush()
            release_pages(mapped[start : start + rows.shape[0]])
            done[index] = 1
            done.flush()
        bar.update()
    bar.close()
    if store is None:
        return tensor
    if len(indices) == n_batches and done.all():
        store.finish(name)
    return mapped
