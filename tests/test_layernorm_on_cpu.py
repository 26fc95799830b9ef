"""The one-warp-a-row LayerNorm kernels' CUDA source (tensor/cuda/layernorm.py: LN_WARP_KERNELS) run on the
CPU through tests/cuda_emulation.py, in float32, by layernorm.py's own launch functions (grids, argument lists,
the (2, blocks, C) partial sums): y, mean, rstd, dx (with and without the gradient to add in, `acc`) and the
weight and bias gradients against the float64 formulas; rows that do not fill the last block, several rows per
warp, no weight. tests/test_gpu_fuse.py checks every dtype on a GPU. Skipped without a C++ compiler."""
from __future__ import annotations

import numpy as np
import pytest

from cuda_emulation import EmulatedKernel, build, packed_launcher
from tensor.cuda import layernorm as LN

NVS = (1, 3)
_NAMES = [n for nv in NVS for n in (f"ln_fwd_warp<float,float,{nv}>", f"ln_bwd_warp<float,float,{nv},{LN.BWD_WARPS}>")]
_lib = build(LN.LN_WARP_KERNELS, "".join(packed_launcher(f"run_{i}", n) for i, n in enumerate(_NAMES)))
pytestmark = pytest.mark.skipif(_lib is None, reason="needs a C++ compiler (g++)")


def poisoned(shape, dtype) -> np.ndarray:
    """Every byte 0xff (NaN): what a kernel must overwrite, as a GPU's uninitialised memory; 16-byte aligned."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.full(n + 32, 0xFF, np.uint8)
    start = -buf.ctypes.data % 16
    return buf[start:start + n].view(dtype).reshape(shape)


@pytest.fixture
def emulated(monkeypatch):
    kernels = {n: EmulatedKernel(_lib, f"run_{i}", n) for i, n in enumerate(_NAMES)}
    monkeypatch.setattr(LN, "_warp_kernels", lambda t, o, nv: (kernels[_NAMES[2 * NVS.index(nv)]],
                                                               kernels[_NAMES[2 * NVS.index(nv) + 1]]))
    monkeypatch.setattr(LN, "empty", poisoned)
    monkeypatch.setattr(LN, "max_bwd_blocks", lambda kernel: 3)   # few blocks: several rows per warp
    return kernels


def reference(x, w, b, g, eps=1e-5):
    """float64 LayerNorm and its gradients (tensor/functional.py: LayerNorm's formulas)."""
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xh = (x - mean) * rstd
    y = xh * (1 if w is None else w) + (0 if b is None else b)
    d = g * (1 if w is None else w)
    dx = rstd * (d - d.mean(-1, keepdims=True) - xh * (d * xh).mean(-1, keepdims=True))
    return y, mean[:, 0], rstd[:, 0], dx, (g * xh).sum(0), g.sum(0)


@pytest.mark.parametrize("nv, rows", [(1, 1), (1, 5), (3, 13), (3, 40)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_acc", [True, False])
def test_warp_kernels_equal_the_formulas(emulated, nv: int, rows: int, affine: bool, with_acc: bool) -> None:
    C = 128 * nv
    rng = np.random.default_rng(rows * 7 + nv)
    x64 = rng.standard_normal((rows, C)) * 2 + 0.5
    w64, b64 = (rng.standard_normal(C), rng.standard_normal(C)) if affine else (None, None)
    g64, acc64 = rng.standard_normal((rows, C)), rng.standard_normal((rows, C))
    f32 = [None if a is None else poisoned(a.shape, np.float32) for a in (x64, w64, b64, g64, acc64)]
    for dst, src in zip(f32, (x64, w64, b64, g64, acc64)):
        if dst is not None:
            dst[...] = src
    x, w, b, g, acc = f32
    y, mean, rstd = LN.layer_norm_forward(x, w, b, 1e-5)
    dx, part = LN.layer_norm_backward_rows(x, w, g, mean, rstd, acc if with_acc else None)
    ry, rmean, rrstd, rdx, rdw, rdb = reference(*(None if a is None else a.astype(np.float64) for a in (x, w, b, g)))
    if with_acc:
        rdx = rdx + acc
    blocks = min(-(-rows // LN.BWD_WARPS), 3)
    assert part.shape == (2, blocks, C)
    for name, got, want in (("y", y, ry), ("mean", mean, rmean), ("rstd", rstd, rrstd), ("dx", dx, rdx),
                            ("dw", part[0].sum(0), rdw), ("db", part[1].sum(0), rdb)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())), err_msg=name)
    assert emulated[f"ln_bwd_warp<float,float,{nv},{LN.BWD_WARPS}>"].launches == 1


def test_the_warp_build_applies_to_gpt_widths_only() -> None:
    assert [LN.warp_nv(np.empty((2, C), np.float32)) for C in (128, 384, 768, 1024, 1152, 64, 770)] == [1, 3, 6, 8, 0, 0, 0]
    assert LN.warp_nv(np.empty((2, 768), np.float64)) == 0


def test_resident_blocks_follow_the_register_count() -> None:
    # 157 registers -> 160 a thread, 5120 a warp, 20480 a block of 4 warps: 3 blocks in 65536
    assert [LN.resident_blocks(r) for r in (32, 64, 128, 157, 214, 255)] == [16, 8, 4, 3, 2, 2]
