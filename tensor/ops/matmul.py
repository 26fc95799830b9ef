"""Matrix product with NumPy's semantics: batched, broadcast batch dims, 1-D operands."""
from __future__ import annotations

from tensor.tensor import Function, shape_str, unbroadcast


class MatMul(Function):
    """a @ b. a (..., n, k), b (..., k, m) -> (..., n, m); a 1-D a is a row, a 1-D b a column."""
    # d(a@b)/da = g @ b^T,  d(a@b)/db = a^T @ g   (then summed over broadcast batch dims)
    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: operands must be at least 1-D, got shapes {shape_str(a)} and {shape_str(b)}")
        ka = a.shape[-1]
        kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if ka != kb:
            raise ValueError(f"matmul: shapes {shape_str(a)} and {shape_str(b)} do not align "
                             f"(inner dimensions {ka} != {kb})")
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.saved
        a2 = a.reshape(1, -1) if a.ndim == 1 else a
        b2 = b.reshape(-1, 1) if b.ndim == 1 else b
        if a.ndim == 1:
            g = g[..., None, :] if b.ndim > 1 else g[..., None]
        if b.ndim == 1:
            g = g[..., None]
        ga = gb = None
        if self.needs_grad[0]:
            ga = unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if self.needs_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:  # shared weight: fold batch dims into one GEMM
                gb = a2.reshape(-1, a2.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape)
            gb = gb.reshape(b.shape)
        return ga, gb
