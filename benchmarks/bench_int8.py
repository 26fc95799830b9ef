"""int8 weight-only quantization against float32 on one trained checkpoint (issue 19):
validation loss and perplexity, weight memory, file size and KV-cached greedy decode speed.

Validation: the checkpoint's own corpus, tokenizer and val split (state.json's train_config),
cut into consecutive non-overlapping windows of block_size (every val token predicted once,
up to --max-val-tokens), the mean cross-entropy over all of them; perplexity = exp(loss).
Memory: bytes of the distinct weight arrays (nn.quant.weight_bytes). Disk: model.safetensors
written by `export` with and without --quantize int8. Decode: generate() greedy, batch 1 and
8, --new-tokens tokens from a one-token prompt, best of --repeats, float and int8 interleaved; on the GPU
through the CUDA-graph decoder (cuda_graph=True: a capture failure is an error, not a silent eager fallback).

    python -m tinygrad_lm train --preset shakespeare-char --out runs/demo      # ~2 min on 2 cores
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE taskset -c 0,1 python benchmarks/bench_int8.py --ckpt runs/demo
    python benchmarks/bench_int8.py --ckpt RUN --device cuda                      # the GPU path
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np

from nn.quant import weight_bytes
from tensor import backend
from tensor.tensor import no_grad
from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.data import TokenData, resolve_corpus, tokenize_to_cache
from tinygrad_lm.export import export
from tinygrad_lm.sample import generate, load_checkpoint_model


def val_loss(model, val: np.ndarray, block: int, batch: int, max_tokens: int | None) -> tuple[float, int]:
    """Mean next-token cross-entropy over consecutive windows of `block` tokens of val."""
    n_win = (len(val) - 1) // block
    if max_tokens:
        n_win = min(n_win, max(1, max_tokens // block))
    total, count = 0.0, 0
    with no_grad():
        for i in range(0, n_win, batch):
            j = min(i + batch, n_win)
            idx = np.stack([val[w * block:(w + 1) * block] for w in range(i, j)]).astype(np.int64)
            tgt = np.stack([val[w * block + 1:(w + 1) * block + 1] for w in range(i, j)]).astype(np.int64)
            _, loss = model(idx, tgt)
            total += float(backend.to_numpy(loss.data)) * idx.size
            count += idx.size
    return total / count, count


def decode_tok_s(model, vocab: int, batch: int, n: int, repeats: int, sync, clock=time.perf_counter,
                 cuda_graph: bool | None = None) -> float:
    prompt = np.random.default_rng(0).integers(0, vocab, (batch, 1))
    generate(model, prompt, 4, temperature=0, cuda_graph=cuda_graph)  # warm-up (kernels compiled, caches touched)
    best = math.inf
    for _ in range(repeats):
        t0 = clock()
        generate(model, prompt, n, temperature=0, cuda_graph=cuda_graph)
        sync()
        best = min(best, clock() - t0)
    return batch * n / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True, help="run or checkpoint directory (float32)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--max-val-tokens", type=int, default=0, help="0 = the whole val split")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", default="wall", choices=("wall", "process"),
                    help="process: CPU seconds of this process (as bench_sample.py; CPU only, use --threads 1)")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    backend.tune_host_allocator()
    C.set_threads(args.threads)

    ckpt = ckpt_io.resolve(args.ckpt)
    st = ckpt_io.read_state(ckpt)
    tc = st["train_config"]
    fmodel, tok = load_checkpoint_model(str(ckpt), quantize="none")
    qmodel, _ = load_checkpoint_model(str(ckpt), quantize="int8")
    cfg = fmodel.config
    data = TokenData(tokenize_to_cache(resolve_corpus(tc["data"]), tok, tc["cache_dir"]), cfg.block_size,
                     tc["val_fraction"])
    res: dict = {"machine": C.machine_info(args.threads), "commit": C.git_rev(), "ckpt": str(ckpt), "clock": args.clock,
                 "step": st["step"], "device": args.device, "model": cfg.to_dict(),
                 "params": sum(p.data.size for p in fmodel.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {q: (export(str(ckpt), str(Path(tmp) / q), q) / ckpt_io.MODEL_FILE).stat().st_size
                 for q in ("none", "int8")}
    res["weight_bytes"] = {"float32": weight_bytes(fmodel), "int8": weight_bytes(qmodel)}
    res["weight_bytes_ratio"] = round(res["weight_bytes"]["float32"] / res["weight_bytes"]["int8"], 3)
    res["file_bytes"] = {"float32": sizes["none"], "int8": sizes["int8"]}
    res["file_bytes_ratio"] = round(sizes["none"] / sizes["int8"], 3)
    sync = (lambda: None)
    if args.device == "cuda":
        fmodel.to("cuda")
        qmodel.to("cuda")
        cp = backend.cupy_module()
        sync = cp.cuda.get_current_stream().synchronize

    quality = {}
    for name, m in (("float32", fmodel), ("int8", qmodel)):
        loss, n_tok = val_loss(m, data.val, cfg.block_size, args.eval_batch, args.max_val_tokens)
        quality[name] = {"val_loss": round(loss, 5), "val_ppl": round(math.exp(loss), 4), "val_tokens": n_tok}
        print(f"{name}: {quality[name]}", file=sys.stderr, flush=True)
    quality["ppl_change_pct"] = round(100 * (quality["int8"]["val_ppl"] / quality["float32"]["val_ppl"] - 1), 3)
    res["quality"] = quality

    # on the GPU both decode through the CUDA-graph decoder; a model it cannot capture is an error, not a fallback
    graph = True if args.device == "cuda" else None
    res["cuda_graph"] = bool(graph)
    speed = {}
    for B in args.batches:
        row = {}
        for _ in range(2):  # interleaved: float, int8, float, int8 (best of each)
            for name, m in (("float32", fmodel), ("int8", qmodel)):
                r = decode_tok_s(m, cfg.vocab_size, B, args.new_tokens, args.repeats, sync, clock, graph)
                row[f"{name}_tok_s"] = round(max(r, row.get(f"{name}_tok_s", 0.0)), 1)
        row["int8_vs_float32"] = round(row["int8_tok_s"] / row["float32_tok_s"], 3)
        speed[str(B)] = row
        print(f"batch {B}: {row}", file=sys.stderr, flush=True)
    res["decode_greedy"] = speed
    res["machine"]["loadavg_1m_at_end"] = round(__import__("os").getloadavg()[0], 2)
    C.emit(res)


if __name__ == "__main__":
    main()
