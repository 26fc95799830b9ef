"""CUDA fast paths, one module per op (CuPy RawKernel/RawModule code and cuBLAS through ctypes).
Nothing here is imported until an op first runs on the GPU (tensor/dispatch.py)."""
