"""Sampling from a trained GPT (a first version: uncached; the KV-cached sampler replaces it)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

import tensor.functional as F
from tensor import backend
from tensor.tensor import no_grad


def generate(model: Any, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None) -> np.ndarray:
    """Append max_new_tokens sampled tokens to idx (B, T) -> (B, T + max_new_tokens)."""
    rng = np.random.default_rng(seed)
    out = np.array(backend.to_numpy(idx), dtype=np.int64)
    bs = model.config.block_size
    was_training = model.training
    model.eval()
    with no_grad():
        for _ in range(max_new_tokens):
            logits, _ = model(out[:, -bs:])
            last = backend.to_numpy(logits.data[:, -1, :]).astype(np.float64)
            if temperature == 0:
                nxt = last.argmax(axis=-1)
            else:
                z = last / temperature
                if top_k is not None:
                    kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]
                    z = np.where(z < kth, -np.inf, z)
                p = np.exp(z - z.max(axis=-1, keepdims=True))
                p /= p.sum(axis=-1, keepdims=True)
                nxt = np.array([rng.choice(p.shape[-1], p=row) for row in p])
            out = np.concatenate([out, nxt[:, None]], axis=1)
    model.train(was_training)
    return out


def add_cli(sub: Any) -> None:
    p = sub.add_parser("sample", help="sample text from a checkpoint")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cli_sample)


def load_checkpoint_model(path: str, device: str = "cpu") -> tuple[Any, Any]:
    from nn.serialization import load_model
    from tinygrad_lm import checkpoint as ckpt_io
    from tinygrad_lm.model import GPT, GPTConfig
    from tinygrad_lm.tokenizer import load_tokenizer
    ckpt = ckpt_io.resolve(path)
    st = ckpt_io.read_state(ckpt)
    tok_path = ckpt / ckpt_io.TOKENIZER_FILE
    if not tok_path.is_file():
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} has no tokenizer ({tok_path} is missing)")
    model = GPT(GPTConfig.from_dict(st["model_config"]))
    load_model(model, ckpt / ckpt_io.MODEL_FILE)
    if device != "cpu":
        model.to(device)
    return model, load_tokenizer(tok_path)


def cli_sample(args: argparse.Namespace) -> int:
    from tinygrad_lm.checkpoint import CheckpointError
    try:
        model, tok = load_checkpoint_model(args.ckpt, args.device)
        ids = tok.encode(args.prompt)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        out = generate(model, np.asarray([ids]), args.max_new_tokens, args.temperature, args.top_k, args.top_p, seed)
        print(tok.decode(out[0].tolist()))
        print("-" * 40)
    return 0
