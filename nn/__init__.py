"""nn: modules, layers, functional ops, optimizers, schedules."""
from nn import functional, init
from nn.layers import (GELU, MLP, Block, CausalSelfAttention, Dropout, Embedding, LayerNorm, Linear,
                       SinusoidalPositionalEncoding)
from nn.module import Module, ModuleList, Parameter, Sequential

__all__ = ["Module", "ModuleList", "Parameter", "Sequential", "Linear", "Embedding", "LayerNorm", "Dropout",
           "GELU", "CausalSelfAttention", "MLP", "Block", "SinusoidalPositionalEncoding", "functional", "init"]
