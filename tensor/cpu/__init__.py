"""CPU fast paths: NumPy code that computes an op's reference formula faster (cache-sized blocks,
GEMV sums, transposed layouts, chunking). Each is chosen by tensor/dispatch.py and tested equal
to the reference it stands in for (tests/test_tensor_fastpaths.py).

    blocks.py      over_blocks: cache-sized pieces of an elementwise chain
    gelu.py        GeluCPU (fast path of ops/elementwise.py: Gelu)
    layernorm.py   LayerNormCPU (fast path of functional.py: LayerNorm)
    quant.py       LinearInt8CPU (fast path of quant.py: LinearInt8)
    reductions.py  sum_rows, sum_last, gemm as BLAS calls (behind functional.sum_rows/sum_last/gemm)
    scatter.py     scatter_add_rows by sorted runs and a one-hot GEMM (behind ops/indexing.py)
"""
