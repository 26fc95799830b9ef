"""CPU fast paths: NumPy code that computes an op's reference formula faster (cache-sized blocks,
GEMV sums, transposed layouts, chunking). Each is chosen by tensor/dispatch.py and tested equal
to the reference Function it subclasses."""
