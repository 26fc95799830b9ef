"""How many kernels does one decode step launch? ours, fp32 vs bf16 (issue 19: the graph decoder is
launch-bound, so bf16 loses where it runs more kernels per token: casts, bias adds).

    python benchmarks/count_decode_kernels.py                       # small model, batch 1: fp32, bf16, bf16 unfused
    python benchmarks/count_decode_kernels.py --models small,large --batch 8
    python benchmarks/count_decode_kernels.py --models large --precisions bf16 --variant before   # issue 19's
                                        # decode fusions off (bench_decode_gpu.py: decode_variant), to compare

The decoder (tinygrad_lm/decode_cuda.py) is set up as bench_decode_gpu.py does (bf16: autocast_ and
the blocks' weights stored in bfloat16), prefill and step 1 run; then one more decode step is
captured into a CUDA graph of our own through the driver API (cuStreamBeginCapture on the
decoder's stream; CuPy's Graph does not expose its cudaGraph_t), and its nodes are counted by type
(cuGraphGetNodes / cuGraphNodeGetType), the kernel nodes also by name where the driver gives one
(cuFuncGetName). The captured graph is destroyed, never launched. Prints JSON.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

from bench_decode_gpu import MODELS, VARIANTS, bf16_inference_, decode_variant
from tinygrad_lm.model import GPT, GPTConfig

NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
              7: "event_record", 8: "ext_sema_signal", 9: "ext_sema_wait", 10: "mem_alloc", 11: "mem_free",
              12: "batch_mem_op", 13: "conditional"}
_CAPTURE_MODE_RELAXED = 2   # CU_STREAM_CAPTURE_MODE_RELAXED: CuPy's pool may cudaMalloc inside the capture


def _driver() -> ctypes.CDLL:
    cu = ctypes.CDLL("libcuda.so.1")
    P, PP = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)
    cu.cuStreamBeginCapture_v2.argtypes = [P, ctypes.c_int]
    cu.cuStreamEndCapture.argtypes = [P, PP]
    cu.cuGraphGetNodes.argtypes = [P, P, ctypes.POINTER(ctypes.c_size_t)]
    cu.cuGraphNodeGetType.argtypes = [P, ctypes.POINTER(ctypes.c_int)]
    cu.cuGraphDestroy.argtypes = [P]
    return cu


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"count_decode_kernels: {what} failed with CUresult {status}")


def _kernel_name(cu: ctypes.CDLL, node: int) -> str:
    """The kernel node's function name, or '?' where this driver does not say."""
    try:
        params = (ctypes.c_uint64 * 64)()  # CUDA_KERNEL_NODE_PARAMS(_v2) (72 bytes, room to spare): func first
        get = getattr(cu, "cuGraphKernelNodeGetParams_v2", None) or cu.cuGraphKernelNodeGetParams
        if get(ctypes.c_void_p(node), params) != 0 or not params[0]:
            return "?"
        name = ctypes.c_char_p()
        if cu.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(params[0])) != 0 or not name.value:
            return "?"
        return name.value.decode(errors="replace")[:90]
    except (AttributeError, OSError):
        return "?"


def count_step(model, batch: int) -> dict:
    """Nodes of one captured decode step of `model` at `batch` rows (greedy)."""
    import cupy as cp

    from tensor.tensor import no_grad
    from tinygrad_lm.decode_cuda import GPUDecoder
    cu = _driver()
    prompt = np.ones((batch, 1), dtype=np.int64)
    with no_grad():
        dec = GPUDecoder(model, prompt, np.zeros(batch, dtype=np.int64), 8, temperature=0, lookahead=0)
        dec._launch(0)   # prefill
        dec._launch(1)   # the eager step (kernels compiled, workspaces sized) and the decoder's own capture
        dec.stream.synchronize()
        pool = cp.cuda.MemoryPool()
        graph = ctypes.c_void_p()
        with dec.stream, cp.cuda.using_allocator(pool.malloc):
            _check(cu.cuStreamBeginCapture_v2(dec.stream.ptr, _CAPTURE_MODE_RELAXED), "cuStreamBeginCapture")
            try:
                dec._step()
            finally:
                _check(cu.cuStreamEndCapture(dec.stream.ptr, ctypes.byref(graph)), "cuStreamEndCapture")
    try:
        n = ctypes.c_size_t(0)
        _check(cu.cuGraphGetNodes(graph, None, ctypes.byref(n)), "cuGraphGetNodes")
        nodes = (ctypes.c_void_p * n.value)()
        _check(cu.cuGraphGetNodes(graph, nodes, ctypes.byref(n)), "cuGraphGetNodes")
        types, names = collections.Counter(), collections.Counter()
        for node in nodes[:n.value]:
            t = ctypes.c_int(-1)
            _check(cu.cuGraphNodeGetType(node, ctypes.byref(t)), "cuGraphNodeGetType")
            types[NODE_TYPES.get(t.value, str(t.value))] += 1
            if t.value == 0:
                names[_kernel_name(cu, node)] += 1
    finally:
        cu.cuGraphDestroy(graph)
    return {"nodes": int(n.value), "kernel_nodes": types.get("kernel", 0), "nodes_by_type": dict(types),
            "kernels_by_name": dict(names.most_common())}


def count_unfused(model, batch: int) -> dict:
    """count_step as before the fusions: LayerNorms writing float32 (the Linear casts), and the bias
    kernels instead of cuBLASLt's epilogue (switched off for this count only)."""
    from nn.layers import LayerNorm
    from tensor.cuda import cublaslt
    for m in model.modules():
        if isinstance(m, LayerNorm):
            m.out_dtype = None
    keep, cublaslt._supports = cublaslt._supports, (lambda *args: False)
    try:
        return count_step(model, batch)
    finally:
        cublaslt._supports = keep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="small")
    ap.add_argument("--precisions", default="fp32,bf16,bf16-unfused",
                    help="bf16-unfused: bf16 without the LayerNorm output in bf16 and the bias epilogues")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--variant", default="current", choices=("current",) + VARIANTS,
                    help="the residual-add / GELU-epilogue / split-K switches (bench_decode_gpu.py)")
    a = ap.parse_args()
    rows = []
    for name in a.models.split(","):
        per = {}
        for prec in a.precisions.split(","):
            cfg = GPTConfig(vocab_size=65, block_size=256, pos_encoding="learned", **MODELS[name])
            model = GPT(cfg, seed=0).eval()   # as bench_decode_gpu.py
            model.to("cuda")
            if prec.startswith("bf16"):
                bf16_inference_(model)
            with decode_variant(a.variant):
                per[prec] = count_unfused(model, a.batch) if prec == "bf16-unfused" else count_step(model, a.batch)
            rows.append({"model": name, "precision": prec, "batch": a.batch, "variant": a.variant, **per[prec]})
        for low in ("bf16", "bf16-unfused"):
            if "fp32" in per and low in per:
                rows.append({"model": name, "batch": a.batch,
                             f"{low}_vs_fp32_kernel_nodes": round(per[low]["kernel_nodes"] / per["fp32"]["kernel_nodes"], 3)})
    print(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
