"""Fast decoding on the GPU: a static KV cache, the decode step (sampling included) captured once as a
CUDA graph and replayed per token (the static-cache + "reduce-overhead" recipe of gpt-fast).

    dec = GPUDecoder(model, seq, pads, 256, temperature=0, stop_tokens=[0])
    for tokens in dec: ...          # (B,) int64 per step, as tinygrad_lm.sample.stream yields them

`tinygrad_lm.sample.stream` / `generate` come here when the model is on CUDA (cuda_graph=None: where
`refusal` finds nothing against it; True: or a ValueError saying why not; False: never).

How a step runs, and why nothing in it depends on a host value that changes per token:
  * prefill (once, eagerly): the whole (left-padded) prompt in one forward through ordinary KVCaches
    preallocated to L = prompt + new tokens - 1 columns, in the dtype of the attention's inputs;
  * the device state: `col` (int32, the cache column of the token being fed), `pos` (B, 1) (its
    position in each row: col - padding), `mask` (B, L) bool (True = a real key that is filled; the
    padding columns stay False, column col is set before the step), the sampler's RNG `counter`,
    `tokens` (B,) (the picks, which are also the next step's input) and the stop-token flags;
  * a decode step = the model's own forward on (tokens, mask, pos) with StaticKVCaches (the new key
    and value written at column col by a kernel; attention over all L columns with the mask, by the
    fused decode-attention kernel, tensor/cuda/decode_attention.py), then the device sampler
    (tensor/cuda/sampling.py), then one kernel that advances col, pos, mask and counter;
  * step 1 runs eagerly (it compiles the kernels and sizes cuBLAS's workspace), then the same step is
    captured into a graph (its temporaries in a memory pool of its own) and replayed for every further
    token. After each step the picked ids are copied asynchronously into pinned host memory: the only
    host traffic per token. The host runs `lookahead` steps ahead of the tokens it has yielded.
Sampling draws come from a counter-based RNG on the device: a seed reproduces a run on the GPU, but
not the CPU sampler's NumPy draws (greedy decoding is the same as the CPU's on the same logits).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Iterator, Sequence

import numpy as np

from tensor import backend
from tensor.tensor import Tensor

_ADVANCE = r"""
extern "C" __global__ void decode_advance(int* col, long long* pos, unsigned char* mask, long long* counter,
                                          int B, int L) {
    const int c = col[0] + 1;
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
        pos[b] += 1;
        if (c < L) mask[(long long)b * L + c] = 1;
    }
    __syncthreads();
    if (threadIdx.x == 0) { col[0] = c; counter[0] += 1; }
}
"""


@functools.lru_cache(maxsize=None)
def _advance_kernel() -> Any:
    return backend.cupy_module().RawKernel(_ADVANCE, "decode_advance")


def refusal(model: Any, prompt_len: int, max_new_tokens: int) -> str | None:
    """Why the CUDA-graph decoder cannot run this request, or None when it can."""
    need = prompt_len + max_new_tokens - 1
    if need > model.config.block_size:
        return (f"a {prompt_len}-token prompt and {max_new_tokens} new tokens need {need} positions, past "
                f"block_size {model.config.block_size}: the graph decoder keeps the whole sequence in its static "
                f"cache (past block_size the window slides, which only the eager sampler does)")
    if backend.device_of(model.transformer.wte.weight.data) != "cuda":
        return "the model is on the CPU; CUDA graphs need the model on the GPU (--device cuda)"
    return None


class StaticKVCache:
    """One layer's keys and values (B, H, L, D) in place, for a decode step of one token: `append`
    writes the token's key and value at column col[0] (a device int32, read when the kernel runs)
    and returns the whole buffers; the decoder's mask says which columns are filled."""

    def __init__(self, k: Any, v: Any, col: Any) -> None:
        self.k, self.v, self.col = k, v, col
        self.length = k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H, 1, D) of the new token -> the caches (B, H, L, D)."""
        from tensor.cuda.decode_attention import kv_cache_write
        if k.shape[2] != 1:
            raise ValueError(f"StaticKVCache: one token per step, got keys of shape {k.shape}")
        kd, vd = k.data, v.data
        if kd.dtype != self.k.dtype:
            kd, vd = kd.astype(self.k.dtype), vd.astype(self.k.dtype)
        kv_cache_write(self.k, self.v, kd, vd, self.col)
        return Tensor.wrap(self.k), Tensor.wrap(self.v)


class GPUDecoder:
    """Iterating yields the next token of every row, (B,) int64 host arrays, like sample.stream: rows
    that produced a stop token repeat it; the iteration ends when every row has stopped.

    seq (B, T) left-padded prompt ids (host), pads (B,) the padding of each row; cuda_graph False runs
    the same device step eagerly every token (no capture); lookahead: steps queued ahead of the last
    token handed out (0: each step is waited for before the next is queued); strict False: a capture
    that fails falls back to eager device steps with a RuntimeWarning (True: the error is raised).
    The model must be in eval mode, under no_grad (sample.stream does both)."""

    def __init__(self, model: Any, seq: np.ndarray, pads: np.ndarray, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_tokens: Sequence[int] = (), cuda_graph: bool = True,
                 lookahead: int = 2, strict: bool = True) -> None:
        from tensor.cuda.sampling import DeviceSampler
        why = refusal(model, seq.shape[1], max_new_tokens)
        if why is not None:
            raise ValueError(f"GPU decoder: {why}")
        cp = backend.cupy_module()
        import cupyx
        B, T = seq.shape
        self.model, self.n, self.use_graph, self.lookahead = model, max_new_tokens, cuda_graph, max(0, lookahead)
        self.vocab = model.config.vocab_size  # the sampler sees the real columns only, never pad_vocab_to's
        self.seq, self.pads, self.strict = seq, pads, strict
        self.L = L = T + max(max_new_tokens, 1) - 1
        self.caches = model.new_caches(B, L)  # in attention's dtype: the compute dtype under mixed precision
        self.col = cp.asarray(np.array([T - 1], dtype=np.int32))
        mask = np.zeros((B, L), dtype=bool)
        mask[:, :T] = np.arange(T)[None, :] >= pads[:, None]
        self.mask = cp.asarray(mask)
        self.pos = cp.asarray((T - 1 - pads)[:, None].astype(np.int64))
        self.sampler = DeviceSampler(B, temperature, top_k, top_p, seed, stop_tokens)
        self.idx = self.sampler.tokens.reshape(B, 1)  # the picks are the next step's input
        self.static = [StaticKVCache(c.k, c.v, self.col) for c in self.caches]
        self.stops = np.asarray(list(stop_tokens), dtype=np.int64)
        self.pinned = cupyx.empty_pinned((max(max_new_tokens, 1), B), np.int64)
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph, self.pool, self.events = None, None, []
        cp.cuda.Device().synchronize()  # the state above was written on the default stream

    # ------------------------------------------------------------ the device work
    def _prefill(self) -> None:
        from tinygrad_lm.sample import _window_inputs
        _, positions, real = _window_inputs(self.seq, self.pads, self.model.config.block_size)
        logits, _ = self.model(self.seq, mask=real if self.pads.any() else None, positions=positions,
                               caches=self.caches)
        self.sampler(logits.data[:, -1, :self.vocab])
        self._advance()

    def _step(self) -> None:
        """One token through the model at column col, its successor picked: everything on the device."""
        logits, _ = self.model(self.idx, mask=self.mask, positions=self.pos, caches=self.static)
        self.sampler(logits.data[:, -1, :self.vocab])
        self._advance()

    def _advance(self) -> None:
        B = self.pos.shape[0]
        _advance_kernel()((1,), (min(256, max(32, B)),),
                          (self.col, self.pos, self.mask, self.sampler.counter, np.int32(B), np.int32(self.L)))

    def _capture(self) -> None:
        cp = backend.cupy_module()
        self.stream.synchronize()
        self.pool = cp.cuda.MemoryPool()  # the graph's temporaries, alive as long as the graph
        with cp.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                self._step()
            finally:
                self.graph = self.stream.end_capture()

    def _launch(self, i: int) -> None:
        """Queue step i (0: prefill; 1: eager, then captured; later: replayed) and its token copy."""
        cp = backend.cupy_module()
        with self.stream:
            if i == 0:
                self._prefill()
            elif self.graph is None:
                self._step()
                if self.use_graph and i + 1 < self.n:
                    try:
                        self._capture()
                    except Exception as e:  # noqa: BLE001 -- a CUDA/CuPy error from the capture
                        if self.strict:
                            raise
                        self.use_graph, self.graph = False, None   # nothing captured ran: decode eagerly
                        warnings.warn(f"GPU decoder: the CUDA-graph capture failed ({type(e).__name__}: {e}); "
                                      "decoding with eager device steps instead", RuntimeWarning, stacklevel=2)
            else:
                self.graph.launch(stream=self.stream)
            tokens = self.sampler.tokens
            cp.cuda.runtime.memcpyAsync(self.pinned[i].ctypes.data, tokens.data.ptr, tokens.nbytes,
                                        cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr)
            self.events.append(self.stream.record())

    def __iter__(self) -> Iterator[np.ndarray]:
        B = self.pos.shape[0]
        done = np.zeros(B, dtype=bool)
        launched = 0
        try:
            for i in range(self.n):
                while launched < self.n and launched <= i + self.lookahead:
                    self._launch(launched)
                    launched += 1
                self.events[i].synchronize()
                tokens = self.pinned[i].copy()
                done |= np.isin(tokens, self.stops)
                yield tokens
                if done.all():
                    break
        finally:
            self.stream.synchronize()
