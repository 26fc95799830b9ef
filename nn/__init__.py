"""nn: modules, layers, optimizers (work in progress, see issue 3)."""
