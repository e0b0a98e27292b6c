#!/usr/bin/env bash
# One call on the GPU machine for the retrieval and loss families: build in
# place, run their tests on CUDA, then the GPU benchmarks (table last).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
UNIREC_CUDA=1 $PY setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
export PYTHONPATH=$PWD:$PWD/benchmarks
$PY -c "import unirec; print(unirec.build_info()['backends'])"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest tests/ops/test_retrieval.py tests/ops/test_loss.py -q -k cuda -p no:cacheprovider --durations=5 2>&1 | tail -25
timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/scoring_gpu.py ${BENCH_ARGS:-} 2>&1 | tail -25
