"""Sampling from a GPT: greedy, temperature, top-k, top-p, batched, streaming, KV-cached.

    ids = generate(model, prompt_ids, 200, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    for step_tokens in stream(model, prompt_ids, 200): ...

Order of the filters: logits / temperature -> keep the top_k -> keep the smallest set
whose probability reaches top_p -> renormalise -> sample. temperature 0 is greedy.

KV cache: each layer keeps the keys and values of the tokens seen so far in buffers
preallocated to block_size, so every step runs only the new token through the model.
Past block_size the window slides: each further step recomputes the model over the
cropped window of the last block_size tokens (exactly what the uncached loop does), so
the cache only speeds up the first block_size positions.

Batches of prompts of different lengths are left-padded, with a key-padding mask so no
token attends to padding, and per-row positions so each prompt starts at position 0:
each row gets the same result as running its prompt alone.

On the GPU, decoding goes to tinygrad_lm/decode_cuda.py wherever the prompt and the new tokens fit in
block_size (`cuda_graph`): a static cache, the step captured as a CUDA graph, sampling on the device.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from tensor import backend
from tensor.tensor import no_grad
from tinygrad_lm.decode_cpu import cpu_decoder
from tinygrad_lm.errors import UserError


# ------------------------------------------------------------------ the filters
def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def filtered_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> np.ndarray:
    """logits (B, V) -> the sampling distribution (B, V) after temperature, top-k and top-p (float64)."""
    z = logits.astype(np.float64) / temperature
    V = z.shape[-1]
    if top_k and top_k < V:
        kth = np.partition(z, V - top_k, axis=-1)[:, V - top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked above
        drop_sorted = before >= top_p                      # the top token is always kept
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def pick(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
         rng: np.random.Generator) -> np.ndarray:
    """One token per row of logits (B, V)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    p = filtered_probs(logits, temperature, top_k, top_p)
    u = rng.random((p.shape[0], 1))
    # the first token whose cumulative probability exceeds u (strictly: a token of probability 0
    # never is, even for u = 0); when rounding leaves the total below u, the last token kept
    chosen = (np.cumsum(p, axis=-1) <= u).sum(axis=-1)
    last_kept = p.shape[-1] - 1 - (p[:, ::-1] > 0).argmax(axis=-1)
    return np.minimum(chosen, last_kept)


# ------------------------------------------------------------------ prompts
def _prompts(idx: Any, vocab_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """idx (B, T) array or a list of 1-D prompts -> (left-padded ids (B, T), pad counts (B,), ragged?)."""
    if hasattr(idx, "ndim") and not isinstance(idx, list):
        arr = np.asarray(backend.to_numpy(getattr(idx, "data", idx)))
        if arr.ndim == 1:
            arr = arr[None, :]
        rows, ragged = list(arr), False
    else:
        rows, ragged = [np.asarray(r) for r in idx], True
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: empty prompt; give at least one token per row")
    for r in rows:
        if r.dtype.kind not in "iu":
            raise TypeError(f"generate: prompt ids must be integers, got dtype {r.dtype}")
        if int(r.min()) < 0 or int(r.max()) >= vocab_size:
            raise ValueError(f"generate: prompt ids must lie in [0, {vocab_size}), got values in "
                             f"[{int(r.min())}, {int(r.max())}]")
    T = max(len(r) for r in rows)
    pads = np.array([T - len(r) for r in rows])
    ids = np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, pads[i]:] = r
    return ids, pads, ragged


def _window_inputs(seq: np.ndarray, pads: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last block_size columns of seq with their per-row positions and key mask."""
    start = max(seq.shape[1] - block_size, 0)
    cols = np.arange(start, seq.shape[1])
    real = cols[None, :] >= pads[:, None]                     # (B, W)
    positions = np.where(real, cols[None, :] - np.maximum(pads, start)[:, None], 0)
    return seq[:, start:], positions, real


# ------------------------------------------------------------------ generation
def _graph_decoding(model: Any, prompt_len: int, max_new_tokens: int, use_cache: bool,
                    cuda_graph: bool | None) -> bool:
    """Whether to decode with the CUDA-graph decoder (tinygrad_lm/decode_cuda.py): when asked and it
    can (else a ValueError saying why not), or by default (None) where it can."""
    if cuda_graph is False:
        return False
    from tinygrad_lm.decode_cuda import refusal
    why = "use_cache=False recomputes the window every step" if not use_cache else \
        refusal(model, prompt_len, max_new_tokens)
    if why is not None and cuda_graph:
        raise ValueError(f"cuda_graph: cannot decode with a CUDA graph: {why}")
    return why is None


def stream(model: Any, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] = (),
           use_cache: bool = True, cuda_graph: bool | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every row, (B,) ints, one step at a time. Rows that have
    produced a stop token repeat it; the stream ends when every row has stopped.
    cuda_graph: on the GPU, decode with a static cache and a CUDA-graph step, sampling on the
    device (tinygrad_lm/decode_cuda.py); None = wherever it can, True = or raise, False = never."""
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    cfg = model.config
    seq, pads, _ = _prompts(idx, cfg.vocab_size)
    if max_new_tokens and _graph_decoding(model, seq.shape[1], max_new_tokens, use_cache, cuda_graph):
        from tinygrad_lm.decode_cuda import GPUDecoder
        was_training = model.training
        model.eval()
        try:
            with no_grad():
                yield from GPUDecoder(model, seq, pads, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
                                      strict=bool(cuda_graph))
        finally:
            model.train(was_training)
        return
    B = seq.shape[0]
    rng = np.random.default_rng(seed)
    stops = np.asarray(list(stop_tokens), dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    finished_with = np.zeros(B, dtype=np.int64)
    padded = bool(pads.any())  # without padding no key mask is needed (saves a masking pass per layer)
    caches, fed = None, 0   # fed: columns of seq already inside the caches
    fast = None             # the CPU decoding step over the caches (tinygrad_lm/decode_cpu.py), where it applies
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(max_new_tokens):
                if use_cache and seq.shape[1] <= cfg.block_size:
                    if caches is None:
                        caches = model.new_caches(B)
                        fast = cpu_decoder(model, caches, pads)
                    _, positions, real = _window_inputs(seq, pads, cfg.block_size)
                    if fast is not None and fed == seq.shape[1] - 1:  # one new token: the CPU step
                        last = fast.step(seq[:, -1], positions[:, -1])
                    else:  # the prompt (prefill), or any step where the fast one does not apply
                        logits, _ = model(seq[:, fed:], mask=real if padded else None, positions=positions[:, fed:],
                                          caches=caches)
                        last = backend.to_numpy(logits.data[:, -1, :])
                    fed = seq.shape[1]
                else:  # no cache, or past block_size: recompute over the cropped window
                    window, positions, real = _window_inputs(seq, pads, cfg.block_size)
                    logits, _ = model(window, mask=real if padded else None, positions=positions)
                    last = backend.to_numpy(logits.data[:, -1, :])
                last = last[:, :cfg.vocab_size]  # never a padding row (pad_vocab_to)
                nxt = pick(last, temperature, top_k, top_p, rng)
                nxt = np.where(done, finished_with, nxt)
                if stops.size:  # (np.isin costs ~10 us a token even for no stop tokens)
                    newly = ~done & np.isin(nxt, stops)
                    finished_with[newly] = nxt[newly]
                    done |= newly
                seq = np.concatenate([seq, nxt[:, None].astype(np.int64)], axis=1)
                yield nxt
                if done.all():
                    break
    finally:
        model.train(was_training)


def generate(model: Any, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop_tokens: Sequence[int] = (),
             use_cache: bool = True, cuda_graph: bool | None = None) -> Any:
    """Sample up to max_new_tokens tokens after each prompt.

    idx (B, T) ints -> (B, T + n) ints (a row that stopped early repeats its stop token);
    a list of 1-D prompts of different lengths -> a list of 1-D arrays, each its prompt plus
    its own tokens up to and including its stop token. cuda_graph: as in `stream`.
    """
    _, pads, ragged = _prompts(idx, model.config.vocab_size)
    new = list(stream(model, idx, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, use_cache,
                      cuda_graph))
    new_arr = np.stack(new, axis=1) if new else np.zeros((len(pads), 0), dtype=np.int64)
    if not ragged:
        base = np.asarray(backend.to_numpy(getattr(idx, "data", idx)))
        base = base[None, :] if base.ndim == 1 else base
        return np.concatenate([base.astype(np.int64), new_arr], axis=1)
    out = []
    stop_set = set(int(s) for s in stop_tokens)
    for prompt, row in zip(idx, new_arr):
        row = row.tolist()
        cut = next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row))
        out.append(np.concatenate([np.asarray(prompt, dtype=np.int64), np.asarray(row[:cut], dtype=np.int64)]))
    return out


# ------------------------------------------------------------------ checkpoint + CLI
def load_checkpoint_model(path: str, device: str = "cpu", batch_size: int = 1,
                          quantize: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a run or checkpoint directory, verified first
    (tinygrad_lm.checkpoint); refuses a model that would not fit in memory before building it.
    quantize: None (as stored), "none" (float weights) or "int8" (tinygrad_lm/export.py: load_weights).
    Every problem with the files is a CheckpointError naming the file."""
    from tinygrad_lm import checkpoint as ckpt_io
    from tinygrad_lm.export import load_weights
    from tinygrad_lm.memory import check_fits
    from tinygrad_lm.model import GPT, GPTConfig
    ckpt = ckpt_io.resolve(path)
    st = ckpt_io.read_state(ckpt)  # verifies every file against the manifest first
    tok = ckpt_io.load_tokenizer(ckpt, verify_files=False)
    cfg = GPTConfig.from_dict(st["model_config"])
    if tok.vocab_size != cfg.vocab_size:
        raise ckpt_io.CheckpointError(f"{ckpt / ckpt_io.TOKENIZER_FILE}: {tok.vocab_size} tokens, but the model in "
                                      f"{ckpt} has vocab_size {cfg.vocab_size}")
    try:
        check_fits(cfg, batch_size, "fp32", device, training=False)
    except UserError as e:
        raise ckpt_io.CheckpointError(f"{ckpt / ckpt_io.STATE_FILE}: the model it describes is too big "
                                      f"here: {e}") from None
    model = load_weights(GPT(cfg), ckpt, quantize)
    if device != "cpu":
        model.to(device)
    return model.eval(), tok


def load_hf_model(path: str, tokenizer: str | None, device: str = "cpu", batch_size: int = 1) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a Hugging Face GPT-2 directory and a tokenizer file (GPT-2's
    vocabulary: a .tiktoken ranks file); refuses a model that would not fit before reading its weights."""
    from tinygrad_lm.hf import load_hf, read_hf_config
    from tinygrad_lm.memory import check_fits
    from tinygrad_lm.tokenizer import load_tokenizer
    if not tokenizer:
        raise UserError(f"--hf {path} needs --tokenizer FILE.tiktoken, GPT-2's vocabulary (gpt2.tiktoken; see README)")
    cfg = read_hf_config(path)
    check_fits(cfg, batch_size, "fp32", device, training=False)
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(f"--tokenizer {tokenizer}: {tok.vocab_size} tokens, but the model in {path} has vocab_size "
                        f"{cfg.vocab_size}; give the vocabulary it was trained with (GPT-2's: gpt2.tiktoken)")
    model = load_hf(path)
    if device != "cpu":
        model.to(device)
    return model, tok


class _TextStream:
    """Turns token ids into printable text incrementally (a UTF-8 character may span tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok, self.pending = tokenizer, b""

    def push(self, token: int) -> str:
        self.pending += self.tok.decode_bytes([int(token)])
        try:
            text, self.pending = self.pending.decode("utf-8"), b""
            return text
        except UnicodeDecodeError as e:
            if len(self.pending) - e.start >= 4:  # not a prefix of a character: replace it
                text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
                return text
            text, self.pending = self.pending[:e.start].decode("utf-8"), self.pending[e.start:]
            return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


MAX_NEW_TOKENS = 1_000_000   # --max-new-tokens and --num-samples above these are refused as typos
MAX_SAMPLES = 10_000


def add_cli(sub: Any) -> None:
    p = sub.add_parser("sample", help="sample text from a checkpoint, streaming to the terminal")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="run or checkpoint directory")
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face GPT-2 directory (config.json + model.safetensors)")
    p.add_argument("--tokenizer", metavar="FILE", help="with --hf: the tokenizer, e.g. GPT-2's gpt2.tiktoken")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200, help=f"0 .. {MAX_NEW_TOKENS:,}")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=float, default=None, help="keep the smallest set reaching this mass, in (0, 1]")
    p.add_argument("--num-samples", type=int, default=1, help=f"1 .. {MAX_SAMPLES:,}")
    p.add_argument("--seed", type=int, default=None, help="an integer >= 0")
    p.add_argument("--stop", action="append", default=[], help="stop at this token string (repeatable)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window each step")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="with --device cuda: decode with a CUDA-graph step and sampling on the GPU (default: "
                        "wherever the prompt and the new tokens fit in block_size; --cuda-graph: or an error)")
    p.add_argument("--tf32", action="store_true",
                   help="with --device cuda: float32 GEMMs on the TF32 tensor cores (as PyTorch's allow_tf32); "
                        "no effect on the CPU or on a 16-bit model")
    p.add_argument("--quantize", default=None, choices=("none", "int8"),
                   help="int8: per-channel int8 weights (4x less memory); default: as the checkpoint stores them")
    p.set_defaults(func=cli_sample)


def check_cli_args(args: argparse.Namespace) -> None:
    """Every flag in range, else UserError naming the flag, the value and what is expected."""
    t = args.temperature
    if not (math.isfinite(t) and t >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be >= 1 (leave it out to keep every token), got {args.top_k}")
    if args.top_p is not None and not (math.isfinite(args.top_p) and 0.0 < args.top_p <= 1.0):
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max-new-tokens must be in [0, {MAX_NEW_TOKENS:,}], got {args.max_new_tokens}")
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples must be in [1, {MAX_SAMPLES:,}], got {args.num_samples}")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be an integer in [0, 2**63), got {args.seed}")
    if not args.prompt:
        raise UserError("--prompt is empty; give at least one character")
    if args.tokenizer and not args.hf:
        raise UserError("--tokenizer goes with --hf; a checkpoint (--ckpt) uses the tokenizer saved with it")
    if args.cuda_graph and args.device != "cuda":
        raise UserError("--cuda-graph needs --device cuda (CUDA graphs run on the GPU)")
    if args.cuda_graph and args.no_cache:
        raise UserError("--cuda-graph decodes with the KV cache; it cannot be combined with --no-cache")
    if args.device == "cuda":
        try:
            backend.cupy_module()  # names the extra to install
        except RuntimeError as e:
            raise UserError(f"--device cuda: {e}") from None


def _encode_prompt(tok: Any, text: str, what: str) -> list[int]:
    try:
        return list(tok.encode(text, allowed_special="all"))
    except (ValueError, KeyError) as e:  # characters outside a char vocabulary, a bad special token
        raise UserError(f"{what} cannot be encoded with the checkpoint's tokenizer: {e}") from None


def _cli_graph(args: argparse.Namespace, prompt_len: int, block_size: int) -> bool | None:
    """--cuda-graph as stream's cuda_graph; a request the graph decoder cannot run is a UserError."""
    if args.cuda_graph:
        need = prompt_len + args.max_new_tokens - 1
        if need > block_size:
            raise UserError(f"--cuda-graph: the prompt ({prompt_len} tokens) and --max-new-tokens "
                            f"{args.max_new_tokens} need {need} positions, past the model's block_size "
                            f"{block_size}; lower --max-new-tokens or leave out --cuda-graph")
    return args.cuda_graph


def cli_sample(args: argparse.Namespace) -> int:
    backend.tune_host_allocator()
    backend.tune_blas_wait()  # idle BLAS workers sleep: a core for the CPU decoder's attention thread
    check_cli_args(args)  # bad input raises UserError: `error: ...`, exit 2 (tinygrad_lm/cli.py)
    backend.set_tf32(args.tf32)
    if args.hf:
        model, tok = load_hf_model(args.hf, args.tokenizer, args.device)
        if args.quantize == "int8":
            from nn.quant import quantize_
            quantize_(model)
    else:
        model, tok = load_checkpoint_model(args.ckpt, args.device, quantize=args.quantize)
    ids = _encode_prompt(tok, args.prompt, "--prompt")
    if not ids:
        raise UserError(f"--prompt {args.prompt!r} encodes to no tokens")
    stops = [t for s in args.stop for t in _encode_prompt(tok, s, f"--stop {s!r}")[:1]]
    graph = _cli_graph(args, len(ids), model.config.block_size)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        out = _TextStream(tok)
        sys.stdout.write(args.prompt)
        for nxt in stream(model, np.asarray([ids]), args.max_new_tokens, args.temperature, args.top_k,
                          args.top_p, seed, stops, not args.no_cache, graph):
            sys.stdout.write(out.push(int(nxt[0])))
            sys.stdout.flush()
        sys.stdout.write(out.flush() + "\n" + "-" * 40 + "\n")
        sys.stdout.flush()
    return 0
