r"""EK-FAC influence functions (Grosse et al. 2023, George et al. 2018) on the shared engine.

tau(z, z_i) = grad L_test(z)^T (G_hat + lambda)^{-1} grad L(z_i), with G_hat a block-diagonal
approximation of the Gauss-Newton matrix of the training loss summed over the Hessian examples:
one block per layer,

* Linear, transformers' Conv1D (GPT-2) and Conv2d (groups 1): eigenvalue-corrected Kronecker
  factors (``_backend/kfac.py``).
  A = sum a a^T of the layer inputs (unfolded patches for convolutions, a 1 appended for the
  bias) at the positions whose output gradient is nonzero for some probe (the others add nothing
  to the block), and S = sum d d^T of the output gradients of the Gauss-Newton probes
  (``_backend/hvp_gauss_newton.py``: for each example the columns u of Lambda^{1/2}, the loss's
  output Hessian, so that sum over probes of (J^T u)(J^T u)^T is that example's exact
  Gauss-Newton matrix: no sampled labels), recorded by the engine's layer hooks in one forward
  and one backward per probe; the eigenvalues in the Kronecker eigenbasis Q_S x Q_A are then
  replaced by the exact diagonal of the block in that basis (a second pass).
* every other selected parameter (norm layers, embeddings, a Linear whose weight is used outside
  its forward, a grouped convolution, custom modules): the documented fallback is the diagonal
  of its Gauss-Newton block, one block per module: EK-FAC with the identity as eigenbasis, from
  the engine's per-example gradients of the probes.

Each example's embedding is psi(z) = [(Q_S^T G(z) Q_A) / sqrt(Lambda + lambda_l)] over the
blocks (G(z) the example's gradient as an out x in' matrix), so the scores and the
self-influence are dot products of psi: two rotations per layer and a division, never a p x p
matrix.

**damping="auto"**, per layer: the rule of :mod:`captum_influence.influence_functions` in the
layer's Kronecker eigenbasis, lambda_l = sum_{i,jk} c_ijk^2 / sum_{i,jk} c_ijk with c_ijk =
sum over probes of (Q_S^T G_i Q_A)_jk^2, the curvature that example i contributes along
coordinate jk (for the fallback blocks, along each parameter): one example's worth of curvature
along one direction of the basis the layer is inverted in. Both sums come from the eigenvalue
correction pass (sum_i c_ijk is the corrected eigenvalue; with one position per example,
c_ijk = sigma_ij alpha_ik and sum_jk c_ijk^2 = |sigma_i|^2 |alpha_i|^2, so nothing of size
B x out x in' is formed). The Kronecker basis spreads an example's curvature over more
coordinates than the exact eigenbasis does, so the rule gives a smaller damping than for the
exact influence function (about 0.2 to 0.7 of tr(G_l) / n against 0.6 to 1.1 on the digits MLPs),
in the direction of EK-FAC's LDS optimum (about 0.1 of tr(G_l) / n there), though not all the way.
Measured in benchmarks/influence_functions.py (64-128-10 digits MLP, three models): LDS 0.49 +-
0.04 with the defaults, against 0.48 for kronfluence's EK-FAC at its best damping factor and 0.36
at its default; the best per-layer damping found by a sweep on the ground truth adds about 0.02
(two of the three models). The exact influence function reaches 0.59 there; the Kronecker
eigenbasis, not the block-diagonal structure, costs most of the difference (on a ReLU variant of
that MLP, one model: exact per-layer Gauss-Newton blocks 0.66, the Kronecker eigenbasis at its
best damping 0.56).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ._backend import LayerGrads
from ._backend.grads import slice_batch
from ._backend.kfac import DiagonalBlock, KroneckerBlock, grad_matrix, kronecker_unsupported, layer_factors
from ._backend.layer_calls import record_calls
from ._checkpoints import LoadFunc
from ._data import to_device
from .influence_functions import LossFn, _check_reg, _CurvatureInfluence
from .tracin import _check_flag
from .trak import _check_seed

# Per-example eigenbasis gradients (B x out x in' floats) materialised at a time for layers seen at
# several positions; fewer examples per step beyond it.
_SHARE_BUDGET = 2**24


@dataclass
class _KFACSolve:
    """The fitted blocks; ``embed`` maps per-example gradients to psi."""

    kron: list[KroneckerBlock]
    diag: list[DiagonalBlock]
    damping: dict = field(default_factory=dict)  # block path -> lambda

    @property
    def dim(self) -> int:
        return sum(b.eigenvalues.numel() for b in self.kron) + sum(b.diagonal.numel() for b in self.diag)

    def embed(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for block in self.kron:
            g = grad_matrix(block.module, {attr: grads[name] for attr, name in block.names.items()})
            rotated = block.rotate(g) / (block.eigenvalues.to(g.device) + block.damping).sqrt()
            parts.append(rotated.reshape(rotated.shape[0], -1))
        for fallback in self.diag:
            flat = torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in fallback.names], 1)
            parts.append(flat.to(torch.float64) / (fallback.diagonal.to(flat.device) + fallback.damping).sqrt())
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class EKFACInfluence(_CurvatureInfluence):
    r"""Influence functions with an eigenvalue-corrected Kronecker-factored Gauss-Newton matrix.

    See the module docstring for the method. The scores are
    ``grad L_test(z)^T (G_hat + lambda)^{-1} grad L(z_i)`` (positive: upweighting z_i lowers the test
    loss, as Captum's influence functions), the Gauss-Newton matrix summed over
    ``hessian_dataset`` (default the training set).

    Args:
        model, train_dataset, checkpoint, checkpoints_load_func, layers, loss_fn, test_loss_fn,
            hessian_dataset, batch_size, task, device, show_progress, timeout: as in
            :class:`~captum_influence.NaiveInfluenceFunction` (one checkpoint, None for the model's
            weights now; ``loss_fn`` in TracIn's forms or ``task`` in TRAK's).
        damping: "auto" (default: per layer, one example's worth of curvature along one direction
            of the layer's eigenbasis, see the module docstring) or a float lambda >= 0 for every
            layer.
        eigenvalue_correction: True (EK-FAC) or False (K-FAC: the eigenvalues of the Kronecker
            product; with a float damping one pass over the Hessian examples fewer, with "auto"
            the second pass still runs for the damping).
        store_dir: directory for the factors, eigenbases, corrected eigenvalues and the training
            embeddings (memory-mapped), tied to the model, data, checkpoint, loss and settings as
            TRAK's store is: a killed run resumes there (finished passes and finished batches of
            embeddings are not redone), and a store made with other settings is refused. Under
            ``torch.distributed`` each rank accumulates the factors of its share of the Hessian
            batches (summed by all-reduce) and embeds its share of the training set into the
            store, which all ranks must share.
        seed: seeds the Gaussian sketch of the probes for outputs of more than 32 dimensions.

    ``compute_intermediate_quantities`` returns psi (n, p); ``self_influence`` |psi|^2;
    ``damping_`` the damping used (a dict by layer); ``blocks`` the fitted blocks.

    Example::

        >>> ekfac = EKFACInfluence(model, train_set, "model.pt")
        >>> scores = ekfac.influence((x_test, y_test))         # (n_test, n_train)
    """

    _method = "EK-FAC influence function"

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Union[Dataset, DataLoader],
        checkpoint: Any = None,
        checkpoints_load_func: Optional[LoadFunc] = None,
        *,
        layers: Any = None,
        loss_fn: Optional[LossFn] = None,
        test_loss_fn: Optional[LossFn] = None,
        task: Any = None,
        hessian_dataset: Optional[Union[Dataset, DataLoader]] = None,
        damping: Union[float, str] = "auto",
        eigenvalue_correction: bool = True,
        batch_size: int = 64,
        device: Union[str, torch.device, None] = None,
        store_dir: Union[str, os.PathLike, None] = None,
        seed: int = 0,
        show_progress: bool = False,
        timeout: Optional[float] = None,
    ):
        super().__init__(
            model,
            train_dataset,
            checkpoint,
            checkpoints_load_func,
            layers=layers,
            loss_fn=loss_fn,
            batch_size=batch_size,
            hessian_dataset=hessian_dataset,
            test_loss_fn=test_loss_fn,
            sample_wise_grads_per_batch=False,
            task=task,
            device=device,
            store_dir=store_dir,
            show_progress=show_progress,
            timeout=timeout,
        )
        self.damping = _check_reg(damping, "damping")
        self.eigenvalue_correction = _check_flag(eigenvalue_correction, "eigenvalue_correction")
        self.seed = _check_seed(seed)
        self._diag_engine: Optional[LayerGrads] = None
        self._open_store()

    def _settings(self) -> dict:
        return {"damping": self.damping, "eigenvalue_correction": self.eigenvalue_correction, "seed": self.seed}

    @property
    def blocks(self) -> Optional[_KFACSolve]:
        """The fitted blocks (after the first call): ``.kron`` (Kronecker) and ``.diag`` (fallback)."""
        return self._solve

    # --- blocks ------------------------------------------------------------------------------

    def _make_blocks(self) -> tuple[list[KroneckerBlock], list[DiagonalBlock]]:
        """Kronecker blocks for the Linear, Conv1D and Conv2d layers whose parameters are all
        selected and computed by the engine's hooks alone (after its check), diagonal blocks for
        the rest."""
        first = to_device(tuple(next(iter(self.hessian_loader))), self.device)
        arg = self._hessian_arg
        self._check_forward(self.objective.train_loss, first, 0, arg)
        self._engine.check(self.objective.train_loss, first)
        selected = set(self.param_names)
        name_of = {id(p): name for name, p in self.model.named_parameters()}
        kron: list[KroneckerBlock] = []
        covered: set = set()
        owner: dict[str, str] = {}
        for path, module in self.model.named_modules():
            own = {attr: name_of[id(p)] for attr, p in module.named_parameters(recurse=False)}
            for name in own.values():
                owner.setdefault(name, path)
            if (
                own
                and kronecker_unsupported(module) is None
                and set(own.values()) <= selected
                and not set(own.values()) & covered
                and self._engine.hooks_cover(module)
                and not set(own.values()) & self._engine.used_outside
            ):
                kron.append(KroneckerBlock(path, module, own))
                covered.update(own.values())
        groups: dict[str, list[str]] = {}
        for name in self.param_names:
            if name not in covered:
                groups.setdefault(owner.get(name, name), []).append(name)
        sizes = {name: p.numel() for name, p in self.model.named_parameters()}
        diag = [DiagonalBlock(path, names, sum(sizes[n] for n in names)) for path, names in groups.items()]
        if diag:
            self._diag_engine = LayerGrads(self.model, [n for fallback in diag for n in fallback.names])
        return kron, diag

    # --- the passes over the Hessian examples ---------------------------------------------------

    def _chunks(self, batch: tuple) -> Iterator[tuple]:
        """The batch, or each of its examples alone once the engine found the forward coupling them."""
        if not self._engine.coupled:
            yield batch
            return
        for b in range(len(batch[-1])):
            yield slice_batch(batch, b, b + 1)

    def _probe_pass(self, kron: list[KroneckerBlock], diag: list[DiagonalBlock], correct: bool, desc: str) -> None:
        """One pass over this rank's Hessian batches, summed over the ranks afterwards: the factors
        A, S and the diagonal blocks (``correct=False``), or in the Kronecker eigenbases the
        corrected eigenvalues and the curvature shares of the "auto" damping (``correct=True``).

        One forward records every Kronecker layer's input; one backward, vmapped over the probes
        (``is_grads_batched``), gives every layer's output gradient for every probe."""
        modules = [block.module for block in kron]
        by_module = {id(block.module): block for block in kron}
        arg = self._hessian_arg
        if correct:
            for block in kron:
                block.eigenvalues = torch.zeros_like(block.eigenvalues)
                block.share = 0.0
        for start, batch in self._hessian_batches(desc):
            self._check_forward(self.objective.train_loss, batch, start, arg)
            for chunk in self._chunks(batch):
                probes = self._probes(chunk, self.seed + start)
                n = len(chunk[-1])
                if modules:
                    self._kronecker_chunk(chunk, n, probes, modules, by_module, correct)
                if diag and not correct:
                    self._diagonal_chunk(chunk, n, probes, diag)
        # Sum over the ranks (a no-op in one process); blocks a rank never saw hold zeros.
        for block in kron:
            if correct:
                block.eigenvalues = self._sum_over_ranks(block.eigenvalues.cpu())
                block.share = float(self._sum_over_ranks(torch.tensor([block.share], dtype=torch.float64)))
            else:
                block.a_cov = self._sum_over_ranks(block.a_cov.cpu())
                block.s_cov = self._sum_over_ranks(block.s_cov.cpu())
                block.positions = int(self._sum_over_ranks(torch.tensor([float(block.positions)], dtype=torch.float64)))
        for fallback in diag:
            if not correct:
                fallback.diagonal = self._sum_over_ranks(fallback.diagonal.cpu())
                fallback.share = float(self._sum_over_ranks(torch.tensor([fallback.share], dtype=torch.float64)))

    def _diagonal_chunk(self, chunk: tuple, n: int, probes: torch.Tensor, diag: list[DiagonalBlock]) -> None:
        """The fallback blocks' per-example curvature (squared probe gradients summed over the probes)."""
        assert self._diag_engine is not None
        curvature: dict[int, torch.Tensor] = {}
        for c in range(probes.shape[2]):
            grads = self._diag_engine.collect(self._probe_fn, (*chunk, probes[:, :, c])).grads
            for fallback in diag:
                flat = torch.cat([grads[name].reshape(n, -1) for name in fallback.names], 1).to(torch.float64)
                square = flat.pow(2)
                curvature[id(fallback)] = curvature[id(fallback)] + square if id(fallback) in curvature else square
        for fallback in diag:
            fallback.accumulate(curvature[id(fallback)])

    def _kronecker_chunk(
        self, chunk: tuple, n: int, probes: torch.Tensor, modules: list, by_module: dict, correct: bool
    ) -> None:
        held: list[torch.Tensor] = []

        def fn(model: nn.Module, *b: Any) -> torch.Tensor:
            y = self.objective.output(model, b)
            held.append(y)
            return (y * probes[:, :, 0]).sum(-1)

        _, records = record_calls(self.model, fn, chunk, n, modules)
        y = held[-1]
        r = probes.shape[2]
        found: Sequence[Optional[torch.Tensor]] = [None] * len(records)
        if y.requires_grad:
            found = torch.autograd.grad(
                y,
                [rec.edge for rec in records],
                probes.permute(2, 0, 1).to(y.dtype),
                is_grads_batched=True,
                allow_unused=True,
            )
        parts: dict[int, list] = {}
        for rec, d in zip(records, found):
            if d is None:
                continue
            # (r, B, ...) -> factors of every probe at once: A (B, T, in'), D (r, B, T, out)
            a, _ = layer_factors(rec.module, rec.value, d[0])
            ds = torch.stack([layer_factors(rec.module, rec.value, d[c])[1] for c in range(r)])
            parts.setdefault(id(rec.module), []).append((a, ds))
        for key, pieces in parts.items():
            block = by_module[key]
            a = torch.cat([p[0] for p in pieces], 1)
            ds = torch.cat([p[1] for p in pieces], 2)
            if not correct:
                # A counts only the positions whose output gradient is nonzero for some probe: the
                # others (a sequence classifier's head at the tokens it does not read, padding the
                # loss ignores) add nothing to the block, and would turn A's eigenbasis away from
                # the inputs that do.
                active = a[ds.ne(0).any(dim=-1).any(dim=0)]
                for c in range(r):
                    block.accumulate(active, ds[c], with_a=c == 0)
                continue
            a_rot = a.to(torch.float64) @ block.qa.to(a.device)
            d_rot = ds.to(torch.float64) @ block.qs.to(ds.device)
            if a.shape[1] == 1:  # one position: c_b = outer(sum_probes d_rot^2, a_rot^2)
                sigma = d_rot[:, :, 0].pow(2).sum(0)  # (B, out)
                alpha = a_rot[:, 0].pow(2)  # (B, in')
                block.eigenvalues += (sigma.T @ alpha).to(block.eigenvalues.device)
                block.share += float((sigma.pow(2).sum(1) * alpha.pow(2).sum(1)).sum())
                continue
            step = max(1, _SHARE_BUDGET // max(1, block.eigenvalues.numel()))
            for lo in range(0, n, step):
                share = (d_rot[:, lo : lo + step].transpose(2, 3) @ a_rot[None, lo : lo + step]).pow(2).sum(0)
                block.eigenvalues += share.sum(0).to(block.eigenvalues.device)
                block.share += float(share.pow(2).sum())

    def _fit_curvature(self) -> _KFACSolve:
        kron, diag = self._make_blocks()
        stored = self._stored_factors(kron, diag) if self.store is not None else False
        if not stored:
            self._probe_pass(kron, diag, correct=False, desc="EK-FAC: factors")
            if self.store is not None:
                self._save_factors(kron, diag)
        for block in kron:
            block.decompose()
        kfac_values = {id(block): block.eigenvalues for block in kron}
        if kron and (self.eigenvalue_correction or self.damping == "auto"):
            self._probe_pass(kron, diag, correct=True, desc="EK-FAC: eigenvalue correction")
        solve = _KFACSolve(kron, diag)
        blocks: list[Union[KroneckerBlock, DiagonalBlock]] = [*kron, *diag]
        total = 0.0
        for item in blocks:
            values = item.eigenvalues if isinstance(item, KroneckerBlock) else item.diagonal
            trace = float(values.sum())  # the block's exact Gauss-Newton trace
            total += trace
            if self.damping == "auto":
                item.damping = item.share / trace if trace > 0 else 0.0
            else:
                item.damping = float(self.damping)
            solve.damping[item.path] = item.damping
        if not self.eigenvalue_correction:  # K-FAC: the Kronecker product's own eigenvalues
            for block in kron:
                block.eigenvalues = kfac_values[id(block)]
        if self.damping == "auto" and total <= 0:
            raise ValueError(
                "damping: 'auto' found no Gauss-Newton curvature in the Hessian examples (every example's loss "
                "is flat in the model's output); pass a float damping > 0."
            )
        for item in blocks:
            values = item.eigenvalues if isinstance(item, KroneckerBlock) else item.diagonal
            if item.damping == 0 and bool((values <= 0).any()):
                raise ValueError(
                    f"damping: layer {item.path!r} has directions of zero curvature, which damping=0 cannot "
                    "invert; pass damping='auto' or a float > 0."
                )
        return solve

    # --- the store: factors after the first pass, the whole solve after the last ---------------

    def _stored_factors(self, kron: list[KroneckerBlock], diag: list[DiagonalBlock]) -> bool:
        store = self._the_store()
        loaded = [[store.load_tensor(f"kfac_{i}_{part}") for part in ("a", "s", "positions")] for i in range(len(kron))]
        diagonals = [[store.load_tensor(f"diag_{i}_{part}") for part in ("factor", "share")] for i in range(len(diag))]
        if any(x is None for parts in [*loaded, *diagonals] for x in parts):
            return False
        for block, (a, s, n) in zip(kron, loaded):
            assert a is not None and s is not None and n is not None
            block.a_cov, block.s_cov, block.positions = a, s, int(n)
        for fallback, (d, share) in zip(diag, diagonals):
            assert d is not None and share is not None
            fallback.diagonal, fallback.share = d, float(share)
        return True

    def _save_factors(self, kron: list[KroneckerBlock], diag: list[DiagonalBlock]) -> None:
        store = self._the_store()
        for i, block in enumerate(kron):
            store.save_tensor(f"kfac_{i}_a", block.a_cov)
            store.save_tensor(f"kfac_{i}_s", block.s_cov)
            store.save_tensor(f"kfac_{i}_positions", torch.tensor(block.positions))
        for i, fallback in enumerate(diag):
            store.save_tensor(f"diag_{i}_factor", fallback.diagonal)
            store.save_tensor(f"diag_{i}_share", torch.tensor(fallback.share, dtype=torch.float64))

    def _stored_solve(self) -> Optional[_KFACSolve]:
        store = self._the_store()
        kron, diag = self._make_blocks()
        for i, block in enumerate(kron):
            parts = [store.load_tensor(f"kfac_{i}_{name}") for name in ("qa", "qs", "eig", "damping")]
            qa, qs, eigenvalues, damping = parts
            if qa is None or qs is None or eigenvalues is None or damping is None:
                return None
            block.qa, block.qs, block.eigenvalues, block.damping = qa, qs, eigenvalues, float(damping)
        for i, fallback in enumerate(diag):
            d, damping = store.load_tensor(f"diag_{i}_solve"), store.load_tensor(f"diag_{i}_damping")
            if d is None or damping is None:
                return None
            fallback.diagonal, fallback.damping = d, float(damping)
        solve = _KFACSolve(kron, diag)
        solve.damping = {block.path: block.damping for block in kron}
        solve.damping.update({fallback.path: fallback.damping for fallback in diag})
        return solve

    def _save_solve(self, solve: _KFACSolve) -> None:
        store = self._the_store()
        for i, block in enumerate(solve.kron):
            store.save_tensor(f"kfac_{i}_qa", block.qa)
            store.save_tensor(f"kfac_{i}_qs", block.qs)
            store.save_tensor(f"kfac_{i}_eig", block.eigenvalues)
            store.save_tensor(f"kfac_{i}_damping", torch.tensor(block.damping, dtype=torch.float64))
        for i, fallback in enumerate(solve.diag):
            store.save_tensor(f"diag_{i}_solve", fallback.diagonal)
            store.save_tensor(f"diag_{i}_damping", torch.tensor(fallback.damping, dtype=torch.float64))
