"""tensor: a reverse-mode autograd Tensor over NumPy (CPU) and CuPy (GPU).

    from tensor import Tensor, no_grad, gradcheck
    import tensor.functional as F
"""
from tensor import backend, functional
from tensor.backend import cuda_available, get_default_device, set_default_device
from tensor.gradcheck import GradcheckError, gradcheck
from tensor.ops import all_ops
from tensor.ops.indexing import where
from tensor.ops.movement import cat, concatenate, split, squeeze, stack, unsqueeze
from tensor.tensor import Function, Tensor, enable_grad, is_grad_enabled, no_grad

__all__ = ["Tensor", "Function", "no_grad", "enable_grad", "is_grad_enabled", "gradcheck", "GradcheckError",
           "functional", "where", "concatenate", "cat", "stack", "split", "squeeze", "unsqueeze",
           "set_default_device", "get_default_device", "cuda_available", "all_ops"]
