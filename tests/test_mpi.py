"""Data parallelism, the Communicator and the collective watchdog under a real `mpiexec -n 2`
(skipped only when no MPI launcher is installed); the watchdog's own logic in-process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "mpi" / "dp_worker.py"


def mpiexec() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")



def mpi_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def run_mpi(n: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    if mpiexec() is None:
        pytest.skip("no mpiexec (pip install 'tinygrad-lm[mpi]')")
    pytest.importorskip("mpi4py")
    cmd = [mpiexec(), "-n", str(n), sys.executable] + args
    return subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def corpus(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "speak", "hear", "me", "now", "and", "thou", "art", "not", "so"]
    text = "\n".join(" ".join(rng.choice(words, size=12)) for _ in range(400))
    p = tmp_path / "corpus.txt"
    p.write_text(text)
    return str(p)


def test_two_ranks_equal_one_process_with_double_batch(tmp_path: Path, corpus: str) -> None:
    steps, b = 4, 3
    out = tmp_path / "mpi"
    r = run_mpi(2, [str(WORKER), "train", str(out), corpus, str(steps), str(b)])
    assert r.returncode == 0, r.stdout + r.stderr
    # both ranks ran, saw a world of 2, and held identical weights after every step
    c0 = json.loads((out / "checksums.0.json").read_text())
    c1 = json.loads((out / "checksums.1.json").read_text())
    assert c0["size"] == c1["size"] == 2
    assert c0["sums"] == c1["sums"]
    mpi_weights = dict(np.load(out / "weights.npz"))

    # one process, batch 2b, same seed and steps
    sys.path.insert(0, str(WORKER.parent))
    from dp_worker import tiny_config  # noqa: E402
    from tinygrad_lm.train import Trainer
    single = Trainer(tiny_config(corpus, str(tmp_path / "single"), 2 * b, steps), log=lambda s: None)
    for _ in range(steps):
        single.train_step()
    ref = single.model.state_dict()
    assert set(ref) == set(mpi_weights)
    for k in ref:
        np.testing.assert_allclose(mpi_weights[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # and the weights really moved away from the initial ones
    init = Trainer(tiny_config(corpus, str(tmp_path / "init"), b, steps), log=lambda s: None).model.state_dict()
    assert any(not np.allclose(init[k], ref[k]) for k in ref)


def test_rank_failure_ends_the_job_quickly(tmp_path: Path, corpus: str) -> None:
    t0 = time.time()
    r = run_mpi(2, [str(WORKER), "fail", str(tmp_path / "f"), corpus, "6", "2"], timeout=90)
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr + r.stdout
    assert time.time() - t0 < 60


def test_cli_resume_under_mpi_continues_exactly(tmp_path: Path, corpus: str) -> None:
    common = ["-m", "tinygrad_lm", "train", "--data", corpus, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--block-size", "8", "--batch-size", "2", "--eval-iters", "1", "--sample-tokens", "0",
              "--progress", "false", "--warmup-iters", "2", "--lr-decay-iters", "8", "--eval-interval", "4",
              "--ckpt-interval", "4", "--cache-dir", str(tmp_path / "cache")]
    straight = run_mpi(2, common + ["--max-iters", "8", "--out", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr
    first = run_mpi(2, common + ["--max-iters", "4", "--out", str(tmp_path / "b")])
    assert first.returncode == 0, first.stderr
    second = run_mpi(2, ["-m", "tinygrad_lm", "train", "--resume", str(tmp_path / "b"), "--max-iters", "8"])
    assert second.returncode == 0, second.stderr
    assert "resumed at step 4" in second.stdout
    from nn.serialization import load_safetensors
    a, _ = load_safetensors(tmp_path / "a" / "step-000008" / "model.safetensors")
    b, _ = load_safetensors(tmp_path / "b" / "step-000008" / "model.safetensors")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_zero1_equals_plain_data_parallelism_with_half_the_optimizer_memory(tmp_path: Path, corpus: str) -> None:
    steps, b = 4, 3
    plain = run_mpi(2, [str(WORKER), "train", str(tmp_path / "plain"), corpus, str(steps), str(b)])
    zero = run_mpi(2, [str(WORKER), "zero", str(tmp_path / "zero"), corpus, str(steps), str(b)])
    assert plain.returncode == 0 and zero.returncode == 0, plain.stderr + zero.stderr
    a, z = dict(np.load(tmp_path / "plain" / "weights.npz")), dict(np.load(tmp_path / "zero" / "weights.npz"))
    for k in a:
        np.testing.assert_allclose(z[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    c = [json.loads((tmp_path / "zero" / f"checksums.{r}.json").read_text()) for r in (0, 1)]
    assert c[0]["sums"] == c[1]["sums"]  # all-gather leaves every rank with the same weights
    full = json.loads((tmp_path / "plain" / "checksums.0.json").read_text())["optimizer_bytes"]
    for r in (0, 1):
        assert c[r]["optimizer_bytes"] <= full / 2 + 64  # half the moments per rank (plus padding)


def test_cli_resume_with_zero1_continues_exactly(tmp_path: Path, corpus: str) -> None:
    common = ["-m", "tinygrad_lm", "train", "--data", corpus, "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
              "--block-size", "8", "--batch-size", "2", "--eval-iters", "1", "--sample-tokens", "0",
              "--progress", "false", "--warmup-iters", "2", "--lr-decay-iters", "8", "--eval-interval", "4",
              "--ckpt-interval", "4", "--zero", "1", "--cache-dir", str(tmp_path / "cache")]
    assert run_mpi(2, common + ["--max-iters", "8", "--out", str(tmp_path / "a")]).returncode == 0
    assert run_mpi(2, common + ["--max-iters", "4", "--out", str(tmp_path / "b")]).returncode == 0
    second = run_mpi(2, ["-m", "tinygrad_lm", "train", "--resume", str(tmp_path / "b"), "--max-iters", "8"])
    assert second.returncode == 0, second.stderr
    from nn.serialization import load_safetensors
    a, _ = load_safetensors(tmp_path / "a" / "step-000008" / "model.safetensors")
    b, _ = load_safetensors(tmp_path / "b" / "step-000008" / "model.safetensors")
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bucketed_allreduce_averages_exactly_and_in_float16(dtype: str) -> None:
    r = run_mpi(2, [str(WORKER.parent / "allreduce_worker.py"), dtype])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"OK {dtype}" in r.stdout
    assert int(r.stdout.split("buckets=")[1].split()[0]) > 1


def test_two_ranks_on_gpu_equal_one_gpu_with_double_batch(tmp_path: Path, corpus: str) -> None:
    """One MPI rank per GPU (here: two ranks sharing the one GPU, so gradients are staged through
    the host; with a GPU each they would go through NCCL)."""
    from tensor import backend
    if not backend.cuda_available():
        pytest.skip("needs CuPy and an NVIDIA GPU")
    steps, b = 4, 3
    out = tmp_path / "gpu"
    r = run_mpi(2, [str(WORKER), "train", str(out), corpus, str(steps), str(b), "cuda"])
    assert r.returncode == 0, r.stdout + r.stderr
    c = [json.loads((out / f"checksums.{k}.json").read_text()) for k in (0, 1)]
    assert c[0]["sums"] == c[1]["sums"]
    import cupy
    expected = "nccl" if cupy.cuda.runtime.getDeviceCount() >= 2 else "mpi-host"
    assert c[0]["transport"] == expected
    sys.path.insert(0, str(WORKER.parent))
    from dp_worker import tiny_config  # noqa: E402
    from tinygrad_lm.train import Trainer
    single = Trainer(tiny_config(corpus, str(tmp_path / "single"), 2 * b, steps, device="cuda"), log=lambda s: None)
    for _ in range(steps):
        single.train_step()
    ref = single.model.state_dict()
    got = dict(np.load(out / "weights.npz"))
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)


def gpu_count() -> int:
    from tensor import backend
    if not backend.cuda_available():
        pytest.skip("needs CuPy and an NVIDIA GPU")
    return backend.cupy_module().cuda.runtime.getDeviceCount()


@pytest.mark.gpu
def test_zero1_on_gpu_equals_plain_data_parallelism_on_gpu(tmp_path: Path, corpus: str) -> None:
    """ZeRO-1 with device buffers: its reduce-scatter and all-gather go by the GPU transport."""
    gpu_count()
    steps, b = 4, 3
    plain = run_mpi(2, [str(WORKER), "train", str(tmp_path / "plain"), corpus, str(steps), str(b), "cuda"])
    zero = run_mpi(2, [str(WORKER), "zero", str(tmp_path / "zero"), corpus, str(steps), str(b), "cuda"])
    assert plain.returncode == 0 and zero.returncode == 0, plain.stderr + zero.stderr
    a, z = dict(np.load(tmp_path / "plain" / "weights.npz")), dict(np.load(tmp_path / "zero" / "weights.npz"))
    for k in a:
        np.testing.assert_allclose(z[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    c = [json.loads((tmp_path / "zero" / f"checksums.{r}.json").read_text()) for r in (0, 1)]
    assert c[0]["sums"] == c[1]["sums"]


# ---------------------------------------------------------------- the Communicator
COMM_WORKER = WORKER.parent / "comm_worker.py"


def test_communicator_collectives_and_splits_match_closed_forms() -> None:
    """allreduce (sum, mean, float16 wire), broadcast, reduce_scatter, all_gather, send/recv,
    any/all, split into communicators of size 1 and 2, and every (dp, pp, tp) Grid of 2 ranks,
    on host buffers over host MPI."""
    r = run_mpi(2, [str(COMM_WORKER), "cpu"], timeout=180)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["mpi-host", "mpi-cuda-aware", "nccl"])
def test_communicator_on_gpu_matches_closed_forms(transport: str) -> None:
    """Device buffers by each transport. Two ranks share one GPU (staged through the host)
    unless there are two: NCCL refuses two ranks on one GPU."""
    n = gpu_count()
    if transport == "nccl" and n < 2:
        pytest.skip("NCCL needs a GPU per rank: two GPUs")
    if transport == "mpi-cuda-aware" and os.environ.get("TINYGRAD_LM_CUDA_AWARE_MPI") != "1":
        pytest.skip("set TINYGRAD_LM_CUDA_AWARE_MPI=1 where the MPI library is CUDA-aware")
    r = run_mpi(2, [str(COMM_WORKER), "cuda", transport], timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the collective watchdog
WATCHDOG_WORKER = WORKER.parent / "watchdog_worker.py"


def test_watchdog_aborts_the_job_when_a_rank_stalls() -> None:
    t0 = time.time()
    r = run_mpi(2, [str(WATCHDOG_WORKER), "hang"], timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert ("[rank 0] error: collective allreduce did not finish within 2 s (another rank may have died or "
            "stalled); aborting the job") in out, out
    assert time.time() - t0 < 20


def test_watchdog_stays_quiet_while_collectives_finish() -> None:
    r = run_mpi(2, [str(WATCHDOG_WORKER), "ok"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK watchdog threads=1" in r.stdout  # one thread for all 800 collectives


class FakeEvent:
    def __init__(self, done: bool) -> None:
        self.done = done


def watchdog(timeout: float) -> tuple:
    from nn.distributed import Watchdog
    fired: list[int] = []
    called = threading.Event()

    def abort(code: int) -> None:  # stands in for MPI Abort, which never returns
        fired.append(code)
        called.set()
        threading.Event().wait()

    return Watchdog(rank=3, abort=abort, timeout=timeout), fired, called


def test_watchdog_fires_once_for_a_collective_past_its_deadline(capsys: pytest.CaptureFixture) -> None:
    wd, fired, called = watchdog(0.2)
    for _ in range(5):
        wd.end(wd.begin("broadcast"))
    wd.begin("reduce_scatter")  # never ends
    assert called.wait(10)
    assert fired == [1]
    assert ("[rank 3] error: collective reduce_scatter did not finish within 0.2 s (another rank may have died "
            "or stalled); aborting the job") in capsys.readouterr().err


def test_watchdog_waits_for_an_asynchronous_collective_to_complete() -> None:
    wd, fired, called = watchdog(0.2)
    wd.end(wd.begin("allreduce"), FakeEvent(done=True))
    time.sleep(0.5)
    assert fired == []
    wd.end(wd.begin("all_gather"), FakeEvent(done=False))  # queued on the device, never completes
    assert called.wait(10) and fired == [1]


def test_watchdog_is_off_at_zero_and_quiet_when_collectives_finish() -> None:
    wd, fired, _ = watchdog(0.0)
    assert wd.begin("allreduce") is None  # off: no entry, no thread
    assert wd._thread is None
    wd.timeout = 0.1
    for _ in range(1000):
        wd.end(wd.begin("allreduce"))
    time.sleep(0.4)
    assert fired == []
    assert wd._thread is not None and wd._thread.is_alive()  # one thread, started by the first collective
    assert len(wd._pending) <= 1  # finished entries do not pile up
