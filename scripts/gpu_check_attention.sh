# GPU check of the jagged attention family: build, CUDA tests, block sweep, benchmark (results under $OUT or ./gpu_out).
OUT=${OUT:-gpu_out}; mkdir -p $OUT
set -x
nvidia-smi --query-gpu=name,clocks.sm --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
git log -1 --oneline; ls unirec/ops
export PYTHONUNBUFFERED=1 MAX_JOBS=16 UNIREC_CUDA=0 PYTHONPATH=$PWD
time python3 setup.py -q build_ext --inplace > $OUT/build.log 2>&1 || tail -20 $OUT/build.log
timeout 150 python3 -m pytest tests/ops/test_attention.py -q -x -k cuda --durations=8 -p no:cacheprovider 2>&1 | tee $OUT/test.log | tail -25
timeout 150 python3 benchmarks/tune_attention_blocks.py 2>&1 | tee $OUT/sweep.log
timeout 150 python3 -m pytest benchmarks/bench_attention.py --benchmark-only --benchmark-json=$OUT/bench.json -q -p no:cacheprovider 2>&1 | tail -3
python3 benchmarks/report.py $OUT/bench.json
