"""nn: modules, layers, functional ops, optimizers, schedules."""
from nn.module import Module, ModuleList, Parameter, Sequential

__all__ = ["Module", "ModuleList", "Parameter", "Sequential"]
