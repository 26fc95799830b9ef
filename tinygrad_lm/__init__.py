"""tinygrad_lm: tokenizer, GPT model, data, training, sampling."""
__version__ = "0.1.0"
