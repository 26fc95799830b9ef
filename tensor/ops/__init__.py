"""Op families. Every op is a `Function` subclass with forward and backward side by side:

- elementwise.py  + - * / ** neg exp log sqrt tanh sigmoid relu gelu abs maximum minimum clip, comparisons
- reduce.py       sum mean max var logsumexp argmax
- matmul.py       matmul (NumPy semantics)
- movement.py     reshape permute broadcast_to concatenate stack split squeeze unsqueeze cast to-device
- indexing.py     __getitem__ (basic and integer-array indexing), where, scatter-add
- ../functional.py fused ops: softmax log_softmax cross_entropy layer_norm embedding dropout linear

Each op here is the reference: its textbook formula in array code against `xp`. Faster versions
of some (GELU, LayerNorm, cross-entropy, Linear) are subclasses in tensor/cpu/ and tensor/cuda/,
chosen by tensor/dispatch.py; `all_ops` lists the references only.
"""


def all_ops() -> dict:
    """name -> Function subclass, for every op of every family (tests and exercises use this)."""
    from tensor import functional
    from tensor.ops import elementwise, indexing, matmul, movement, reduce
    from tensor.tensor import Function
    found = {}
    for mod in (elementwise, reduce, matmul, movement, indexing, functional):
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and issubclass(obj, Function) and obj is not Function \
                    and obj.__module__ == mod.__name__:
                found[name] = obj
    return found
