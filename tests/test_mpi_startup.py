"""The train command under a real `mpiexec -n 2`: a start-up error on one rank ends every rank
with a message (never a hang), and a one-process checkpoint resumes on two ranks with the same
global batch. Skipped without mpiexec or mpi4py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinygrad_lm import checkpoint as ckpt_io
from tinygrad_lm.train import Trainer, make_config

ROOT = Path(__file__).resolve().parents[1]


def mpiexec() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


pytestmark = [pytest.mark.mpi, pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install 'tinygrad-lm[mpi]')")]

# rank 1 (and only rank 1) sees another --data path: a start-up error on one rank
WRAPPER = '''import os, runpy, sys
rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
if rank == "1":
    sys.argv = [a.replace("corpus.txt", "missing-on-rank-1.txt") for a in sys.argv]
sys.argv[0] = "tinygrad_lm"
runpy.run_module("tinygrad_lm", run_name="__main__", alter_sys=True)
'''
TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, eval_interval=1000, eval_iters=1, sample_tokens=0,
            progress=False, log_interval=1, warmup_iters=1, lr_decay_iters=20, lr=1e-2, seed=5)


def run_mpi(n: int, args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    pytest.importorskip("mpi4py")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return subprocess.run([mpiexec(), "-n", str(n), sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "speak", "hear", "me", "now", "and", "thou", "art", "not", "so"]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(words, size=12)) for _ in range(300)))
    return p


def test_startup_error_on_one_rank_ends_every_rank(tmp_path, corpus):
    (tmp_path / "wrapper.py").write_text(WRAPPER)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    r = run_mpi(2, ["wrapper.py", "train", "--data", str(corpus), "--out", "run", "--cache-dir", "cache",
                    "--max-iters", "2", "--batch-size", "2", *flags], cwd=tmp_path)
    text = r.stdout + r.stderr
    assert r.returncode == 2, text
    assert "missing-on-rank-1.txt" in r.stderr, text  # rank 1's own error
    assert "error: rank 1 failed to start" in r.stderr, text  # what rank 0 says
    assert "Traceback" not in text
    assert not (tmp_path / "run" / "latest").exists()


def test_one_process_checkpoint_resumes_on_two_ranks_with_the_same_global_batch(tmp_path, corpus):
    def cfg(out: str, max_iters: int):
        return make_config(data=str(corpus), out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"),
                           batch_size=2, grad_accum=2, max_iters=max_iters, ckpt_interval=1000, **TINY)
    assert Trainer(cfg("run", 2), log=lambda s: None).run() == 0
    r = run_mpi(2, ["-m", "tinygrad_lm", "train", "--resume", "run", "--max-iters", "4"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "global batch 4 sequences = batch_size 2 x grad_accum 1 x 2 ranks" in r.stdout
    st = json.loads((ckpt_io.resolve(tmp_path / "run") / "state.json").read_text())
    assert (st["step"], st["world_size"], st["global_batch_size"]) == (4, 2, 4)
    assert (st["train_config"]["batch_size"], st["train_config"]["grad_accum"]) == (2, 1)
    straight = Trainer(cfg("straight", 4), log=lambda s: None)
    assert straight.run() == 0
    from safetensors.numpy import load_file
    got = load_file(str(ckpt_io.resolve(tmp_path / "run") / "model.safetensors"))
    for k, v in straight.model.state_dict().items():
        np.testing.assert_allclose(got[k], v, rtol=2e-5, atol=2e-6, err_msg=k)
