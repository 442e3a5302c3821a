"""The end-to-end example on scikit-learn's digits (nothing downloaded): ``python -m captum_influence demo``.

On digits with 5% of the training labels flipped it trains an ensemble of small MLPs (checkpoints
of the first one on disk for TracIn) and one model per random half of the training set, then
computes

- TRAK and TracIn scores of the training digits for the test digits, their proponents and
  opponents, and their linear datamodeling score (LDS) against the models trained on the halves;
- self-influence, and how well it finds the flipped labels (ROC AUC);
- Integrated Gradients of the predicted class in logits and in probabilities (``select_output``),
  with their completeness error against the number of steps and ``check_completeness``;

and writes the figures (PNG), ``report.md`` linking them with the numbers and timings,
``metrics.json`` (the same numbers) and ``results.npz`` (the arrays behind them) to the output
directory.
"""

from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import stack_module_state
from torch.utils.data import TensorDataset

from . import metrics, visualization
from ._progress import progress
from .completeness import check_completeness
from .integrated_gradients import IntegratedGradients
from .output_selection import _margins as class_margins
from .output_selection import select_output
from .tracin import TracInCP
from .trak import TRAK

N_TEST = 500
FLIP_FRACTION = 0.05
HIDDEN = 32
EPOCHS = 30
BATCH_SIZE = 64
LR = 1e-2
WEIGHT_DECAY = 1e-3
N_MODELS = 5  # the TRAK ensemble
TRAK_PROJECTION_DIM = 512  # of 2,410 parameters: LDS within 0.015 of exact gradients, in half the time
CHECKPOINT_EPOCHS = (5, 10, 20, 30)  # of the first model, for TracIn
N_SUBSETS = 64  # models on random halves, for the LDS
K_SHOWN = 4  # proponents and opponents drawn
N_IG = 8  # test digits explained by Integrated Gradients
IG_STEPS = (2, 4, 8, 16, 32, 64, 128)
IG_CHECK_STEPS = 50
COMPLETENESS_RTOL = 1e-2


class UsageError(ValueError):
    """A bad argument or a missing dependency: reported on one line, without a traceback."""


def _check_out_dir(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a real write: permission bits alone do not say it (a read-only mount, or running as root)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"--out: cannot write to {out!r}: {err.strerror or err}") from err
    return path


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"--device: expected cpu or cuda; got {device!r}") from err
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected cpu or cuda; got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {device!r} was asked for but no GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device: {device!r} does not exist; {torch.cuda.device_count()} GPU(s) are visible")
    return dev


@dataclass
class _Digits:
    x_train: torch.Tensor  # (n, 64) in [0, 1]
    y_train: torch.Tensor  # the labels trained on, FLIP_FRACTION of them flipped
    y_train_true: torch.Tensor  # the correct labels
    flipped: torch.Tensor  # (n,) bool
    x_test: torch.Tensor
    y_test: torch.Tensor


def _load_digits(device: torch.device) -> _Digits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise UsageError("the demo needs scikit-learn for its bundled digits: pip install scikit-learn") from err
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    train, test = order[N_TEST:], order[:N_TEST]
    y_train = y[train].clone()
    n_flip = int(FLIP_FRACTION * len(train))
    flip = torch.randperm(len(train), generator=gen)[:n_flip]
    # a different class for each flipped example: add 1..9 modulo 10
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (n_flip,), generator=gen)) % 10
    flipped = torch.zeros(len(train), dtype=torch.bool)
    flipped[flip] = True
    return _Digits(x[train].to(device), y_train.to(device), y[train], flipped, x[test].to(device), y[test].to(device))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10))


Params = dict[str, torch.Tensor]


def _stacked_forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of m stacked ``_mlp()``s: params (m, ...) as ``stack_module_state`` gives them and
    inputs (m, B, 64) -> (m, B, 10). Batched matrix products: the same numbers as
    ``vmap(functional_call(_mlp(), ...))`` at a quarter of its cost on these small layers."""
    hidden = torch.tanh(torch.baddbmm(params["0.bias"][:, None, :], x, params["0.weight"].transpose(1, 2)))
    return torch.baddbmm(params["2.bias"][:, None, :], hidden, params["2.weight"].transpose(1, 2))


def _train_in_lockstep(
    data: _Digits,
    subsets: torch.Tensor,
    *,
    seed: int,
    desc: str,
    show_progress: bool,
    checkpoint_epochs: tuple[int, ...] = (),
) -> tuple[Params, list[Params]]:
    """Train one MLP per row of ``subsets`` (m, s) of training indices, all at once.

    Minibatch Adam on each model's own shuffled subset. The loss is the sum of the m models' mean
    losses, and Adam and weight decay act elementwise, so each model trains exactly as it would
    alone. Returns the stacked parameters (m, ...) and the first model's state at
    ``checkpoint_epochs``."""
    device = data.x_train.device
    m, size = subsets.shape
    torch.manual_seed(seed)
    params, _ = stack_module_state([_mlp() for _ in range(m)])
    params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=LR, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(seed)
    checkpoints = []
    for epoch in progress(range(1, EPOCHS + 1), desc=desc, show=show_progress, inner=False, unit="epoch"):
        order = subsets.gather(1, torch.rand(m, size, generator=gen).argsort(dim=1)).to(device)
        for idx in order.split(BATCH_SIZE, dim=1):
            opt.zero_grad()
            logits = _stacked_forward(params, data.x_train[idx])
            loss = F.cross_entropy(logits.flatten(0, 1), data.y_train[idx].flatten(), reduction="sum")
            (loss / idx.shape[1]).backward()
            opt.step()
        if epoch in checkpoint_epochs:
            checkpoints.append(_state(params, 0))
    return {k: v.detach() for k, v in params.items()}, checkpoints


def _state(params: Params, j: int) -> Params:
    return {k: v[j].detach().clone() for k, v in params.items()}


def _logits(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Logits of every stacked model on the same inputs: (m, n, 10)."""
    with torch.no_grad():
        return _stacked_forward(params, x.expand(next(iter(params.values())).shape[0], *x.shape))


def _margins(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's margin log(p_y / (1 - p_y)) = g_y - logsumexp_{j != y} g_j of each model: (m, n)."""
    margins = class_margins(_logits(params, x))
    return margins.gather(2, y.expand(margins.shape[0], -1)[..., None])[..., 0]


class _Timings:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _first_with_flipped_opponent(scores: torch.Tensor, flipped: torch.Tensor) -> int:
    """The first test example among whose K_SHOWN strongest opponents is a flipped training label (else 0)."""
    opponents = scores.topk(K_SHOWN, dim=1, largest=False).indices.cpu()
    hits = flipped[opponents].any(dim=1).nonzero().flatten()
    return int(hits[0]) if len(hits) else 0


def _load_with_lr(model: nn.Module, checkpoint: str) -> float:
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return LR


def _data_attribution(
    data: _Digits, out_dir: Path, device: torch.device, timings: _Timings, show_progress: bool
) -> tuple[dict, dict, dict, nn.Module]:
    """Train, score with TRAK and TracIn, self-influence, LDS. Returns (numbers, figure files, arrays, first model)."""
    n = len(data.y_train)
    with timings.step(f"train {N_MODELS} MLPs ({EPOCHS} epochs), save {len(CHECKPOINT_EPOCHS)} checkpoints"):
        ensemble, checkpoints = _train_in_lockstep(
            data,
            torch.arange(n).repeat(N_MODELS, 1),
            seed=0,
            desc="train the ensemble",
            show_progress=show_progress,
            checkpoint_epochs=CHECKPOINT_EPOCHS,
        )
        ckpt_dir = out_dir / "checkpoints"
        ckpt_dir.mkdir(exist_ok=True)
        for epoch, state in zip(CHECKPOINT_EPOCHS, checkpoints):
            torch.save(state, ckpt_dir / f"epoch_{epoch:02d}.pt")
    accuracy = float((_logits(ensemble, data.x_test)[0].argmax(dim=1) == data.y_test).float().mean())

    gen = torch.Generator().manual_seed(1)
    halves = torch.stack([torch.randperm(n, generator=gen)[: n // 2] for _ in range(N_SUBSETS)])
    with timings.step(f"train {N_SUBSETS} MLPs on random halves (for the LDS)"):
        subset_params, _ = _train_in_lockstep(
            data, halves, seed=1000, desc="train the subset models", show_progress=show_progress
        )
    subset_outputs = _margins(subset_params, data.x_test, data.y_test).cpu().numpy()
    subset_masks = np.zeros((N_SUBSETS, n), dtype=bool)
    subset_masks[np.arange(N_SUBSETS)[:, None], halves.numpy()] = True

    train_set = TensorDataset(data.x_train, data.y_train)
    test = (data.x_test, data.y_test)
    with timings.step(f"TRAK: featurise {n} training digits on {N_MODELS} models, score {N_TEST} test digits"):
        trak = TRAK(
            _mlp().to(device),
            train_set,
            [_state(ensemble, j) for j in range(N_MODELS)],
            projection_dim=TRAK_PROJECTION_DIM,
            batch_size=256,
            device=device,
            show_progress=show_progress,
        )
        trak_scores = trak.influence(test)
    with timings.step("TRAK: self-influence"):
        trak_self = trak.self_influence()
    with timings.step(
        f"TracIn: featurise {n} training digits on {len(CHECKPOINT_EPOCHS)} checkpoints, score {N_TEST} test digits"
    ):
        tracin = TracInCP(
            _mlp().to(device),
            train_set,
            str(ckpt_dir),
            _load_with_lr,
            batch_size=256,
            device=device,
            show_progress=show_progress,
        )
        tracin_scores = tracin.influence(test)
    with timings.step("TracIn: self-influence"):
        tracin_self = tracin.self_influence()

    flipped = data.flipped.numpy()
    numbers = {
        "test_accuracy": accuracy,
        "n_train": n,
        "n_test": N_TEST,
        "n_flipped": int(flipped.sum()),
        "trak_projection_dim": trak.projection_dim,
        "lds_trak": metrics.lds(trak_scores, subset_masks, subset_outputs),
        "lds_tracin": metrics.lds(tracin_scores, subset_masks, subset_outputs),
        "auc_tracin_self_influence": metrics.mislabel_detection_auc(tracin_self, flipped),
        "auc_trak_self_influence": metrics.mislabel_detection_auc(trak_self, flipped),
    }
    labels_cpu = data.y_train.cpu()
    for name, scores in (("trak", trak_scores), ("tracin", tracin_scores)):
        top = scores.topk(5, dim=1).indices.cpu()
        numbers[f"{name}_top5_proponents_same_label"] = float(
            (labels_cpu[top] == data.y_test.cpu()[:, None]).float().mean()
        )
        numbers[f"{name}_top1_opponent_flipped"] = float(data.flipped[scores.argmin(dim=1).cpu()].float().mean())

    images = data.x_train.cpu().reshape(-1, 8, 8)
    shown = _first_with_flipped_opponent(trak_scores, data.flipped)
    numbers["shown_test_example"] = shown
    figures = {}
    for name, scores in (("TRAK", trak_scores), ("TracInCP", tracin_scores)):
        fig, axes = visualization.plot_influential(
            data.x_test[shown].cpu().reshape(8, 8),
            images,
            scores[shown],
            k=K_SHOWN,
            labels=labels_cpu,
            mislabeled=data.flipped,
            true_labels=data.y_train_true,
            test_label=int(data.y_test[shown]),
            method=f"{name}, test digit #{shown}",
        )
        key = "influential_" + ("trak" if name == "TRAK" else "tracin")
        figures[key] = _save(fig, out_dir / f"{key}.png")
    fig, _ = visualization.plot_self_influence(tracin_self, flipped, method="TracInCP")
    figures["self_influence"] = _save(fig, out_dir / "self_influence.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (name, key, scores) in zip(axes, (("TRAK", "trak", trak_scores), ("TracInCP", "tracin", tracin_scores))):
        predicted = subset_masks.astype(np.float64) @ scores[shown].cpu().double().numpy()
        visualization.plot_lds(
            predicted,
            subset_outputs[:, shown],
            ax=ax,
            method=name,
            title=f"test digit #{shown} (LDS over all {N_TEST}: {numbers['lds_' + key]:.3f})",
        )
    fig.tight_layout()
    figures["lds"] = _save(fig, out_dir / "lds.png")
    arrays = {
        "trak_scores": trak_scores.cpu().numpy(),
        "tracin_scores": tracin_scores.cpu().numpy(),
        "trak_self_influence": trak_self.cpu().numpy(),
        "tracin_self_influence": tracin_self.cpu().numpy(),
        "is_mislabeled": flipped,
        "subset_masks": subset_masks,
        "subset_outputs": subset_outputs,
    }
    model = _mlp().to(device)
    model.load_state_dict(_state(ensemble, 0))
    return numbers, figures, arrays, model.eval()


def _feature_attribution(
    model: nn.Module, data: _Digits, out_dir: Path, timings: _Timings, show_progress: bool
) -> tuple[dict, dict, dict]:
    """IG of the predicted class in logits and in probabilities, with completeness.

    Returns (numbers, figures, arrays)."""
    x = data.x_test[:N_IG]
    with torch.no_grad():
        target = model(x).argmax(dim=1)
    spaces = ("logits", "probs")
    numbers: dict = {}
    deltas, changes, attributions, auto_deltas = {}, {}, {}, {}
    with timings.step(f"Integrated Gradients on {N_IG} test digits: n_steps sweep, completeness checks"):
        for space in spaces:
            ig = IntegratedGradients(select_output(model, space))
            rows = []
            for n_steps in progress(IG_STEPS, desc=f"IG in {space}: n_steps sweep", show=show_progress, inner=False):
                _, delta = ig.attribute(x, target=target, n_steps=n_steps, return_convergence_delta=True)
                rows.append(delta.detach().cpu().numpy())
            deltas[space] = np.stack(rows)
            report = check_completeness(ig, x, target=target, rtol=COMPLETENESS_RTOL, n_steps=IG_CHECK_STEPS)
            changes[space] = report.output_change.detach().cpu().numpy()
            numbers[f"completeness_{space}_max_relative_error"] = float(report.relative_error.max())
            numbers[f"completeness_{space}_passed"] = report.passed
            attributions[space] = ig.attribute(x, target=target, n_steps="auto").detach().cpu().numpy()
            convergence = ig.convergence
            assert convergence is not None  # n_steps="auto" records it
            numbers[f"ig_{space}_auto_n_steps"] = int(convergence.n_steps.max())
            numbers[f"ig_{space}_auto_max_relative_error"] = float(convergence.relative_error.max())
            auto_deltas[space] = convergence.delta.detach().cpu().numpy()
    numbers["completeness_rtol"] = COMPLETENESS_RTOL
    numbers["ig_check_n_steps"] = IG_CHECK_STEPS

    figures = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, space in zip(axes, spaces):
        visualization.plot_completeness(
            IG_STEPS,
            deltas[space],
            output_change=changes[space],
            labels=[f"digit #{i}" for i in range(N_IG)],
            method=f"IG in {space}",
            legend=ax is axes[-1],
            ax=ax,
        )
    axes[1].set_ylabel("")
    fig.tight_layout()
    figures["completeness"] = _save(fig, out_dir / "completeness.png")

    # Each space's attributions as shares of its own output change F(x) - F(x') (they sum to 1), so
    # that the two compare on one scale; the digit shown is the one where the shares differ most.
    shares = {space: attributions[space] / changes[space][:, None] for space in spaces}
    difference = shares["probs"] - shares["logits"]
    i = int(np.abs(difference).sum(axis=1).argmax())
    numbers["attributions_shown_test_example"] = i
    panels = [
        (
            f"IG in {space}, F(x) - F(x') = {changes[space][i]:.3g}\ndelta {auto_deltas[space][i]:+.1e}",
            shares[space][i],
            "share of F(x) - F(x'): - lowers, + raises",
        )
        for space in spaces
    ]
    panels.append(("difference: probs - logits\n(green: more credit in probs)", difference[i], "difference of shares"))
    scale = max(float(np.abs(values).max()) for _, values, _ in panels)
    fig, axes = plt.subplots(1, 4, figsize=(13, 4.2), layout="constrained")
    image = x[i].cpu().reshape(8, 8).numpy()
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"test digit #{i}, label {int(data.y_test[i])}\npredicted {int(target[i])}")
    axes[0].set_axis_off()
    for ax, (title, values, bar_label) in zip(axes[1:], panels):
        visualization.plot_attributions(values.reshape(8, 8), sign="all", scale=scale, title=title, ax=ax)
        ax.images[-1].colorbar.set_label(bar_label, fontsize=8)
    figures["attributions"] = _save(fig, out_dir / "attributions.png")
    arrays = {f"ig_deltas_{space}": deltas[space] for space in spaces}
    arrays.update({f"ig_output_change_{space}": changes[space] for space in spaces})
    arrays.update({f"ig_attributions_{space}": attributions[space] for space in spaces})
    arrays["ig_n_steps"] = np.array(IG_STEPS)
    return numbers, figures, arrays


def _report(numbers: dict, figures: dict, timings: dict, device: torch.device) -> str:
    n = numbers
    rtol = n["completeness_rtol"]
    timing_rows = "\n".join(f"| {name} | {seconds:.2f} |" for name, seconds in timings.items())
    check = f"n_steps={n['ig_check_n_steps']}, rtol {rtol:g}"
    results = [
        ("test accuracy (first model)", f"{n['test_accuracy']:.3f}"),
        (f"LDS of TRAK ({N_MODELS} models, projection_dim {n['trak_projection_dim']})", f"{n['lds_trak']:.3f}"),
        (f"LDS of TracInCP ({len(CHECKPOINT_EPOCHS)} checkpoints)", f"{n['lds_tracin']:.3f}"),
        ("mislabel-detection AUC, TracIn self-influence", f"{n['auc_tracin_self_influence']:.3f}"),
        ("mislabel-detection AUC, TRAK self-influence", f"{n['auc_trak_self_influence']:.3f}"),
        (
            "top-5 proponents with the test label, TRAK / TracIn",
            f"{n['trak_top5_proponents_same_label']:.3f} / {n['tracin_top5_proponents_same_label']:.3f}",
        ),
        (
            f"strongest opponent is a flipped label, TRAK / TracIn (base rate {FLIP_FRACTION:.2f})",
            f"{n['trak_top1_opponent_flipped']:.3f} / {n['tracin_top1_opponent_flipped']:.3f}",
        ),
    ]
    for space, name in (("logits", "logits"), ("probs", "probabilities")):
        verdict = "passed" if n[f"completeness_{space}_passed"] else "FAILED"
        results.append(
            (
                f"IG completeness, max relative error in {name} ({check})",
                f"{n[f'completeness_{space}_max_relative_error']:.2e} ({verdict})",
            )
        )
    results.append(
        (
            'IG n_steps="auto": steps needed for relative error 1e-3, logits / probabilities',
            f"{n['ig_logits_auto_n_steps']} / {n['ig_probs_auto_n_steps']}",
        )
    )
    result_rows = "\n".join(f"| {quantity} | {value} |" for quantity, value in results)
    return f"""# captum_influence demo: digits

scikit-learn's digits (8x8 images, nothing downloaded): {n["n_train"]} training digits, of which
{n["n_flipped"]} ({FLIP_FRACTION:.0%}) have a flipped label, and {n["n_test"]} test digits. Model: an MLP
64-{HIDDEN}-10 (tanh), Adam, {EPOCHS} epochs; an ensemble of {N_MODELS} for TRAK, checkpoints of the first at
epochs {", ".join(map(str, CHECKPOINT_EPOCHS))} for TracIn, and {N_SUBSETS} models on random halves of the
training set for the linear datamodeling score (LDS). Device: {device}.

## Results

| quantity | value |
| --- | --- |
{result_rows}

LDS: for each test digit, the Spearman correlation between the sum of a method's scores over a
random half of the training set and the margin of the model trained on that half, averaged over
the {n["n_test"]} test digits. The AUC is the probability that a flipped training label has a
higher self-influence than a clean one (0.5 is chance).

## Proponents and opponents

Test digit #{n["shown_test_example"]}, the first whose strongest opponents include a flipped label. Training
digits trained on a flipped label are framed in red, with the label they were given and their true one.

![TRAK proponents and opponents]({figures["influential_trak"]})

![TracIn proponents and opponents]({figures["influential_tracin"]})

## Self-influence finds the flipped labels

TracInCP's self-influence of every training digit (counts on a log scale where the clean digits
crowd one bin), and the share of flipped labels found when inspecting the digits in decreasing
self-influence.

![self-influence]({figures["self_influence"]})

## Linear datamodeling score

![LDS]({figures["lds"]})

## Integrated Gradients and completeness

Integrated Gradients of the predicted class, from a black baseline, in logits and in probabilities
(`ci.select_output(model, "probs")`): the relative completeness error
|sum(attr) - (F(x) - F(x'))| / |F(x) - F(x')| against n_steps for {N_IG} test digits, with the
1e-3 that `n_steps="auto"` reaches.

![completeness]({figures["completeness"]})

The attributions (n_steps="auto") of test digit #{n["attributions_shown_test_example"]}, the one of the {N_IG} where
the two spaces differ most. Each is divided by its own output change F(x) - F(x'), so both sum to 1 and
share one colour scale; the last panel is their difference: where the probability's explanation
puts more (green) or less (red) of the credit than the logit's.

![attributions]({figures["attributions"]})

## Timings (seconds)

| step | seconds |
| --- | --- |
{timing_rows}
| total | {sum(timings.values()):.2f} |
"""


def run_demo(out: str, device: str = "cpu", *, quiet: bool = False) -> Path:
    """Run the digits example end to end, write figures and ``report.md`` to ``out``; return the report's path.

    Progress bars go to stderr when it is a terminal; ``quiet`` turns them off."""
    dev = _check_device(device)
    out_dir = _check_out_dir(out)
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        # tiny models: a second thread costs more in hand-offs than it gains (much more on a busy machine)
        torch.set_num_threads(1)
    try:
        timings = _Timings()
        data = _load_digits(dev)
        numbers, figures, arrays, model = _data_attribution(data, out_dir, dev, timings, show_progress=not quiet)
        ig_numbers, ig_figures, ig_arrays = _feature_attribution(model, data, out_dir, timings, show_progress=not quiet)
    finally:
        torch.set_num_threads(threads)
    numbers.update(ig_numbers)
    figures.update(ig_figures)
    arrays.update(ig_arrays)
    numbers["device"] = str(dev)
    numbers["timings_seconds"] = timings.seconds
    numbers["figures"] = figures
    np.savez(out_dir / "results.npz", **arrays)
    (out_dir / "metrics.json").write_text(json.dumps(numbers, indent=2) + "\n")
    report = out_dir / "report.md"
    report.write_text(_report(numbers, figures, timings.seconds, dev))
    return report
