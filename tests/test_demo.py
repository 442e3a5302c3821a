"""``python -m captum_influence demo``: the report, figures and numbers, and its argument checks.

The demo runs once for the module; its numbers are recomputed from the arrays it saves with
scikit-learn's ROC AUC and scipy's Spearman correlation, independently of ``ci.metrics``.
"""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

import captum_influence._progress as progress_module
from captum_influence.__main__ import main

FIGURES = {"influential_trak", "influential_tracin", "self_influence", "lds", "completeness", "attributions"}


def _run(argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"  # not there yet: the demo makes it
    code, stdout, stderr = _run(["demo", "--out", str(out), "--quiet"])
    assert code == 0
    assert stderr == ""  # --quiet: no progress bars, only the final line on stdout
    assert stdout.strip().splitlines() == [f"report written to {out / 'report.md'}"]
    return out, stdout


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_only_on_a_terminal_and_when_asked(monkeypatch):
    for stream, show, drawn in ((io.StringIO(), True, False), (_Terminal(), True, True), (_Terminal(), False, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(progress_module.progress(range(3), desc="steps", show=show)) == [0, 1, 2]
        assert ("steps" in stream.getvalue()) == drawn, (type(stream).__name__, show)
    # an inner bar is cleared when done, the outermost one stays
    for inner, kept in ((True, False), (False, True)):
        stream = _Terminal()
        monkeypatch.setattr(sys, "stderr", stream)
        list(progress_module.progress(range(3), desc="steps", show=True, inner=inner))
        last = stream.getvalue().split("\r")[-1]  # what stays on the line once the bar is closed
        assert ("3/3" in last and last.endswith("\n")) == kept and (last == "") == (not kept)


@pytest.mark.slow
def test_demo_prints_the_report_path_and_links_every_figure(demo):
    out, stdout = demo
    report = out / "report.md"
    assert str(report) in stdout
    text = report.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(name).stem for name in linked} == FIGURES
    for name in linked:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05  # drawn, not blank


@pytest.mark.slow
def test_demo_numbers_match_an_independent_computation(demo):
    out, _ = demo
    numbers = json.loads((out / "metrics.json").read_text())
    arrays = np.load(out / "results.npz")
    mislabeled = arrays["is_mislabeled"]
    assert mislabeled.mean() == pytest.approx(0.05, abs=0.005)
    for method in ("tracin", "trak"):
        auc = roc_auc_score(mislabeled, arrays[f"{method}_self_influence"])
        assert numbers[f"auc_{method}_self_influence"] == pytest.approx(auc, rel=1e-9)
        assert auc > 0.9  # flipped labels stand out (0.5 is chance)
        masks, outputs, scores = arrays["subset_masks"], arrays["subset_outputs"], arrays[f"{method}_scores"]
        predicted = masks.astype(np.float64) @ scores.astype(np.float64).T
        lds = np.mean([spearmanr(predicted[:, t], outputs[:, t])[0] for t in range(scores.shape[0])])
        assert numbers[f"lds_{method}"] == pytest.approx(lds, rel=1e-6)
    assert numbers["lds_trak"] > 0.3
    assert numbers["test_accuracy"] > 0.9
    for space in ("logits", "probs"):
        assert numbers[f"completeness_{space}_passed"]
        assert numbers[f"completeness_{space}_max_relative_error"] < numbers["completeness_rtol"]
        deltas = np.abs(arrays[f"ig_deltas_{space}"])  # (n_steps values, examples)
        assert deltas[-1].max() < 1e-2 * deltas[0].max()  # the quadrature converges
    # the attributions shown: the digit whose shares of F(x) - F(x') differ most between the spaces
    shares = {
        space: arrays[f"ig_attributions_{space}"] / arrays[f"ig_output_change_{space}"][:, None]
        for space in ("logits", "probs")
    }
    for part in shares.values():
        np.testing.assert_allclose(part.sum(axis=1), 1.0, atol=1e-3)  # complete: the shares sum to 1
    assert numbers["attributions_shown_test_example"] == np.abs(shares["probs"] - shares["logits"]).sum(1).argmax()
    text = (out / "report.md").read_text()
    for key in ("lds_trak", "lds_tracin", "auc_tracin_self_influence", "auc_trak_self_influence", "test_accuracy"):
        assert f"{numbers[key]:.3f}" in text
    for key in ("completeness_logits_max_relative_error", "completeness_probs_max_relative_error"):
        assert f"{numbers[key]:.2e}" in text
    timings = re.findall(r"^\| [^|]+ \| (\d+\.\d\d) \|$", text, flags=re.M)
    assert len(timings) == len(numbers["timings_seconds"]) + 1  # the steps and the total


def test_unwritable_out_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        code, stdout, stderr = _run(["demo", "--out", str(out)])
        assert code != 0 and stdout == ""
        assert stderr.startswith("error: --out:") and str(out) in stderr


@pytest.mark.parametrize("device", ["tpu", "meta", "not a device"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_unknown_or_missing_device_is_refused(tmp_path, device):
    out = tmp_path / "out"
    code, stdout, stderr = _run(["demo", "--out", str(out), "--device", device])
    assert code != 0 and stdout == ""
    assert stderr.startswith("error: --device:") and repr(device) in stderr
    assert not out.exists()  # refused before anything is written


def test_module_entry_point_exits_non_zero_with_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "captum_influence", "demo", "--out", str(tmp_path), "--device", "tpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["error: --device: expected cpu or cuda; got 'tpu'"]


def test_missing_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()):
        main([])
    assert exit_info.value.code == 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_demo_on_cuda(tmp_path, demo):
    code, stdout, _ = _run(["demo", "--out", str(tmp_path), "--device", "cuda"])
    assert code == 0
    numbers = json.loads((tmp_path / "metrics.json").read_text())
    cpu_numbers = json.loads((demo[0] / "metrics.json").read_text())
    assert numbers["device"].startswith("cuda")
    assert numbers["auc_tracin_self_influence"] > 0.9 and numbers["completeness_probs_passed"]
    assert numbers["lds_trak"] == pytest.approx(cpu_numbers["lds_trak"], abs=0.05)
