"""Where the CUDA-graph decoder's time goes outside its kernels (issue 19): the captured decode step replayed
back to back, alone, with the token's copy to pinned host memory, and with the copy and an event (what the
decoder adds per token), against the decoder itself (tinygrad_lm/decode_cuda.py: GPUDecoder) at several
lookaheads. µs per step; bf16 as bench_decode_gpu.py sets it up (bf16_inference_).

    python benchmarks/bench_decode_loop.py --models large --batches 1 32 --lookaheads 0,1,2,4,8

Replays: after the prefill and step 1 (eager, then the capture), --replays launches of the graph, then one
synchronisation (the static cache has room: the decoder is built for 255 new tokens). Decoder: greedy,
--new-tokens tokens from a one-token prompt, timed from step 2 as bench_decode_gpu.py's ours_graph, best of
--repeats. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

from bench_decode_gpu import MODELS, bf16_inference_
from tinygrad_lm.model import GPT, GPTConfig


def replays(model, B: int, n: int) -> dict:
    """µs per launch of the captured step: alone, + the token copy, + the copy and an event record."""
    import cupy as cp
    from tensor.tensor import no_grad
    from tinygrad_lm.decode_cuda import GPUDecoder
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (B, 1))
    out = {}
    with no_grad():
        dec = GPUDecoder(model, prompt, np.zeros(B, dtype=np.int64), 255, temperature=0)
        it = iter(dec)
        next(it), next(it)   # the prefill; step 1 and the capture
        s, tok = dec.stream, dec.sampler.tokens
        for mode in ("alone", "copy", "copy+event"):
            s.synchronize()
            t0 = time.perf_counter()
            for i in range(n):
                dec.graph.launch(stream=s)
                if mode != "alone":
                    cp.cuda.runtime.memcpyAsync(dec.pinned[i].ctypes.data, tok.data.ptr, tok.nbytes,
                                                cp.cuda.runtime.memcpyDeviceToHost, s.ptr)
                if mode == "copy+event":
                    s.record()
            s.synchronize()
            out[mode] = round((time.perf_counter() - t0) / n * 1e6, 1)
        it.close()
    return out


def decoder(model, B: int, n: int, lookahead: int, repeats: int) -> float:
    """µs per step of the decoder itself at this lookahead (steps 2 + lookahead .. n-1)."""
    import cupy as cp
    from tensor.tensor import no_grad
    from tinygrad_lm.decode_cuda import GPUDecoder
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (B, 1))
    best = float("inf")
    for _ in range(repeats):
        with no_grad():
            dec = GPUDecoder(model, prompt, np.zeros(B, dtype=np.int64), n, temperature=0, lookahead=lookahead)
            t0 = 0.0
            for i, _tokens in enumerate(dec):
                if i == 1:
                    cp.cuda.Device().synchronize()
                    t0 = time.perf_counter()
        best = min(best, (time.perf_counter() - t0) / (n - 2 - lookahead))
    return round(best * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="large")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--lookaheads", default="0,1,2,4,8")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--replays", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        cfg = GPTConfig(vocab_size=65, block_size=256, pos_encoding="learned", **MODELS[name])
        model = GPT(cfg, seed=0).eval()
        model.to("cuda")
        bf16_inference_(model)
        for B in args.batches:
            decoder(model, B, 8, 2, 1)   # warm-up: kernels compiled
            row = {"model": name, "batch": B, "replay_us": replays(model, B, args.replays),
                   "decoder_us_by_lookahead": {la: decoder(model, B, args.new_tokens, int(la), args.repeats)
                                               for la in args.lookaheads.split(",")}}
            rows.append(row)
    print(json.dumps({"precision": "bf16", "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
