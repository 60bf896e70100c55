#!/usr/bin/env bash
# The GPU suite in one command (`make test-gpu`), on a machine with CUDA and no package registry:
#   1. install the wheels in .whl/ if that folder has any (a newer transformers), no deps;
#   2. install rdkv_hf from this tree, no deps, no build isolation (nothing from the network);
#   3. print torch / transformers / triton versions and the GPU;
#   4. python -m pytest -q tests/gpu (CUDA required: RDKV_GPU_TESTS_DEVICE=cuda);
#   5. python benchmarks/bench_gpu_decode.py (a decode-speed table; CSV in benchmarks/results/gpu/).
# Step 5 runs even when step 4 fails (its numbers are still worth the GPU time); the exit status is
# the first failure's. Each step has a time limit (400 s, 140 s), so the run stays under 10 minutes.
#
#   PY=python3.12 tests/gpu/run.sh             # another interpreter (default: python)
#   RDKV_GPU_TESTS_DEVICE=cpu tests/gpu/run.sh # dry run on the CPU: Triton under its interpreter,
#                                              # small shapes, a small benchmark written to $TMPDIR
#                                              # (Triton 3.6's interpreter needs numpy < 2.4)
#   RDKV_GPU_NO_INSTALL=1 tests/gpu/run.sh     # test this tree through PYTHONPATH, install nothing
#   RDKV_GPU_BENCH_ARGS="--contexts 8192" tests/gpu/run.sh   # other benchmark arguments
#   RDKV_GPU_BENCH_ARGS="--profile" tests/gpu/run.sh         # and torch.profiler tables of decode steps
#   RDKV_GPU_PYTEST_ARGS="-x -k kernels" tests/gpu/run.sh      # extra pytest arguments
# When $OUT is set (the device machine's output folder), the benchmark's CSVs and profiles are copied there.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PY=${PY:-python}
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # never reach a registry
export RDKV_GPU_TESTS_DEVICE=${RDKV_GPU_TESTS_DEVICE:-cuda}  # no GPU: an error, not a suite of skips
BENCH_ARGS=${RDKV_GPU_BENCH_ARGS:-}
TEST_LIMIT=400 BENCH_LIMIT=140  # seconds; the GPU run takes about 3 + 1 minutes
if [ "$RDKV_GPU_TESTS_DEVICE" = cpu ]; then
    export TRITON_INTERPRET=${TRITON_INTERPRET:-1}  # read when triton is imported: set before Python starts
    BENCH_ARGS=${BENCH_ARGS:-"--device cpu --contexts 512 1024 --steps 3 --out-dir ${TMPDIR:-/tmp}/rdkv-gpu-dry-run"}
    TEST_LIMIT=1800 BENCH_LIMIT=600  # the interpreter on a small CPU
fi

versions() {
    "$PY" - <<'EOF'
import importlib.metadata as md
import platform

import torch


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {version('transformers')}, triton {version('triton')}, accelerate {version('accelerate')}")
print(f"GPU: {gpu}" + (f" (x{torch.cuda.device_count()})" if torch.cuda.is_available() else ""))
EOF
}

echo "== environment"
versions || exit 2

if [ -z "${RDKV_GPU_NO_INSTALL:-}" ]; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "== installing ${wheels[*]} (no deps)"
        "$PY" -m pip install -q --no-deps --no-index "${wheels[@]}" || exit 2
        versions || exit 2
    fi
    echo "== installing rdkv_hf from $(pwd) (no deps, no build isolation)"
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
        echo "run.sh: the editable install failed (no setuptools?); testing this tree through PYTHONPATH" >&2
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import rdkv_hf, sys; print('rdkv_hf', rdkv_hf.__version__, 'from', rdkv_hf.__file__)" || exit 2

status=0
echo "== pytest tests/gpu"
# shellcheck disable=SC2086  # RDKV_GPU_PYTEST_ARGS: extra pytest words (-x, -k EXPR)
timeout $TEST_LIMIT "$PY" -m pytest -q -rs --durations=10 tests/gpu ${RDKV_GPU_PYTEST_ARGS:-} || status=$?

echo "== benchmarks/bench_gpu_decode.py $BENCH_ARGS"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout $BENCH_LIMIT "$PY" benchmarks/bench_gpu_decode.py $BENCH_ARGS || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }

if [ -n "${OUT:-}" ] && [ -d benchmarks/results/gpu ]; then
    mkdir -p "$OUT/gpu-results" && cp benchmarks/results/gpu/*.csv benchmarks/results/gpu/profile-*.txt "$OUT/gpu-results/" 2>/dev/null
fi
[ "$status" -eq 0 ] && echo "== tests/gpu/run.sh: all passed" || echo "== tests/gpu/run.sh: FAILED (exit $status)"
exit "$status"
