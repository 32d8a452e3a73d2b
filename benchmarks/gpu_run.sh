#!/usr/bin/env bash
# One GPU session, under 10 minutes in total: environment, the first-run GPU tests, the benchmark.
#
#   benchmarks/gpu_run.sh [OUT_DIR]        (default: benchmarks/results/gpu-<timestamp>)
#
# Needs only what a bare GPU machine has: python3 (or $PYTHON) with torch, triton and numpy.
# Installs nothing and needs no network: the repository root goes on PYTHONPATH. pytest (and
# hypothesis) may be missing: then the test phase is skipped and says so. matplotlib may be
# missing: then there are no plots; the table, results.json and summary.md are always written.
#
# Time budget (seconds; override with the environment variables named):
#   phase 1  environment                          ~5    (nvidia-smi, versions)
#   phase 2  first-run GPU tests, group by group  each under its own limit (FIRST_RUN below;
#            315 in all), in the order that a first GPU run needs answered: the TMA GEMMs
#            against native, the MSE ticket and graph capture, CUDA graphs, determinism (with
#            CUBLAS_WORKSPACE_CONFIG set), the Triton/cuBLAS choice, SGD, the fused MLP, its
#            second order, the rest of the kernels' CUDA tests. Each group is its own process; a CUDA fault
#            (illegal address, launch failure, device-side assert) in any group stops the whole
#            run with a report: no benchmark times a kernel that faults.
#   phase 3  benchmark: python -m benchmarks      the rest of TOTAL_BUDGET_S (560) less RESERVE_S
#            (40: 30 s for phase 4, 10 s for the kill grace), with the runner's own --budget
#            STOP_MARGIN_S (30) below its limit, so that the pass in flight when it stops
#            starting new ones can finish and the plots be drawn; the runner writes
#            results.json after every pass, so an outer timeout still leaves everything measured
#            so far. Passes run most important first: `python -m benchmarks --plan` lists them
#            with their compile counts and estimated times.
#   phase 4  only if phase 3 was cut off: re-render table/summary/plots (limit 30 s)
# Worst case: about 560 s.
# Everything (logs, results.json, summary.md, plots/, phases.txt) lands in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-560}
RESERVE_S=${RESERVE_S:-40}
STOP_MARGIN_S=${STOP_MARGIN_S:-30}
BENCH_ARGS=${BENCH_ARGS:-"--rep-ms 50 --warmup-ms 10"}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
T0=$(date +%s)
PHASES="$OUT/phases.txt"
: >"$PHASES"

elapsed() { echo $(($(date +%s) - T0)); }
phase_done() { # name, start, status
    local line
    line=$(printf '%-12s %4d s  (total %4d s)  %s' "$1" $(($(date +%s) - $2)) "$(elapsed)" "$3")
    echo "== $line"
    echo "$line" >>"$PHASES"
}

# ---- phase 1: environment --------------------------------------------------------------------
t=$(date +%s)
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    timeout 60 "$PY" - <<'EOF' 2>&1
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for mod in ("triton", "numpy", "pytest", "hypothesis", "matplotlib", "pytest_benchmark"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "MISSING:", type(e).__name__)
import manualbp
print("manualbp", manualbp.__version__, "backend", manualbp.get_backend())
EOF
} | tee "$OUT/environment.txt"
phase_done environment "$t" "see environment.txt"

# ---- phase 2: first-run GPU tests ------------------------------------------------------------
# name | limit (s) | pytest arguments. In this order: what a first GPU run must answer first.
FIRST_RUN=(
    "tma_gemm|50|tests/kernels/test_matmul_hopper.py -m cuda"
    "mse|35|tests/test_mse.py::test_cuda_graph_capture tests/test_mse.py::test_cuda_loss_is_independent_of_the_grid tests/test_mse.py::test_cuda_large_n_precision"
    "cuda_graphs|30|tests/test_cuda_graphs.py"
    "determinism|40|tests/test_determinism.py -m cuda"
    "linear_choice|30|tests/test_linear_choice.py -m cuda"
    "sgd|25|tests/kernels/test_sgd_kernels.py -m cuda"
    "fused_mlp|35|tests/kernels/test_fused_mlp_kernels.py -k accurate_as_native"
    "second_order|20|tests/test_fused_mlp_second_order.py::test_launches_per_eikonal_step tests/test_fused_mlp_second_order.py::test_through_convert_and_sequential"
    "kernels|50|tests/kernels/test_linear_kernels.py tests/test_mse.py tests/test_amp.py tests/test_threads.py -m cuda"
)
FAULT='illegal memory access|illegal address|unspecified launch failure|device-side assert|CUDA error: (an )?illegal|misaligned address'
t=$(date +%s)
fault=""
if "$PY" -c "import pytest" 2>/dev/null; then
    status="groups:"
    for entry in "${FIRST_RUN[@]}"; do
        IFS='|' read -r name limit args <<<"$entry"
        g=$(date +%s)
        # shellcheck disable=SC2086
        CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout -k 5 "$limit" "$PY" -m pytest -q \
            -p no:cacheprovider --junitxml="$OUT/tests-$name.xml" $args \
            >"$OUT/tests-$name.log" 2>&1
        rc=$?
        case "$rc" in
        0) r="pass" ;; 5) r="none selected" ;; 124 | 137) r="STOPPED at ${limit} s" ;; *) r="exit $rc" ;;
        esac
        echo "   $name: $r ($(($(date +%s) - g)) s)   $(tail -n 1 "$OUT/tests-$name.log")"
        status="$status $name=$r"
        if grep -Eq "$FAULT" "$OUT/tests-$name.log"; then
            fault=$name
            grep -Em 3 "$FAULT" "$OUT/tests-$name.log"
            break
        fi
    done
else
    status="SKIPPED: pytest is not installed on this machine"
    echo "$status" | tee "$OUT/tests.log"
fi
if [ -n "$fault" ]; then
    phase_done tests "$t" "CUDA FAULT in group '$fault' (tests-$fault.log): run stopped"
    cat "$PHASES"
    echo "STOPPED: a kernel faulted on the GPU; nothing was benchmarked. See $OUT/tests-$fault.log"
    exit 3
fi
phase_done tests "$t" "$status"

# ---- phase 3: benchmark ----------------------------------------------------------------------
t=$(date +%s)
left=$((TOTAL_BUDGET_S - $(elapsed) - RESERVE_S))
if [ "$left" -lt 60 ]; then left=60; fi
runner_budget=$((left - STOP_MARGIN_S))
# shellcheck disable=SC2086
timeout -k 10 --signal=INT "$left" "$PY" -m benchmarks --out "$OUT" --budget "$runner_budget" \
    $BENCH_ARGS 2>&1 | tee "$OUT/benchmark.log"
rc=${PIPESTATUS[0]}
case "$rc" in
0) status="complete" ;;
1) status="complete; some providers errored (see results.json / benchmark.log)" ;;
124 | 130 | 137) status="STOPPED at the ${left} s limit; results.json holds every case finished" ;;
*) status="runner exit $rc (see benchmark.log)" ;;
esac
phase_done benchmark "$t" "$status"

# ---- phase 4: re-render if phase 3 was cut off ------------------------------------------------
if [ -f "$OUT/results.json" ] && ! grep -q '"complete": true' "$OUT/results.json"; then
    t=$(date +%s)
    timeout -k 2 30 "$PY" -m benchmarks --from-json "$OUT/results.json" >"$OUT/rerender.log" 2>&1
    phase_done rerender "$t" "exit $? (see rerender.log)"
fi

echo
cat "$PHASES"
echo "total $(elapsed) s; everything is in $OUT"
