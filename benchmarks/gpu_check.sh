#!/usr/bin/env bash
# The GPU featurisation check in one command (under 8 minutes on one H200), for a machine with no
# internet and nothing but this repository (and torch):
#
#   bash benchmarks/gpu_check.sh                       # CUDA sizes: ResNet-9 (2.3M), transformer, k 2048
#   bash benchmarks/gpu_check.sh --device cpu --quick  # the same script on CPU at small sizes
#
# Runs benchmarks/featurize_speed.py: ours dense fp32, TF32 and bf16, ours factored (fp32, bf16),
# ours vmap, traker's projector with its FunctionalGradientComputer, Captum's TracInCP and the
# batched forward+backward, and writes the table to $OUT (default benchmarks/gpu_check_results.txt).
#
# Packages: captum is needed by captum_influence itself (its DataInfluence base class); traker only
# for its row, skipped with a line saying so when it is missing. Carry their wheels, made where
# there is internet with
#   pip download captum==0.9.0 traker==0.3.2 --no-deps -d wheels
# and put the wheels/ folder at the repository root (or point $WHEELS at it): what is missing is
# installed from there, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the repository's virtual environment when there is one
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=$(command -v python3 || command -v python); fi
fi
OUT=${OUT:-benchmarks/gpu_check_results.txt}
WHEELS=${WHEELS:-wheels}
LIMIT=${LIMIT:-460}  # seconds for the benchmark itself, within the 8 minutes

has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

"$PYTHON" -c "import torch" || { echo "gpu_check: torch is not importable with $PYTHON; set PYTHON=..."; exit 1; }
for pkg in captum:captum traker:trak; do
    name=${pkg%%:*}; module=${pkg##*:}
    if ! has "$module"; then
        if [ -d "$WHEELS" ] && ls "$WHEELS"/"$name"-*.whl >/dev/null 2>&1; then
            echo "gpu_check: installing $name from $WHEELS (offline)"
            "$PYTHON" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" "$name" || true
        fi
    fi
    if ! has "$module"; then
        if [ "$name" = captum ]; then
            echo "gpu_check: captum is missing and captum_influence cannot be imported without it; carry its wheel (see the top of this script)."
            exit 1
        fi
        echo "gpu_check: $name is missing: its row is skipped (carry its wheel to measure it; see the top of this script)."
    fi
done

ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
    "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { echo "gpu_check: no CUDA device; run with --device cpu --quick for the CPU path"; exit 1; }
    ARGS=(--device cuda)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
timeout "$LIMIT" "$PYTHON" benchmarks/featurize_speed.py "${ARGS[@]}" --out "$OUT" || {
    status=$?
    [ $status -eq 124 ] && echo "gpu_check: stopped after $LIMIT s; $OUT holds the setups finished so far"
    exit $status
}
echo "gpu_check: done in $(( $(date +%s) - start )) s; table written to $OUT"
