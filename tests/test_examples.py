"""Smoke tests of the guided tour (examples/01_*.py ... 06_*.py): every script runs with
small settings and prints what its docstring says it prints."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EX = ROOT / "examples"


def script(prefix: str) -> Path:
    (path,) = EX.glob(f"{prefix}_*.py")
    return path


def run(path: Path, *args: str, launcher: list[str] | None = None, timeout: float = 120) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = (launcher or []) + [sys.executable, str(path), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def promised_output(path: Path) -> list[str]:
    """The indented block after 'It prints' in the script's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    block = doc.split("It prints", 1)[1].split("\n", 1)[1]
    lines = [l[4:] for l in block.splitlines() if l.startswith("    ")]
    assert lines, f"{path.name}: no 'It prints' block"
    return lines


def matches(promise: list[str], printed: str) -> None:
    """Every promised line is printed, in order; '...' in a promise matches anything."""
    out = printed.splitlines()
    i = 0
    for want in promise:
        pat = re.compile("^" + ".*".join(re.escape(p) for p in want.split("...")) + "$")
        while i < len(out) and not pat.match(out[i]):
            i += 1
        assert i < len(out), f"promised line not printed: {want!r}\n--- printed ---\n{printed}"
        i += 1


def test_the_tour_is_numbered_1_to_7_and_in_the_readme() -> None:
    names = sorted(p.name for p in EX.glob("0[1-9]_*.py"))
    assert [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06", "07"]
    readme = (ROOT / "README.md").read_text()
    learn = readme.split("## Learn", 1)[1].split("\n## ", 1)[0]
    positions = [learn.index(f"examples/{n}") for n in names]
    assert positions == sorted(positions)


def test_01_neuron_prints_exactly_its_docstring(tmp_path: Path) -> None:
    p = script("01")
    out = run(p, "--dot", str(tmp_path / "neuron.dot"))
    assert out.splitlines()[:len(promised_output(p))] == promised_output(p)
    assert (tmp_path / "neuron.dot").read_text().count("Tanh") == 1


def test_02_mlp_learns_iris() -> None:
    p = script("02")
    out = run(p)
    promise = promised_output(p)
    assert out.splitlines()[:2] == promise[:2]
    acc = float(re.search(r"test accuracy: ([\d.]+)", out).group(1))
    assert acc >= 0.9, out
    out = run(p, "--iters", "3")  # flags work
    assert "iter    2" in out


def test_03_gradcheck_prints_exactly_its_docstring() -> None:
    p = script("03")
    assert run(p).splitlines() == promised_output(p)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = ["the", "king", "queen", "speak", "hear", "me", "now", "and", "thou", "art", "not", "so"]
    lines = [" ".join(words[(i * 7 + j * 5) % len(words)] for j in range(12)) for i in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("tour") / "run"
    printed = run(script("04"), "--data", str(corpus), "--max-iters", "2", "--eval-iters", "1",
                  "--sample-tokens", "10", "--out", str(out), "--cache-dir", str(out.parent / "cache"))
    return out, printed


def test_04_trains_the_shakespeare_preset(trained: tuple[Path, str]) -> None:
    out, printed = trained
    promise = [l for l in promised_output(script("04")) if not l.startswith("<")]
    matches([l.replace("100 steps", "2 steps").replace("step 100", "step 2").replace("runs/tour", str(out))
             .replace("corpus shakespeare", "corpus ...").replace("2.6...", "...")
             .replace("81... parameters", "... parameters") for l in promise], printed)
    assert (out / "latest").exists()


def test_05_samples_from_the_checkpoint(trained: tuple[Path, str]) -> None:
    out, _ = trained
    p = script("05")
    printed = run(p, "--ckpt", str(out), "--max-new-tokens", "5", "--prompt", "the ")
    matches([l.replace("ROMEO:", "the ") for l in promised_output(p)], printed)


def test_05_without_a_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(script("05")), "--ckpt", str(tmp_path / "none")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "04_shakespeare_gpt.py" in r.stderr


def mpiexec() -> str | None:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


def test_06_runs_as_one_process(corpus: Path) -> None:
    out = run(script("06"), "--data", str(corpus), "--iters", "2")
    assert "world: 1 rank;" in out and "weights identical on all 1 rank: True" in out


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install 'tinygrad-lm[mpi]')")
def test_06_under_mpiexec_two_ranks(corpus: Path) -> None:
    pytest.importorskip("mpi4py")
    p = script("06")
    out = run(p, "--data", str(corpus), "--iters", "2", launcher=[mpiexec(), "-n", "2"], timeout=180)
    promise = [l for l in promised_output(p) if l != "..."]
    matches([l.replace("4.4...", "...").replace("step  49", "step   1").replace("2.7...", "...") for l in promise],
            out)


def test_07_runs_as_one_process() -> None:
    out = run(script("07"))
    assert "tensor parallel over 1 rank:" in out and "max |y_split - y| = 0.0e+00" in out


@pytest.mark.skipif(mpiexec() is None, reason="no mpiexec (pip install 'tinygrad-lm[mpi]')")
def test_07_under_mpiexec_two_ranks_equals_the_whole_mlp() -> None:
    pytest.importorskip("mpi4py")
    p = script("07")
    out = run(p, launcher=[mpiexec(), "-n", "2"], timeout=120)
    matches(promised_output(p), out)
    for gap in re.findall(r"= ([\d.]+e[-+]\d+)", out):
        assert float(gap) < 1e-5, out  # float32 round-off
