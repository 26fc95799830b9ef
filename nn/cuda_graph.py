"""A training step's forward and backward recorded once as a CUDA graph, then replayed.

Why: on the GPU a step of a small model is hundreds of short kernels, and launching each one
from Python (our autograd, CuPy) costs more host time than the kernel takes: in mixed
precision the GPU waits for Python. A CUDA graph records the kernel sequence once; a replay
launches all of it with one call, so the step costs GPU time only.

    step = CapturedStep(model, batch=64, seq=256)   # records forward + backward once
    loss = step(x, y)                               # copies the batch in, replays; grads in p.grad
    clip_grad_norm_(params, 1.0, sync=False); optimizer.step(); optimizer.zero_grad()

What a replay cannot do, and so what the captured region must not contain:
  * anything decided on the host from the data (a replay re-runs the recorded kernels with
    the recorded arguments): the batch enters through fixed input buffers, the loss scale
    through a device scalar; the optimizer, clipping and the loss scaler's overflow check
    stay outside the graph, as ordinary calls;
  * random numbers seeded on the host: dropout (whose masks come from a seed drawn from a NumPy
    Generator at each call) must be 0 -- a replay would reuse the recorded seeds, so the recorded
    masks. Refused with a clear error.
Memory: the graph's temporaries live in a memory pool of their own, kept for its lifetime
(about one step's activations), so nothing allocated outside can land in them.
The graph reads the parameters' buffers as they were at capture: in-place updates (the
optimizers) are seen, but a parameter given a new array afterwards (`load_state_dict`,
`model.to`) is not -- make a new CapturedStep then (the Trainer captures after resuming).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from nn.module import Module
from tensor import backend
from tensor.tensor import Tensor


def _dropout_in(model: Module) -> float:
    """The largest dropout probability used anywhere in the model (modules and attention)."""
    worst = 0.0
    for m in model.modules():
        for attr in ("p", "dropout"):
            v = getattr(m, attr, 0.0)
            if isinstance(v, float):
                worst = max(worst, v)
    return worst


class CapturedStep:
    """forward + loss + backward of `model(x, y)` for (batch, seq) int batches, as a CUDA graph.

    Calling it with x, y (host NumPy or CuPy arrays, (batch, seq) integers) copies them into
    the graph's input buffers, replays, points every parameter's .grad at the gradient the
    graph wrote, and returns the loss (a 0-d float32 CuPy array; unscaled). `loss_scale` (the
    fp16 LossScaler's factor) may change between calls: it is read from a device scalar.
    Gradients are *assigned*, as after a backward from zero grads (no accumulation).
    """

    def __init__(self, model: Module, batch: int, seq: int, warmup: int = 2) -> None:
        cp = backend.cupy_module()
        self.params = model.parameters()
        if not self.params or backend.device_of(self.params[0].data) != "cuda":
            raise ValueError("CapturedStep: the model must be on the GPU (model.to('cuda')) before capture")
        p = _dropout_in(model)
        if p > 0.0 and model.training:
            raise ValueError(f"CapturedStep: dropout {p} is on; a CUDA graph would replay the same dropout "
                             "masks every step. Train with dropout 0, or without --cuda-graph")
        self.model = model
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.x = cp.zeros((batch, seq), dtype=np.int64)
        self.y = cp.zeros((batch, seq), dtype=np.int64)
        self.scale = cp.ones((), dtype=np.float32)
        self._upload = backend.HostToDevice()
        self.pool = cp.cuda.MemoryPool()  # the graph's own memory, alive as long as the graph
        cp.cuda.Device().synchronize()
        with self.stream:
            for _ in range(warmup):  # compile kernels, size cuBLAS's workspace, on this stream
                self._forward_backward()
            self.stream.synchronize()
            for p_ in self.params:
                p_.grad = None
            with cp.cuda.using_allocator(self.pool.malloc):
                self.stream.begin_capture()
                try:
                    self.loss = self._forward_backward()
                finally:
                    self.graph = self.stream.end_capture()
            self.grads = [p_.grad for p_ in self.params]
            for p_ in self.params:
                p_.grad = None
        self.stream.synchronize()
        cp.get_default_memory_pool().free_all_blocks()  # the warm-up's cached temporaries: the graph has its own

    def _forward_backward(self) -> Any:
        _, loss = self.model(self.x, self.y)
        (loss * Tensor(self.scale)).backward()  # the device scalar itself (no copy): read at replay
        return loss.data

    def __call__(self, x: Any, y: Any, loss_scale: float = 1.0) -> Any:
        cp = backend.cupy_module()
        for buf, v in ((self.x, x), (self.y, y)):
            if tuple(v.shape) != buf.shape:
                raise ValueError(f"CapturedStep: the graph was recorded for batches of shape {buf.shape}, "
                                 f"got {tuple(v.shape)}")
            if backend.array_module(v) is np:
                v = self._upload(np.asarray(v, dtype=np.int64))
            buf[...] = v  # on the current stream, which the replay follows
        self.scale.fill(loss_scale)
        stream = cp.cuda.get_current_stream()
        self.graph.launch(stream=stream)
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss.copy()
