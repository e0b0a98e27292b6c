#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: build unirec in place with its CUDA
# kernels, run the CUDA tests, run the benchmarks on CUDA, print a table last.
# Logs, the benchmark JSON and the benchmark records (records.jsonl: append it to
# benchmarks/results/ and run `python benchmarks/report.py tables --records ...`) go
# to $OUT (default /tmp/unirec-gpu-check).
# Needs torch (CUDA), triton, pytest and pytest-benchmark; where pytest-benchmark
# is missing, carry its wheel (and py-cpuinfo's) and put them on PYTHONPATH.
#
#   bash scripts/gpu_check.sh            # everything
#   BENCH_FILTER="tbe" bash scripts/gpu_check.sh   # a subset of benchmarks (-k)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/unirec-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh needs a CUDA GPU, and torch.cuda.is_available() is False here: nothing was checked." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

stamp "build (in place, sm_90)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} UNIREC_CUDA=1
if ! "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  echo "build failed: see $OUT/build.log"
  exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import unirec; print({k: v for k, v in unirec.build_info().items() if k != 'parallel'})"

stamp "CUDA tests"
timeout "${TEST_TIMEOUT:-300}" "$PY" -m pytest tests/ops -q -k cuda -p no:cacheprovider -x \
  > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/tests.log"

stamp "Triton attention block-size sweep (bf16, the GPU benchmark shape)"
timeout "${SWEEP_TIMEOUT:-120}" "$PY" benchmarks/tune_attention_blocks.py > "$OUT/sweep.log" 2>&1
tail -20 "$OUT/sweep.log"

stamp "benchmarks on CUDA"
UNIREC_BENCH_DEVICE=cuda UNIREC_BENCH_RECORDS="$OUT/records.jsonl" timeout "${BENCH_TIMEOUT:-300}" "$PY" -m pytest benchmarks/ --benchmark-only -q \
  -p no:cacheprovider ${BENCH_FILTER:+-k "$BENCH_FILTER"} --benchmark-json="$OUT/bench.json" \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
tail -5 "$OUT/bench.log"

stamp "summary"
cat "$OUT/gpu.txt"
echo "tests exit code: $tests_rc; benchmarks exit code: $bench_rc"
[ -f "$OUT/bench.json" ] && "$PY" benchmarks/report.py "$OUT/bench.json"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
