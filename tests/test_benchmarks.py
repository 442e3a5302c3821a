"""The CPU sizes of the throughput benchmarks run in CI: they must finish and their paths agree."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_featurize_speed_quick_hooks_equal_vmap():
    out = _run("featurize_speed.py", "--quick", "--threads", "1", "--batches", "1")
    differences = [float(x) for x in re.findall(r"features from 'ours vmap fp32': ([0-9.e+-]+)", out)]
    assert len(differences) == 2 and max(differences) < 1e-5, out
    assert re.search(r"ours hooks fp32\s+[\d,]+", out) and "traker BasicProjector" in out


def test_backend_speed_runs_against_traker():
    out = _run("backend_speed.py", "--repeats", "1", "--proj-dim", "256")
    rows = re.findall(r"^(MLP|CNN)\s+\d+\s+\d+\s+\d+\s+([0-9.]+)x$", out, flags=re.M)
    assert [name for name, _ in rows] == ["MLP", "CNN"], out


def test_real_models_quick_hooks_equal_the_loop():
    pytest.importorskip("transformers")
    out = _run("real_models.py", "--quick", "--threads", "1")
    rows = re.findall(r"^(BERT|GPT-2|ViT)\s+[\d,]+(?:\s+[\d,]+){4}(?:\s+[0-9.]+x){2}\s+([0-9.e+-]+)$", out, flags=re.M)
    assert [name for name, _ in rows] == ["BERT", "GPT-2", "ViT"], out
    assert max(float(difference) for _, difference in rows) < 1e-5, out
