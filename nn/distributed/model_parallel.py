"""What a gradient step adds when the model itself is split over ranks (tensor parallel,
pipeline parallel, or both): one object, `ModelParallel`, handed to
tinygrad_lm.gradient_step.GradientStep (and to ZeRO1) as `model_parallel`.

    mp = ModelParallel(world_comm, norm_comms=[grid.tp, grid.pp], copies={id(p): tp, ...},
                       pipeline=pipeline)

* the gradient norm counts each parameter of the whole model once:
      norm^2 = sum over the model-parallel ranks of  sum_p w_p |grad_p|^2
  where w_p = 1 / copies (a parameter held whole by `copies` tensor-parallel ranks, with the
  same gradient on each: LayerNorms, wpe, row-parallel biases) and 1 for one split over the
  ranks or held by one pipeline stage only. `sum_of_squares` does the sum over the ranks (one
  scalar all-reduce per communicator in norm_comms: tp, then pp); data-parallel replicas hold
  equal gradients and are not summed;
* before_step / after_step: the pipeline's tied wte (its gradient all-reduced between the first
  and last stage, its new value sent back to the last one);
* `world`: the communicator over which an fp16 overflow on one rank skips the step on all.
"""
from __future__ import annotations

from typing import Any, Sequence

from tensor import backend


class ModelParallel:
    """world: every rank of the job (fp16 overflow verdicts). norm_comms: the communicators the
    squared norm is summed over (tp and/or pp groups). copies: id(parameter) -> how many ranks
    hold the same values and gradient (default 1). pipeline: a nn.distributed.pipeline.Pipeline
    (for the tied wte) or None."""

    def __init__(self, world: Any, norm_comms: Sequence[Any] = (), copies: dict[int, int] | None = None,
                 pipeline: Any = None) -> None:
        self.world, self.pipeline = world, pipeline
        self.norm_comms = [c for c in norm_comms if c is not None and c.size > 1]
        self.copies = copies or {}

    def weight(self, p: Any) -> float:
        """w_p: 1 / the number of ranks holding p's values (1 for a split or stage-owned parameter)."""
        return 1.0 / self.copies.get(id(p), 1)

    @property
    def weighted(self) -> bool:
        """Whether some parameter is counted with a weight other than 1."""
        return any(c != 1 for c in self.copies.values())

    def sum_of_squares(self, sq: Any) -> Any:
        """This rank's (weighted) sum of squares, an array of one element on any device -> the sum
        over the model-parallel ranks, the same kind of array (one device sync)."""
        if not self.norm_comms:
            return sq
        total = float(backend.to_numpy(sq).reshape(-1)[0])
        for comm in self.norm_comms:
            total = comm.allreduce_scalar(total, "sum")
        return backend.array_module(sq).full(sq.shape, total, dtype=sq.dtype)

    def before_step(self) -> None:
        if self.pipeline is not None:
            self.pipeline.reduce_tied_grads()

    def after_step(self) -> None:
        if self.pipeline is not None:
            self.pipeline.sync_tied_weights()
