"""nn.functional: the fused ops of `tensor.functional` plus attention's pieces, RoPE and RMSNorm."""
from tensor.functional import (cross_entropy, dropout, embedding, gelu, layer_norm, linear,  # noqa: F401
                               log_softmax, relu, sigmoid, softmax, tanh)
from nn.attention import (causal_attention_qkv, merge_heads, scaled_dot_product_attention,  # noqa: F401
                          split_heads)
from nn.layers import rms_norm  # noqa: F401
from nn.rotary import apply_rotary, rotary_tables  # noqa: F401
