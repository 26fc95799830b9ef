"""CUDA fast paths, one module per op (CuPy RawKernel/RawModule code and cuBLAS through ctypes).
Nothing here is imported until an op first runs on the GPU (tensor/dispatch.py).

    common.py         usable(*arrays), CuPy itself, dtype tables, launch sizes
    rows.py           ROW_COMMON: block-wide reductions the row kernels share; row_module
    cublas.py         matmul through cuBLAS (gemmEx / gemmStridedBatchedEx)
    cublaslt.py       matmul_bias / matmul_bgrad: a Linear's bias in cuBLASLt's GEMM epilogue
    gelu.py           GeluCUDA and its kernels
    layernorm.py      LayerNormCUDA and its kernels
    cross_entropy.py  CrossEntropyCUDA and its kernels
    linear.py         LinearCUDA: cuBLAS products, the bias in the epilogue (or the bias kernel)
    quant.py          LinearInt8CUDA: the int8 GEMV kernel, dequantize + cuBLAS
    softmax.py        causal_softmax, softmax_backward (attention's)
    layout.py         split_heads, merge_heads, bias_add
    colsum.py         column_sums (behind functional.sum_rows)
    decode_attention.py  one query row against a KV cache (split-K + combine), the cache write
    sampling.py       DeviceSampler: greedy / temperature / top-k / top-p on the device, its RNG
"""
