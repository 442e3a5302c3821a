"""benchmarks/factored_lds.py at tiny sizes (``--smoke``): both setups give a finite LDS for both projections."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "factored_lds.py"


@pytest.mark.slow
def test_smoke_run_gives_finite_lds_for_both_projections_and_a_trained_transformer():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=300, check=False
    )
    out = done.stdout
    print(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "failed" not in out, out
    # the transformer learnt the marker-count task: training accuracy well above chance (0.5)
    accuracy = float(re.search(r"text: ensemble training accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.65, out
    for setup in ("digits", "text"):
        section = out.split(f"\n{setup}: ", 1)[1].split("\n\n", 1)[0]
        assert re.search(r"\b9,610 parameters" if setup == "digits" else r"[0-9,]+ parameters", section), section
        rows = re.findall(r"^(dense|factored)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)", section, re.M)
        assert {r[0] for r in rows} == {"dense", "factored"}, section
        for projection, k, made, _, lds, seconds in rows:
            assert 0 < int(made) <= int(k), (setup, projection)
            assert math.isfinite(float(lds)) and -1 <= float(lds) <= 1, (setup, projection, lds)
            assert float(seconds) > 0
