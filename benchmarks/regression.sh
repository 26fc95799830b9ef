#!/usr/bin/env bash
# Old commit against new for the figures the architecture must not regress, in one run:
# bench_train (CPU shakespeare-char and gpt-medium; CUDA gpt-medium fp32/bf16, eager and CUDA graph)
# and bench_sample (CPU), each through bench_compare.py (baseline and candidate trees in turn).
# CPU runs are pinned to cores 0,1 with 2 threads a side; the CUDA run uses the other cores, in parallel.
#
#   mkdir -p /tmp/base && git archive <old-commit> | tar -x -C /tmp/base
#   bash benchmarks/regression.sh /tmp/base OUTDIR [DATA] [cpu|cuda|all]   # DATA: tinyshakespeare.txt
set -u
export PY=${PYTHON:-python3}
base=$1; out=$2; data=${3:-/work/shared/data/tinyshakespeare.txt}; parts=${4:-all}
mkdir -p "$out"
cmp() { $PY benchmarks/bench_compare.py --baseline "$base" "$@"; }
[ "$parts" = cuda ] || (
  export OMP_NUM_THREADS=2
  taskset -c 0,1 env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE bash -c "
    $(declare -f cmp); base=$base
    cmp --rounds 2 --out $out/cpu_shakespeare_char.json bench_train.py --config shakespeare-char --threads 2 --data $data >/dev/null 2>$out/cpu_shakespeare_char.err
    cmp --rounds 1 --out $out/cpu_sample.json bench_sample.py --threads 2 --batches 1 8 --repeats 2 --skip-uncached >/dev/null 2>$out/cpu_sample.err
    cmp --rounds 1 --out $out/cpu_gpt_medium.json bench_train.py --config gpt-medium --steps 4 --threads 2 --data $data >/dev/null 2>$out/cpu_gpt_medium.err"
) &
if [ "$parts" != cpu ] && $PY -c "import cupy; cupy.cuda.runtime.getDeviceCount()" 2>/dev/null; then
  taskset -c 2-15 $PY benchmarks/bench_compare.py --baseline "$base" --rounds 1 --out "$out/cuda_gpt_medium.json" \
    bench_train.py --device cuda --config gpt-medium --precisions fp32,bf16 --impls ours,ours-graph,torch --repeats 1 \
    --data "$data" >/dev/null 2>"$out/cuda_gpt_medium.err"
fi
wait
