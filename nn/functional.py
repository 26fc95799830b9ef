"""nn.functional: the fused ops of `tensor.functional` plus attention."""
from tensor.functional import (cross_entropy, dropout, embedding, gelu, layer_norm, linear,  # noqa: F401
                               log_softmax, relu, sigmoid, softmax, tanh)
from nn.attention import causal_attention_qkv, scaled_dot_product_attention  # noqa: F401
