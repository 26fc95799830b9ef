"""The decoding kernels' CUDA source (the sampler in tensor/cuda/sampling.py, the cache write in
tensor/cuda/decode_attention.py, the position advance in tinygrad_lm/decode_cuda.py) run on the CPU through
tests/cuda_emulation.py (host threads for CUDA threads), against the CPU sampler's filters and the cache's
layout: the kernels' logic checked on any machine. The decode-attention kernels have their own file,
tests/test_decode_attention_on_cpu.py. float32 only; tests/test_gpu_decode.py checks every dtype on a GPU.
Skipped without a C++ compiler."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from cuda_emulation import build
from tensor.cuda import decode_attention as DA
from tensor.cuda import sampling as SM
from tinygrad_lm import decode_cuda as DC
from tinygrad_lm.sample import filtered_probs

LAUNCHERS = r"""
extern "C" void run_sample(int threads, const float* logits, long long rs, int V, int B, int greedy, double inv_temp,
        int top_k, double top_p, unsigned long long seed, const long long* counter, long long* tokens, int* done,
        long long* finished, const long long* stops, int n_stops) {
    launch(Dim{(unsigned)B, 1, 1}, Dim{(unsigned)threads, 1, 1}, [=] {
        sample_rows<float>(logits, rs, V, greedy, inv_temp, top_k, top_p, seed, counter, tokens, done, finished,
                           stops, n_stops); });
}
extern "C" void run_write(const float* k, const float* v, float* ck, float* cv, const int* col, int H, int D,
        const long long* st, int n) {
    launch(Dim{(unsigned)((n + 255) / 256), 1, 1}, Dim{256, 1, 1}, [=] {
        kv_cache_write(k, v, ck, cv, col, H, D, 4, st[0], st[1], st[2], st[3], st[4], st[5], st[6], n); });
}
extern "C" void run_advance(int threads, int* col, long long* pos, unsigned char* mask, long long* counter, int B,
        int L) {
    launch(Dim{1, 1, 1}, Dim{(unsigned)threads, 1, 1}, [=] { decode_advance(col, pos, mask, counter, B, L); });
}
"""

_lib = build(SM._SOURCE + DA._WRITE_SOURCE + DC._ADVANCE, LAUNCHERS)
pytestmark = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")

if _lib is not None:
    vp, ll, i32, f64 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_double
    _lib.run_sample.argtypes = [i32, vp, ll, i32, i32, i32, f64, i32, f64, ctypes.c_ulonglong, vp, vp, vp, vp, vp, i32]
    _lib.run_write.argtypes = [vp, vp, vp, vp, vp, i32, i32, vp, i32]
    _lib.run_advance.argtypes = [i32, vp, vp, vp, vp, i32, i32]


def sample(logits, temperature=1.0, top_k=None, top_p=None, seed=0, counter=0, stops=(), threads=None):
    """The kernel on (B, V) logits, as DeviceSampler launches it (threads: a power of two >= 32, or given)."""
    lg = np.ascontiguousarray(logits, dtype=np.float32)
    B, V = lg.shape
    threads = threads or int(min(1024, max(32, 1 << (V - 1).bit_length())))
    tok, fin = np.zeros(B, np.int64), np.zeros(B, np.int64)
    done = np.zeros(B, np.int32)
    st = np.array(list(stops) or [0], np.int64)
    c = np.array([counter], np.int64)
    greedy = temperature == 0
    _lib.run_sample(threads, lg.ctypes.data, V, V, B, int(greedy), 0.0 if greedy else 1.0 / temperature,
                    int(top_k or 0), 1.0 if top_p is None else top_p, seed, c.ctypes.data, tok.ctypes.data,
                    done.ctypes.data, fin.ctypes.data, st.ctypes.data, len(stops))
    return tok, done


# ------------------------------------------------------------------ sampling
def test_greedy_is_argmax_first_index_on_ties():
    rng = np.random.default_rng(0)
    lg = rng.standard_normal((3, 700)).astype(np.float32)
    lg[1, [17, 500, 699]] = 9.0
    lg[2] = 0.0
    assert sample(lg, temperature=0)[0].tolist() == lg.argmax(axis=-1).tolist()


def test_draws_follow_the_numpy_rng_formula():
    got = sample(np.zeros((3, 40)), seed=123, counter=7)[0]
    assert got.tolist() == [int(np.argmax(SM.uniforms(123, 7, r, 40))) for r in range(3)]


def test_support_sets_equal_the_cpu_filters_with_ties():
    """Random tie-heavy logits and settings, one thread per row; then the launch's width (reductions
    over 32 threads) must draw the very same tokens (the draw is a function of seed, counter, row)."""
    rng = np.random.default_rng(1)
    for trial in range(60):
        V = int(rng.integers(2, 12))
        lg = rng.integers(-3, 4, V).astype(np.float32) * 0.5
        T = float(rng.choice([0.5, 1.0, 2.0]))
        k = int(rng.integers(0, V + 1))
        p = float(rng.choice([1.0, 0.3, 0.5, 0.7, 0.9, 0.99]))
        probs = filtered_probs(lg[None], T, k, p)[0]
        toks = sample(np.tile(lg, (2000, 1)), T, k, p, seed=trial, threads=1)[0]
        got = set(toks.tolist())
        assert got <= set(np.flatnonzero(probs).tolist()), (lg, T, k, p, got)
        assert set(np.flatnonzero(probs > 0.01).tolist()) <= got, (lg, T, k, p, got)
        if trial < 8:
            wide = sample(np.tile(lg, (12, 1)), T, k, p, seed=trial)[0]
            assert wide.tolist() == toks[:12].tolist()


def test_stop_tokens():
    lg = np.full((3, 8), -5.0, np.float32)
    lg[0, 2] = lg[1, 4] = lg[2, 6] = 5.0
    tok, done = sample(lg, temperature=0, stops=(2, 6))
    assert tok.tolist() == [2, 4, 6] and done.tolist() == [1, 0, 1]


# ------------------------------------------------------------------ cache write, advance
def test_cache_write_and_advance():
    rng = np.random.default_rng(2)
    ck, cv = np.zeros((2, 3, 10, 8), np.float32), np.zeros((2, 3, 10, 8), np.float32)
    qkv = rng.standard_normal((2, 1, 72)).astype(np.float32)       # (B, 1, 3C): k and v are strided views
    heads = qkv.reshape(2, 1, 3, 3, 8).transpose(2, 0, 3, 1, 4)
    col = np.array([6], np.int32)
    st = np.array([72, 8, 72, 8, 240, 80, 8], np.int64)
    _lib.run_write(qkv.ctypes.data + 24 * 4, qkv.ctypes.data + 48 * 4, ck.ctypes.data, cv.ctypes.data,
                   col.ctypes.data, 3, 8, st.ctypes.data, 2 * 3 * 8)
    assert np.array_equal(ck[:, :, 6], heads[1][:, :, 0]) and np.array_equal(cv[:, :, 6], heads[2][:, :, 0])
    assert not ck[:, :, :6].any() and not ck[:, :, 7:].any()
    pos, mask, counter = np.array([3, 1], np.int64), np.zeros((2, 10), bool), np.array([0], np.int64)
    for _ in range(4):   # columns 7, 8, 9, then 10: past the end, nothing written
        _lib.run_advance(32, col.ctypes.data, pos.ctypes.data, mask.ctypes.data, counter.ctypes.data, 2, 10)
    assert col[0] == 10 and pos.tolist() == [7, 5] and counter[0] == 4
    assert mask[:, 7:].all() and mask.sum() == 6
