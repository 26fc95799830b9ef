"""Convergence (issue 4): validation loss after the full `shakespeare-char` recipe, ours vs
a PyTorch twin trained with the identical recipe.

Recipe (nanoGPT's CPU shakespeare_char run, whose README reports val loss ~1.88): char vocab
of tinyshakespeare (65), n_layer 4, n_head 4, n_embd 128, block 64, batch 12, learned
positions, dropout 0, AdamW lr 1e-3 -> 1e-4 cosine over 2000 iterations with 100 warmup
iterations, betas (0.9, 0.99), weight decay 0.1 on 2-D weights, gradient clipping 1.0.
Split 90/10 (val = the last 10%, as nanoGPT's prepare.py).

* ours: the real Trainer (`make_config("shakespeare-char", data=...)`, `Trainer(cfg).run()`), i.e.
  what `python -m tinygrad_lm train --preset shakespeare-char --data FILE` runs (only the
  bookkeeping differs: no samples printed, no progress bar, a temporary run folder).
* torch: `NanoGPT` of examples/export_to_pytorch.py, starting from the same initial weights
  (our GPT(seed=1337), as the Trainer builds it), fed the same batches (TokenData.get_batch,
  a pure function of (seed, step)), with torch.optim.AdamW and nanoGPT's get_lr schedule.

Both are then measured the same way: the mean loss over 200 fixed val batches (batch 12,
block 64) and, for comparison with the Trainer's log, over the Trainer's own eval batches
(eval_iters=20, train and val). Each implementation runs in its own subprocess; wall time
is the training loop's (evals included).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE nohup python benchmarks/bench_convergence.py \\
        --out /tmp/convergence.json > /tmp/convergence.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common as C  # noqa: F401  (puts the repository root on sys.path)
import numpy as np

DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    return env
NANOGPT_README_VAL = 1.88
VAL_BATCHES, VAL_SEED = 200, 2024


def setup(a: argparse.Namespace, tmp: str):
    from tinygrad_lm.train import make_config
    return make_config("shakespeare-char", data=a.data, out=os.path.join(tmp, "run"),
                       cache_dir=os.path.join(tmp, "cache"), progress=False, sample_tokens=0, device="cpu",
                       max_iters=a.max_iters, seed=a.seed)


def fixed_val_loss(loss_fn, data, cfg) -> float:
    """Mean loss over VAL_BATCHES fixed val batches (the same for both implementations)."""
    losses = [loss_fn(*data.get_batch("val", cfg.batch_size, VAL_SEED, i)) for i in range(VAL_BATCHES)]
    return float(np.mean(losses))


def trainer_eval(loss_fn, data, cfg) -> dict:
    """Trainer.estimate_loss's batches (eval_iters of each split, seed + 1)."""
    return {split: float(np.mean([loss_fn(*data.get_batch(split, cfg.batch_size, cfg.seed + 1, i))
                                  for i in range(cfg.eval_iters)])) for split in ("train", "val")}


def worker_ours(a: argparse.Namespace, tmp: str) -> dict:
    from tensor.tensor import no_grad
    from tinygrad_lm.train import Trainer
    C.set_threads(a.threads)
    cfg = setup(a, tmp)
    logs: list = []
    trainer = Trainer(cfg, log=logs.append)
    t0 = time.perf_counter()
    rc = trainer.run()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"Trainer.run returned {rc}: {logs}")
    model = trainer.model.eval()

    def loss_fn(x, y) -> float:
        with no_grad():
            return float(model(x, y)[1].item())
    rows = [json.loads(ln) for ln in open(os.path.join(cfg.out, "metrics.jsonl"))]
    curve = [{"step": r["step"], "train": r["train_loss"], "val": r["val_loss"]} for r in rows if "val_loss" in r]
    return {"impl": "ours", "train_wall_s": wall, "steps": trainer.step,
            "val_loss_fixed200": fixed_val_loss(loss_fn, trainer.data, cfg),
            "trainer_eval_20": trainer.estimate_loss(), "trainer_eval_20_recomputed": trainer_eval(loss_fn, trainer.data, cfg),
            "eval_curve": curve, "log": logs}


def worker_torch(a: argparse.Namespace, tmp: str) -> dict:
    import torch
    import torch.nn.functional as TF
    C.set_threads(a.threads)
    sys.path.insert(0, os.path.join(C._ROOT, "examples"))
    from export_to_pytorch import NanoGPT, to_torch_state_dict
    from nn.lr_scheduler import WarmupCosine
    from tinygrad_lm.data import TokenData, resolve_corpus, tokenize_to_cache
    from tinygrad_lm.model import GPT
    from tinygrad_lm.train import build_tokenizer

    cfg = setup(a, tmp)
    files = resolve_corpus(cfg.data)
    tok = build_tokenizer(cfg, files)
    data = TokenData(tokenize_to_cache(files, tok, cfg.cache_dir), cfg.model.block_size, cfg.val_fraction)
    mcfg = cfg.model_config(tok.vocab_size)
    ours = GPT(mcfg, seed=cfg.seed)  # the Trainer's initial weights
    model = NanoGPT(mcfg)
    missing, unexpected = model.load_state_dict(to_torch_state_dict(ours), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"twin state_dict mismatch: missing {missing}, unexpected {unexpected}")
    del ours
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    sched = WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters)  # == nanoGPT's get_lr

    def loss_fn(x, y) -> float:
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(x)))
            return float(TF.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).reshape(-1)))

    curve = []
    t0 = time.perf_counter()
    for step in range(cfg.max_iters):
        for g in opt.param_groups:
            g["lr"] = sched(step)
        x, y = data.get_batch("train", cfg.batch_size, cfg.seed, step)
        logits = model(torch.from_numpy(np.ascontiguousarray(x)))
        loss = TF.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_iters:
            model.eval()
            ev = trainer_eval(loss_fn, data, cfg)
            model.train()
            curve.append({"step": step + 1, **ev})
    wall = time.perf_counter() - t0
    model.eval()
    return {"impl": "torch", "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "train_wall_s": wall, "steps": cfg.max_iters, "val_loss_fixed200": fixed_val_loss(loss_fn, data, cfg),
            "trainer_eval_20": trainer_eval(loss_fn, data, cfg), "eval_curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--impls", default="ours,torch")
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1337, help="the preset's seed (init weights and batches)")
    ap.add_argument("--parallel", action="store_true",
                    help="run the implementations at the same time (e.g. --threads 1 each on 2 cores)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.data = os.path.abspath(a.data)
    if a.worker:
        with tempfile.TemporaryDirectory() as tmp:
            res = worker_ours(a, tmp) if a.worker == "ours" else worker_torch(a, tmp)
        res["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
        print("RESULT " + json.dumps(res), flush=True)
        return

    C.set_threads(a.threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    results = {}
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    procs = {}
    for impl in impls:  # one after the other, or (--parallel) all at once
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--data", a.data,
               "--max-iters", str(a.max_iters), "--threads", str(a.threads), "--seed", str(a.seed)]
        print(f"running {impl} ...", file=sys.stderr, flush=True)
        procs[impl] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env=worker_env(a.threads))
        if not a.parallel:
            procs[impl] = (procs[impl], *procs[impl].communicate())
    for impl, p in procs.items():
        p, stdout, stderr = p if isinstance(p, tuple) else (p, *p.communicate())
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            results[impl] = {"error": f"exit {p.returncode}: {stderr.strip()[-3000:]}"}
        else:
            results[impl] = json.loads(lines[-1][len("RESULT "):])
        r = results[impl]
        print(f"{impl}: " + (r.get("error") or f"val(200) {r['val_loss_fixed200']:.4f}, "
                             f"val(20) {r['trainer_eval_20']['val']:.4f}, {r['train_wall_s']:.0f} s"),
              file=sys.stderr, flush=True)
    summary: dict = {"nanogpt_readme_val_loss": NANOGPT_README_VAL}
    if all("val_loss_fixed200" in results.get(k, {}) for k in ("ours", "torch")):
        o, t = results["ours"], results["torch"]
        d = o["val_loss_fixed200"] - t["val_loss_fixed200"]
        summary.update({"ours_val_fixed200": round(o["val_loss_fixed200"], 4),
                        "torch_val_fixed200": round(t["val_loss_fixed200"], 4),
                        "ours_minus_torch_fixed200": round(d, 4),
                        "ours_val_trainer_eval20": round(o["trainer_eval_20"]["val"], 4),
                        "torch_val_trainer_eval20": round(t["trainer_eval_20"]["val"], 4),
                        "goal_ours_le_1.88": o["val_loss_fixed200"] <= NANOGPT_README_VAL,
                        "goal_within_0.02_of_torch": abs(d) <= 0.02,
                        "wall_s": {"ours": round(o["train_wall_s"], 1), "torch": round(t["train_wall_s"], 1)}})
    out = {"benchmark": "bench_convergence", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "git": C.git_rev(),
           "machine": C.machine_info(a.threads), "parallel": a.parallel, "loadavg_at_start": [round(v, 2) for v in load_start],
           "val_batches": {"count": VAL_BATCHES, "seed": VAL_SEED, "batch_size": 12, "block_size": 64},
           "summary": summary, "results": results, "wall_s": round(time.perf_counter() - t_start, 1)}
    C.emit(out, a.out)


if __name__ == "__main__":
    main()
