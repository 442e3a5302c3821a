"""The CPU sizes of the throughput benchmarks: they finish, their paths agree, and the tables they
print are consistent (every rate finite and positive, every ratio the quotient of the printed rates,
parameter counts those of the benchmark's own models)."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow  # each runs a benchmark script in a fresh process


def _run(script, *args):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _assert_ratio(printed: float, numerator: float, denominator: float, decimals: int, out: str) -> None:
    """``printed`` is numerator / denominator rounded to ``decimals``, the rates themselves being
    printed rounded to integers (so up to half an example per second off)."""
    assert numerator > 0 and denominator > 0 and math.isfinite(numerator) and math.isfinite(denominator), out
    ratio = numerator / denominator
    slack = 0.5 * 10**-decimals + ratio * (0.5 / numerator + 0.5 / denominator) * 1.01
    assert abs(printed - ratio) <= slack, f"printed {printed} for {numerator} / {denominator}\n{out}"


def test_featurize_speed_quick_hooks_equal_vmap():
    out = _run("featurize_speed.py", "--quick", "--threads", "1", "--batches", "1")
    differences = [float(x) for x in re.findall(r"features from 'ours vmap fp32': ([0-9.e+-]+)", out)]
    assert len(differences) == 2 and max(differences) < 1e-5, out
    tables = re.findall(r"^\s+method\s+examples/s\s+vs fwd\+bwd\s+best ours vs it\n((?:\s+\S.*\d\n)+)", out, re.M)
    assert len(tables) == 2, out
    for table in tables:
        rows = {
            name.strip(): (_number(rate), float(vs_batched), float(vs_best))
            for name, rate, vs_batched, vs_best in re.findall(
                r"^\s+(\S.*?)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)$", table, re.M
            )
        }
        assert {"batched fwd+bwd", "ours hooks fp32", "ours vmap fp32", "traker BasicProjector"} <= set(rows), table
        batched = rows["batched fwd+bwd"][0]
        best_ours = max(rate for name, (rate, _, _) in rows.items() if name.startswith("ours"))
        for rate, vs_batched, vs_best in rows.values():
            _assert_ratio(vs_batched, rate, batched, 2, out)
            _assert_ratio(vs_best, best_ours, rate, 2, out)


def _benchmark_module(script: str):
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_backend_speed_runs_against_traker():
    out = _run("backend_speed.py", "--repeats", "1", "--proj-dim", "256")
    rows = re.findall(r"^(MLP|CNN)\s+(\d+)\s+(\d+)\s+(\d+)\s+([0-9.]+)x$", out, flags=re.M)
    assert [row[0] for row in rows] == ["MLP", "CNN"], out
    bench = _benchmark_module("backend_speed.py")
    for (name, params, ours, traker, ratio), make in zip(rows, (bench.mlp, bench.cnn)):
        assert int(params) == sum(p.numel() for p in make().parameters()), (name, out)
        _assert_ratio(float(ratio), float(ours), float(traker), 2, out)
    # The second table: every method against the batched forward + backward of the same batches,
    # with the first table's rates among them.
    against = re.findall(r"^\s+(MLP|CNN)\s+\d+\s+(\S.*?)\s+(\d+)\s+([0-9.]+)$", out, flags=re.M)
    for name, _, ours, traker, _ in rows:
        rates = {method: (float(rate), float(vs)) for model, method, rate, vs in against if model == name}
        assert {"batched fwd+bwd", "ours dense", "ours factored", "traker BasicProjector"} <= set(rates), (name, out)
        assert (rates["ours dense"][0], rates["traker BasicProjector"][0]) == (float(ours), float(traker)), out
        reference = rates["batched fwd+bwd"][0]
        for rate, vs in rates.values():
            _assert_ratio(vs, rate, reference, 3, out)


def test_real_models_quick_hooks_equal_the_loop():
    pytest.importorskip("transformers")
    out = _run("real_models.py", "--quick", "--threads", "1")
    rows = re.findall(
        r"^(BERT|GPT-2|ViT)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([0-9.]+)x\s+([0-9.]+)x\s+([0-9.e+-]+)$",
        out,
        flags=re.M,
    )
    assert [row[0] for row in rows] == ["BERT", "GPT-2", "ViT"], out
    for name, params, ours, kept, loop, captum, ours_loop, kept_loop, difference in rows:
        assert _number(params) > 0 and _number(captum) > 0, (name, out)
        _assert_ratio(float(ours_loop), _number(ours), _number(loop), 1, out)
        _assert_ratio(float(kept_loop), _number(kept), _number(loop), 1, out)
        assert float(difference) < 1e-5, (name, out)
    captum = dict(
        re.findall(r"^(BERT|GPT-2|ViT): Captum's features differ from the loop's by at most ([0-9.e+-]+)$", out, re.M)
    )
    assert set(captum) == {"BERT", "GPT-2", "ViT"}, out
    assert all(float(difference) < 1e-4 for difference in captum.values()), out
