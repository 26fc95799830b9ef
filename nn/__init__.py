"""nn: modules, layers, functional ops, optimizers, schedules, weights on disk."""
from nn import functional, init, lr_scheduler, optim, serialization, utils
from nn.layers import (GELU, MLP, Block, CausalSelfAttention, Dropout, Embedding, LayerNorm, Linear, RMSNorm,
                       SinusoidalPositionalEncoding)
from nn.rotary import RotaryEmbedding
from nn.lr_scheduler import Constant, Schedule, StepDecay, WarmupCosine, apply_lr
from nn.module import Module, ModuleList, Parameter, Sequential
from nn.optim import SGD, Adam, AdamW, Optimizer
from nn.serialization import load_model, load_optimizer, load_safetensors, save_model, save_optimizer, save_safetensors
from nn.utils import clip_grad_norm_

__all__ = ["Module", "ModuleList", "Parameter", "Sequential", "Linear", "Embedding", "LayerNorm", "Dropout",
           "GELU", "CausalSelfAttention", "MLP", "Block", "SinusoidalPositionalEncoding", "RMSNorm",
           "RotaryEmbedding", "functional", "init",
           "optim", "lr_scheduler", "utils", "serialization", "Optimizer", "SGD", "Adam", "AdamW", "Schedule",
           "Constant", "WarmupCosine", "StepDecay", "apply_lr", "clip_grad_norm_", "save_safetensors",
           "load_safetensors", "save_model", "load_model", "save_optimizer", "load_optimizer"]
