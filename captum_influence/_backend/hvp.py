"""Curvature of a summed loss without forming it: Hessian-vector products by ``torch.func``
(forward-over-reverse), the explicit Hessian in chunks of columns, and the Arnoldi iteration.

For a per-example function ``fn(model, *batch) -> Tensor[B]`` (a loss) and the selected
parameters theta, the batch's curvature is H = d^2 (sum_b fn_b) / d theta^2. One product is

    H v = jvp(grad(L), (theta,), (v,))          (forward-mode over reverse-mode)

about the cost of two backward passes, with no graph kept between calls. ``vmap`` over several
tangents gives a chunk of columns of H at once (``hessian_columns``), so an explicit Hessian is
built a bounded number of columns at a time. A model that forward-mode AD cannot run (an op with
no forward derivative) falls back, with a warning naming the error, to reverse-over-reverse
(``torch.autograd.grad`` twice), one tangent at a time.

``arnoldi`` runs the Arnoldi iteration (Lanczos for a symmetric H) on flat float64 vectors with
full re-orthogonalisation; its basis Q and the projected matrix T = Q^T H Q give Ritz pairs, the
top eigenpairs of H (Schioppa et al. 2022, "Scaling up influence functions").
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .._progress import progress
from .grads import _Call, check_per_example_output

OutputFn = Callable[..., torch.Tensor]


class ParamLayout:
    """The selected parameters as one flat vector: names, shapes and offsets, in model order."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        table = dict(model.named_parameters())
        self.names = list(names)
        self.shapes = {name: table[name].shape for name in self.names}
        self.sizes = {name: table[name].numel() for name in self.names}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name in self.names:
            self.offsets[name] = offset
            offset += self.sizes[name]
        self.dim = offset

    def slice(self, name: str) -> slice:
        return slice(self.offsets[name], self.offsets[name] + self.sizes[name])

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0, dtype=None) -> torch.Tensor:
        """``{name: (*batch, *shape)}`` as (*batch, dim), in layout order (missing names: zeros)."""
        ref = next(iter(tensors.values()))
        lead = tuple(ref.shape[:batch_dims])
        parts = [
            tensors[name].reshape(*lead, -1) if name in tensors else ref.new_zeros(*lead, self.sizes[name])
            for name in self.names
        ]
        out = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return out if dtype is None else out.to(dtype)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(*batch, dim) as ``{name: (*batch, *shape)}`` (views)."""
        lead = tuple(flat.shape[:-1])
        return {name: flat[..., self.slice(name)].reshape(*lead, *self.shapes[name]) for name in self.names}


class HessianVectorProducts:
    """Products with the Hessian of ``sum_b fn(model, *batch)[b]`` with respect to the parameters
    ``names`` (the other parameters and the buffers held fixed), batch by batch.

    ``hvp(batch, v)`` takes and returns flat vectors (dim,) in the parameters' dtype and device;
    ``hessian_columns(batch, basis)`` returns H @ basis.T for a chunk (c, dim) of tangents.
    """

    def __init__(self, model: nn.Module, fn: OutputFn, names: Sequence[str]):
        self.model = model
        self.fn = fn
        self.layout = ParamLayout(model, names)
        self._call = _Call(model, fn)
        self.forward_mode = True  # False once forward-mode AD failed: reverse-over-reverse

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        selected = set(self.layout.names)
        params = {name: p.detach() for name, p in self.model.named_parameters() if name in selected}
        frozen = {f"model.{name}": p.detach() for name, p in self.model.named_parameters() if name not in selected}
        frozen.update({f"model.{name}": b for name, b in self.model.named_buffers()})
        return params, frozen

    def _loss(self, frozen: dict, batch: tuple, n: int) -> Callable[[dict], torch.Tensor]:
        def loss(params: dict) -> torch.Tensor:
            state = {**frozen, **{f"model.{k}": v for k, v in params.items()}}
            return check_per_example_output(functional_call(self._call, state, tuple(batch)), n).sum()

        return loss

    def hessian_columns(self, batch: tuple, basis: torch.Tensor, n: int) -> torch.Tensor:
        """(c, dim): the products H e for each row e of ``basis`` (c, dim), vmapped over the rows."""
        params, frozen = self._state()
        basis = basis.to(device=next(iter(params.values())).device, dtype=next(iter(params.values())).dtype)
        if self.forward_mode:
            loss = self._loss(frozen, batch, n)

            def one(tangent: torch.Tensor) -> torch.Tensor:
                out = jvp(grad(loss), (params,), (self.layout.split(tangent),))[1]
                return self.layout.flatten(out)

            try:
                return vmap(one)(basis) if basis.shape[0] > 1 else one(basis[0])[None]
            except ValueError:
                raise
            except Exception as err:  # an op without a forward derivative or batching rule
                self.forward_mode = False
                warnings.warn(
                    f"Hessian-vector products: torch.func forward-over-reverse cannot run this model "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); using "
                    "reverse-over-reverse autograd, one vector at a time (slower, the same products)."
                )
        return torch.stack([self._reverse_hvp(batch, row, n) for row in basis])

    def _reverse_hvp(self, batch: tuple, v: torch.Tensor, n: int) -> torch.Tensor:
        """H v by double backward through the model itself (the fallback)."""
        table = dict(self.model.named_parameters())
        wrt = [table[name] for name in self.layout.names]
        frozen = [p for p in wrt if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            with torch.enable_grad():
                out = check_per_example_output(self.fn(self.model, *batch), n).sum()
                grads = torch.autograd.grad(out, wrt, create_graph=True, allow_unused=True)
                pairs = [
                    (g, t) for g, t in zip(grads, self.layout.split(v).values()) if g is not None and g.requires_grad
                ]
                if not pairs:
                    return torch.zeros_like(v)
                dot = torch.stack([(g * t).sum() for g, t in pairs]).sum()
                second = torch.autograd.grad(dot, wrt, allow_unused=True)
        finally:
            for p in frozen:
                p.requires_grad_(False)
        return self.layout.flatten(
            {name: s if s is not None else torch.zeros_like(p) for name, s, p in zip(self.layout.names, second, wrt)}
        )


def symmetric_eigh(matrix: torch.Tensor, single_thread_up_to: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on one thread for matrices of up to ``single_thread_up_to`` rows (and
    batches of small ones): LAPACK's threaded symmetric eigensolver is far slower there (measured
    on 2 cores: 129 rows 3 ms on one thread, 1.4 s on two; 2,410 rows 4 s against 11 s)."""
    if matrix.shape[-1] > single_thread_up_to or matrix.device.type != "cpu":
        return torch.linalg.eigh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)


def column_chunk(dim: int, budget: int = 2**24) -> int:
    """Columns of an explicit (dim x dim) Hessian per vmapped call: about ``budget`` tangent
    entries at a time, so that memory stays bounded whatever the number of parameters."""
    return max(1, min(dim, budget // max(dim, 1)))


def arnoldi(
    matmat: Callable[[torch.Tensor], torch.Tensor],
    start: torch.Tensor,
    dim: int,
    tol: float,
    *,
    show_progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (block) Arnoldi iteration from the rows of ``start`` (b, n) until the basis holds
    ``dim`` vectors, in float64 on ``start``'s device; ``matmat`` maps rows (c, n) to rows A x.

    Returns the orthonormal basis Q (m, n), m <= dim, and T = Q A Q^T (m, m) assembled from the
    recurrence coefficients and symmetrised (A is a Hessian: T is block tridiagonal up to
    rounding). With b = 1 this is the classic Arnoldi (Lanczos) iteration, one product per step;
    a block of b starting vectors makes b products per step, which ``vmap`` computes together.
    Each new block is orthogonalised twice against the whole basis ("twice is enough"), so Q stays
    orthonormal to rounding. A new direction whose norm, after orthogonalisation, is below ``tol``
    times the largest entry of T so far adds nothing (the subspace is invariant there): it is
    dropped, and the iteration ends when a whole block is dropped."""
    start = start.to(torch.float64)
    if start.dim() == 1:
        start = start[None]
    if not bool(torch.isfinite(start).all()) or float(start.norm()) == 0:
        raise ValueError("arnoldi: the starting vectors are zero or not finite.")
    q0, r0 = torch.linalg.qr(start.T)
    keep = r0.diagonal().abs() > 1e-12 * float(r0.diagonal().abs().max())
    block = q0[:, keep].T.contiguous()
    n = start.shape[1]
    basis = torch.empty(min(dim, n) + block.shape[0], n, dtype=torch.float64, device=start.device)
    t = torch.zeros(basis.shape[0], basis.shape[0], dtype=torch.float64)
    filled = block.shape[0]
    basis[:filled] = block
    done = 0  # basis vectors whose products are in T
    scale = 0.0
    bar = progress(total=min(dim, n), desc="Arnoldi iteration", show=show_progress)
    while done < min(dim, n) and done < filled:
        rows = basis[done:filled]
        w = matmat(rows).to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"arnoldi: a Hessian-vector product after {done} basis vectors is NaN or inf; the loss or "
                "the model's second derivatives overflow at this checkpoint."
            )
        q = basis[:filled]
        coef = q @ w.T
        w = w - coef.T @ q
        again = q @ w.T  # the second pass removes what rounding left of the first
        w = w - again.T @ q
        cols = slice(done, filled)
        t[:filled, cols] = (coef + again).cpu()
        scale = max(scale, float(t[:filled, cols].abs().max()))
        # The new directions: left singular vectors of what is left, w^T = U S V^T, so that
        # A x = ... + U (S V^T); directions of singular value below tol are dropped.
        left, singular, right_t = torch.linalg.svd(w.T, full_matrices=False)
        strong = singular > tol * max(scale, torch.finfo(torch.float64).tiny)
        count = min(int(strong.sum()), basis.shape[0] - filled)
        step = filled - done
        done = filled
        bar.update(step)
        if count == 0:
            break
        t[filled : filled + count, cols] = (singular[:count, None] * right_t[:count]).cpu()
        basis[filled : filled + count] = left[:, :count].T
        filled += count
    bar.close()
    m = min(done, dim)
    tm = t[:m, :m]
    return basis[:m], (tm + tm.T) / 2


def ritz_pairs(basis: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values (ascending) and Ritz vectors (n, m), the columns of Q^T Y for T = Y diag Y^T."""
    values, vectors = symmetric_eigh(t)
    return values, basis.T @ vectors.to(basis.device)
