"""The switch predictions of ``_kinks.KinkFinder`` against a dense scan of the same straight path."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from captum_influence._kinks import KinkFinder


def _predicted(op, start, direction):
    """KinkFinder's distance to the next switch of ``op`` along start + a * direction, per row."""
    finder = KinkFinder(len(start), start.device)
    with torch.no_grad(), fwAD.dual_level():
        dual = fwAD.make_dual(start, direction)
        with finder:
            op(dual)
    return finder.next_step


def _scanned(pattern, start, direction, step=1e-4):
    """The first a on a grid of ``step`` at which ``pattern`` (a discrete state per row) changes."""
    alphas = torch.arange(0, 1 + step / 2, step, dtype=torch.float64)
    points = start[None] + alphas.reshape(-1, *[1] * start.dim()) * direction[None]  # (grid, rows, ...)
    states = pattern(points.reshape(-1, *start.shape[1:])).reshape(len(alphas), len(start), -1)
    changed = (states[1:] != states[:1]).any(-1)  # (grid - 1, rows)
    first = torch.where(changed.any(0), alphas[1:][changed.int().argmax(0)], torch.tensor(float("inf")))
    return first.double()


CASES = {
    "relu": (F.relu, lambda z: z > 0, (3, 7)),
    "leaky_relu": (lambda z: F.leaky_relu(z, 0.1), lambda z: z > 0, (3, 7)),
    "abs": (torch.abs, lambda z: z > 0, (3, 7)),
    "clamp": (lambda z: z.clamp(-0.5, 0.4), lambda z: torch.cat([z > -0.5, z < 0.4], -1), (3, 7)),
    "hardtanh": (F.hardtanh, lambda z: torch.cat([z > -1, z < 1], -1), (3, 7)),
    "max_pool2d": (lambda z: F.max_pool2d(z, 2), lambda z: F.max_pool2d(z, 2, return_indices=True)[1], (3, 2, 6, 6)),
    "max_pool2d padded": (
        lambda z: F.max_pool2d(z, 3, stride=2, padding=1),
        lambda z: F.max_pool2d(z, 3, stride=2, padding=1, return_indices=True)[1],
        (3, 2, 5, 5),
    ),
    "max_pool1d": (lambda z: F.max_pool1d(z, 3), lambda z: F.max_pool1d(z, 3, return_indices=True)[1], (3, 2, 9)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_next_switch_matches_a_dense_scan(name):
    op, pattern, shape = CASES[name]
    torch.manual_seed(0)
    start = torch.randn(shape, dtype=torch.float64)
    direction = -2 * start + 0.3 * torch.randn(shape, dtype=torch.float64)  # every unit crosses back
    predicted = _predicted(op, start, direction)
    scanned = _scanned(pattern, start, direction)
    assert torch.isfinite(scanned).all()  # every row switches on the path: the case is not empty
    torch.testing.assert_close(predicted.clamp_max(1.0), scanned, atol=1.1e-4, rtol=0)


def test_inputs_that_do_not_vary_along_the_path_predict_nothing():
    finder = KinkFinder(4, torch.device("cpu"))
    with torch.no_grad(), finder:
        F.relu(torch.randn(4, 3))
    assert torch.isinf(finder.next_step).all()
