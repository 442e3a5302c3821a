"""Seeded random projection of gradients, generated in blocks from a counter-based hash.

P[i, j] = s(hash(seed, i, j)) / sqrt(k), with s a Rademacher sign or a standard normal draw,
so E[<P^T x, P^T y>] = <x, y>. Entries are a pure function of (seed, row, column) computed
with exact integer arithmetic, so the matrix is the same on every device and for any blocking;
rows are produced ``block_rows`` at a time and the whole grad_dim x k matrix never has to exist.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch

_M32 = 0xFFFFFFFF
_KINDS = ("rademacher", "gaussian", "identity")
# A projection wider than the gradient gains nothing; beyond this size its matrix is refused.
_MAX_WASTED_BYTES = 2**30


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _key(values: torch.Tensor, salt: int) -> torch.Tensor:
    """Hash of 64-bit counters with a 32-bit salt, in [0, 2^32)."""
    low, high = values & _M32, values >> 32
    return _mix32(_mix32(low ^ salt) ^ _mix32(high + 0x9E3779B9))


def _bits_to_unit(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in (0, 1) from the top 24 bits of a 32-bit hash."""
    return ((h >> 8).to(torch.float64) + 0.5).div_(2.0**24).to(dtype)


def _signs32(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bit 31 of _mix32(rows[:, None] ^ cols[None, :]) as an int32 tensor that is negative exactly
    where the bit is set: the same finaliser in wrapping int32 arithmetic, in place, half the memory
    traffic of int64 (the low 32 bits of a product do not depend on the width; shifts are masked
    to be logical)."""
    x = rows.to(torch.int32)[:, None] ^ cols.to(torch.int32)[None, :]
    for shift, factor in ((16, 0x7FEB352D), (15, 0x846CA68B - 2**32)):
        x ^= (x >> shift) & ((1 << (32 - shift)) - 1)
        x *= factor
    x ^= (x >> 16) & 0xFFFF
    return x


def projection_block(
    seed: int, row_start: int, row_stop: int, k: int, kind: str, dtype: torch.dtype, device
) -> torch.Tensor:
    """Rows ``[row_start, row_stop)`` of the unscaled projection matrix, shape (rows, k)."""
    salt_row = int(_mix32(torch.tensor(seed & _M32)).item()) ^ ((seed >> 32) & _M32)
    rows = _key(torch.arange(row_start, row_stop, device=device, dtype=torch.int64), salt_row)
    cols = _key(torch.arange(k, device=device, dtype=torch.int64), salt_row ^ 0x5BD1E995)
    if kind == "rademacher":  # 1 - 2 * bit31, as (x >> 31) is -1 where the bit is set and 0 elsewhere
        return (_signs32(rows, cols) >> 31).mul_(2).add_(1).to(dtype)
    h = _mix32(rows[:, None] ^ cols[None, :])
    u1 = _bits_to_unit(h, torch.float64)
    u2 = _bits_to_unit(_mix32(h ^ 0x27D4EB2F), torch.float64)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


ShapeSpec = Union[int, Mapping[str, Sequence[int]], Sequence[Sequence[int]]]


class Projector:
    """Project per-example gradients to ``projection_dim`` dimensions: ``grads @ P``.

    ``grad_dim`` is an int, or the parameter shapes (``{name: shape}`` or a list of shapes) whose
    flattened, concatenated gradients form the rows. ``kind`` is "rademacher", "gaussian" or
    "identity" (no projection; ``projection_dim`` must be None or grad_dim). The same ``seed`` gives
    the same matrix on any device and for any batch size or chunking of the calls.
    Memory: one block of ``block_rows x projection_dim`` entries at a time, plus a cache of generated
    blocks up to ``cache_bytes`` (so small problems generate the matrix once). By default 512 MiB,
    or on a GPU a quarter of its free memory: there the whole matrix usually fits, and generating
    it again for every batch would cost far more than the products. A ``projection_dim`` above
    ``grad_dim`` whose matrix would exceed 1 GiB is refused (it adds no information), and
    ``project`` refuses NaN or inf gradients, naming the rows.

    Example::

        >>> proj = Projector({"fc.weight": (10, 64), "fc.bias": (10,)}, 512, seed=0)
        >>> features = proj.project(per_example_grads(model, fn, batch))   # (B, 512)
    """

    def __init__(
        self,
        grad_dim: ShapeSpec,
        projection_dim: Optional[int],
        *,
        kind: str = "rademacher",
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device, None] = None,
        block_rows: Optional[int] = None,
        cache_bytes: Optional[int] = None,
    ):
        if kind not in _KINDS:
            raise ValueError(f"kind: expected one of {_KINDS}; got {kind!r}.")
        self.names, self.sizes = _parse_shapes(grad_dim)
        self.grad_dim = sum(self.sizes)
        if kind == "identity":
            if projection_dim not in (None, self.grad_dim):
                raise ValueError(
                    f"projection_dim: the identity projector keeps all {self.grad_dim} dimensions; "
                    f"got {projection_dim!r}."
                )
            projection_dim = self.grad_dim
        if isinstance(projection_dim, bool) or not isinstance(projection_dim, int) or projection_dim <= 0:
            raise ValueError(f"projection_dim: expected a positive int; got {projection_dim!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int; got {seed!r}.")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating dtype; got {dtype}.")
        matrix_bytes = self.grad_dim * projection_dim * torch.finfo(dtype).bits // 8
        if projection_dim > self.grad_dim and matrix_bytes > _MAX_WASTED_BYTES:
            raise ValueError(
                f"projection_dim: {projection_dim} for gradients of dimension {self.grad_dim}: projecting to "
                f"more dimensions than the gradient has keeps no more information, and its matrix "
                f"({matrix_bytes / 2**30:.1f} GiB, generated again for every call beyond the cache) would take "
                f"minutes per batch. Expected projection_dim <= {self.grad_dim}, or kind='identity'."
            )
        self.projection_dim = projection_dim
        self.kind = kind
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        bytes_per_row = projection_dim * torch.finfo(dtype).bits // 8
        self.block_rows = block_rows or max(1, min(self.grad_dim, (32 * 2**20) // bytes_per_row))
        if cache_bytes is None:
            on_gpu = self.device.type == "cuda"
            cache_bytes = torch.cuda.mem_get_info(self.device)[0] // 4 if on_gpu else 512 * 2**20
        self.cache_bytes = cache_bytes
        self._cache: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._scale = 1.0 / math.sqrt(projection_dim)
        self._offsets = dict(zip(self.names, itertools.accumulate([0] + self.sizes))) if self.names else {}

    def __repr__(self) -> str:
        return (
            f"Projector(grad_dim={self.grad_dim}, projection_dim={self.projection_dim}, "
            f"kind={self.kind!r}, seed={self.seed})"
        )

    def block(self, index: int) -> torch.Tensor:
        """Block ``index`` of the scaled matrix: rows [index * block_rows, ...) x projection_dim."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        start = index * self.block_rows
        stop = min(start + self.block_rows, self.grad_dim)
        block = projection_block(self.seed, start, stop, self.projection_dim, self.kind, self.dtype, self.device)
        block.mul_(self._scale)
        nbytes = block.numel() * block.element_size()
        if nbytes <= self.cache_bytes:
            self._cache[index] = block
            while sum(b.numel() * b.element_size() for b in self._cache.values()) > self.cache_bytes:
                self._cache.popitem(last=False)
        return block

    def matrix(self) -> torch.Tensor:
        """The whole (grad_dim, projection_dim) matrix; for tests and small problems only."""
        if self.kind == "identity":
            return torch.eye(self.grad_dim, dtype=self.dtype, device=self.device)
        return torch.cat([self.block(i) for i in range(self._num_blocks())])

    def _num_blocks(self) -> int:
        return math.ceil(self.grad_dim / self.block_rows)

    def project(self, grads: Union[torch.Tensor, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """``(B, grad_dim)`` gradients, or a dict of per-parameter ``(B, *shape)`` gradients in the
        order of the shapes given, to ``(B, projection_dim)``. A dict is never concatenated whole:
        each block of rows gathers only its own slice of the parameters."""
        pieces = self._flat_pieces(grads)
        if self.kind == "identity":
            return torch.cat([p.to(self.device, self.dtype) for p in pieces], dim=1)
        batch = pieces[0].shape[0]
        out = torch.zeros(batch, self.projection_dim, dtype=self.dtype, device=self.device)
        offsets = [0]
        for p in pieces:
            offsets.append(offsets[-1] + p.shape[1])
        for index in range(self._num_blocks()):
            start = index * self.block_rows
            stop = min(start + self.block_rows, self.grad_dim)
            rows = _gather_rows(pieces, offsets, start, stop).to(self.device, self.dtype)
            out.addmm_(rows, self.block(index))
        return out

    def project_param(self, name: str, grads: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add one parameter's share of the projection to ``out`` in place and return it:
        ``out += grads.reshape(B, -1) @ P[rows of name]``, with the rows ``project`` uses for that
        parameter, so summing over all parameters gives ``project`` of the whole dict (up to the
        order of float additions). Parameters can go in as they are produced and the concatenated
        (B, grad_dim) matrix never exists. ``out`` may be of a wider dtype than the projector (a
        bfloat16 matrix with a float32 running sum)."""
        if self.names is None:
            raise ValueError(
                "name: this projector was built from an int grad_dim; build it from the parameter "
                "shapes ({name: shape}) to project one parameter at a time."
            )
        if name not in self._offsets:
            raise ValueError(f"name: expected one of the projector's parameters {self.names}; got {name!r}.")
        lo, size = self._offsets[name], self.sizes[self.names.index(name)]
        flat = grads.reshape(grads.shape[0], -1)
        if flat.shape[1] != size or out.dim() != 2 or out.shape != (flat.shape[0], self.projection_dim):
            raise ValueError(
                f"grads: {name!r} has {size} entries per example and out must be (B, {self.projection_dim}); "
                f"got grads {tuple(grads.shape)} and out {tuple(out.shape)}."
            )
        if self.kind == "identity":
            out[:, lo : lo + size] += flat.to(out.device, out.dtype)
            return out
        for index in range(lo // self.block_rows, (lo + size - 1) // self.block_rows + 1):
            start = index * self.block_rows
            first, last = max(start, lo), min(start + self.block_rows, lo + size)
            rows = self.block(index)[first - start : last - start]
            part = flat[:, first - lo : last - lo].to(self.device, rows.dtype)
            if out.dtype == rows.dtype:
                out.addmm_(part, rows)
            else:
                out.add_(part @ rows)
        return out

    def _flat_pieces(self, grads) -> list[torch.Tensor]:
        pieces = self._pieces(grads)
        finite = torch.stack([torch.isfinite(p).all(dim=1) for p in pieces]).all(dim=0)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"grads: NaN or inf in rows {bad[:20]}{' ...' if len(bad) > 20 else ''}; expected finite "
                "gradients (their projections would be NaN)."
            )
        return pieces

    def _pieces(self, grads) -> list[torch.Tensor]:
        if isinstance(grads, torch.Tensor):
            if grads.dim() != 2 or grads.shape[1] != self.grad_dim:
                raise ValueError(f"grads: expected shape (B, {self.grad_dim}); got {tuple(grads.shape)}.")
            return [grads]
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads: expected a Tensor or a dict of Tensors; got {type(grads).__name__}.")
        names = self.names if self.names is not None else list(grads.keys())
        if set(grads.keys()) != set(names):
            raise ValueError(f"grads: the projector was built for parameters {names}; got {list(grads.keys())}.")
        pieces = [grads[name].reshape(grads[name].shape[0], -1) for name in names]
        batch = {p.shape[0] for p in pieces}
        widths = [p.shape[1] for p in pieces]
        if len(batch) != 1 or sum(widths) != self.grad_dim or (self.names and widths != self.sizes):
            raise ValueError(
                f"grads: per-parameter widths {widths} with batch sizes {sorted(batch)}; "
                f"expected widths {self.sizes} and one batch size."
            )
        return pieces


def _gather_rows(pieces: list[torch.Tensor], offsets: list[int], start: int, stop: int) -> torch.Tensor:
    """Columns [start, stop) of the concatenation of ``pieces`` without concatenating all of them."""
    parts = []
    for piece, lo, hi in zip(pieces, offsets[:-1], offsets[1:]):
        if hi <= start or lo >= stop:
            continue
        parts.append(piece[:, max(start, lo) - lo : min(stop, hi) - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _parse_shapes(spec: ShapeSpec) -> tuple[Optional[list[str]], list[int]]:
    if isinstance(spec, bool):
        raise TypeError("grad_dim: expected an int or parameter shapes; got a bool.")
    if isinstance(spec, int):
        if spec <= 0:
            raise ValueError(f"grad_dim: expected a positive int; got {spec}.")
        return None, [spec]
    if isinstance(spec, Mapping):
        names, shapes = list(spec.keys()), list(spec.values())
    elif isinstance(spec, Sequence) and spec:
        names, shapes = None, list(spec)
    else:
        raise TypeError(f"grad_dim: expected an int, a dict of shapes or a list of shapes; got {spec!r}.")
    sizes = [math.prod(tuple(s)) for s in shapes]
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"grad_dim: every parameter shape must be non-empty; got {shapes}.")
    return names, sizes
