#!/usr/bin/env bash
# The checks that need a GPU, as one command for a session lent one (the device tool's `run`, whose 15 minutes
# include starting the machine): build the CUDA extension, run the gpu- and triton-marked tests on the GPU,
# then the GPU benchmarks. Each step has its own time limit, so a slow step cannot eat the next one's time,
# and a failing step does not stop the others. Everything lands in $OUT (default ./gpu-out): summary.txt
# (one line per step), probe.txt (tools/gpu_probe.py: the dense solvers' speed on this machine), all.log
# (every step's output) and one pytest-benchmark JSON per benchmark step; turn
# a JSON into a table with `python benchmarks/report.py FILE.json`.
#
#   run(command="bash tools/gpu_check.sh", timeout_s=580)
#
# Step limits (seconds) can be overridden: GPU_CHECK_LIMITS="build=240 tests=120 ...".
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export FASTMERGE_BUILD_CUDA=${FASTMERGE_BUILD_CUDA:-1}
# 565 s in all: inside one run's 600 s, with the machine's start, in 15 minutes of device time
declare -A LIMIT=([build]=170 [probe]=25 [tests]=150 [subspace]=110 [kernels]=60 [engine]=50)
for kv in ${GPU_CHECK_LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done
BENCH=(-m benchmark -o addopts= -q -p no:cacheprovider)
failed=0

step() {  # step NAME CMD...: run CMD under NAME's limit, log to all.log, one line to summary.txt
    local name=$1 t0=$SECONDS rc
    shift
    echo "===== $name (limit ${LIMIT[$name]} s): $*" >> "$OUT/all.log"
    timeout "${LIMIT[$name]}" "$@" >> "$OUT/all.log" 2>&1
    rc=$?
    echo "$name: rc=$rc, $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ', TIMED OUT')" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || failed=1
}

$PY - <<'EOF' | tee "$OUT/summary.txt"
import torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, {gpu}")
EOF
step build "$PY" -m pip install -q --no-build-isolation --no-deps -e .
step probe bash -c "set -o pipefail; '$PY' tools/gpu_probe.py | tee '$OUT/probe.txt'"
# one line per test as it ends (and the workers of pytest-xdist where installed), so a step cut by its limit
# still names its failures in all.log and summary.txt
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
step tests "$PY" -m pytest -v -rfE -p no:cacheprovider -o addopts= $XDIST -m "gpu or triton" tests
grep -E "(FAILED|ERROR) tests/" "$OUT/all.log" | sed 's/^/  /' | sort -u >> "$OUT/summary.txt"
step subspace "$PY" -m pytest benchmarks/bench_subspace.py -k gpu "${BENCH[@]}" --benchmark-json="$OUT/subspace-gpu.json"
step kernels "$PY" -m pytest benchmarks/bench_sign_consensus.py -k "(cuda or triton or reference) and 14336x4096" "${BENCH[@]}" \
    --benchmark-json="$OUT/kernels-gpu.json"
# the engine case generates the 268M-parameter family first (benchmarks/.cache/, most of its limit)
step engine "$PY" -m pytest benchmarks/bench_engine.py -k gpu "${BENCH[@]}" --benchmark-json="$OUT/engine-gpu.json"
exit $failed
