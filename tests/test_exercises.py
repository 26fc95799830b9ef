"""The backward-pass exercises: the checker fails on every stub, passes on every
reference solution, and explains a wrong answer (which input, where, expected vs got, a hint)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tensor.exercises import CURRICULUM, check, diagnose, exercise_names
from tensor.exercises.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "examples" / "exercises"
SOLUTIONS = STUBS / "solutions"


def test_curriculum_is_complete() -> None:
    assert len(CURRICULUM) >= 15
    assert exercise_names(STUBS) == CURRICULUM
    assert exercise_names(SOLUTIONS) == CURRICULUM


@pytest.mark.parametrize("name", CURRICULUM)
def test_checker_fails_on_the_stub(name: str) -> None:
    r = check(name, STUBS, examples=5)
    assert r.status == "not started", r.message
    assert "not started yet" in r.message and f"{name}.py" in r.message


@pytest.mark.parametrize("name", CURRICULUM)
def test_checker_passes_on_the_solution(name: str) -> None:
    r = check(name, SOLUTIONS)
    assert r.solved, r.message
    assert r.examples >= 20  # Hypothesis really drew many examples


def _without_backward_bodies(path: Path) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "backward":
            node.body = []
    return ast.dump(tree)


@pytest.mark.parametrize("name", CURRICULUM)
def test_stub_and_solution_differ_only_in_backward(name: str) -> None:
    assert _without_backward_bodies(STUBS / f"{name}.py") == _without_backward_bodies(SOLUTIONS / f"{name}.py")
    stub = (STUBS / f"{name}.py").read_text()
    assert 'raise NotImplementedError("TODO' in stub and "# ---- TODO" in stub


def _mutant(tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = (SOLUTIONS / f"{name}.py").read_text()
    assert old in text
    (tmp_path / f"{name}.py").write_text(text.replace(old, new))
    return tmp_path


def test_forgotten_broadcast_reduction_gets_the_broadcast_hint(tmp_path: Path) -> None:
    d = _mutant(tmp_path, "broadcast_add", "return reduce_to(g, self.shape_a), reduce_to(g, self.shape_b)",
                "return reduce_to(g, self.shape_a), g")
    r = check("broadcast_add", d)
    assert r.status == "wrong" and r.kind == "shape"
    assert "the gradient for 'b' has shape" in r.message
    assert "did you reduce over the broadcast axes?" in r.message


def test_sign_error_names_input_index_values_and_hint(tmp_path: Path) -> None:
    d = _mutant(tmp_path, "div", "return g / b, -g * a / (b * b)", "return g / b, g * a / (b * b)")
    r = check("div", d)
    assert r.status == "wrong" and r.kind == "sign"
    det = r.details
    assert det["input"] == "b" and det["got"] == pytest.approx(-det["expected"], rel=1e-3)
    assert f"input 'b'" in r.message and f"at index {det['index']}" in r.message
    assert "expected" in r.message and "(numeric)" in r.message and "got" in r.message
    assert "sign error?" in r.message and "hint: d(1/b)/db = -1/b^2" in r.message


def test_missing_mean_is_a_shape_dependent_factor(tmp_path: Path) -> None:
    d = _mutant(tmp_path, "cross_entropy", "return d * (g / len(targets)), None", "return d * g, None")
    r = check("cross_entropy", d)
    assert r.kind == "factor" and "1/N?" in r.message and "divide by N" in r.message


def test_ties_are_diagnosed_as_partial(tmp_path: Path) -> None:
    d = _mutant(tmp_path, "max", "winners /= winners.sum(axis=-1, keepdims=True)  # ties share equally", "pass")
    r = check("max", d)
    assert r.kind == "partial" and "tie" in r.message


def test_missing_gradient_and_wrong_count(tmp_path: Path) -> None:
    d = _mutant(tmp_path, "mul", "return g * b, g * a", "return g * b, None")
    r = check("mul", d)
    assert r.kind == "none" and "returned None for input 'b'" in r.message
    d = _mutant(tmp_path, "mul", "return g * b, g * a", "return (g * b,)")
    r = check("mul", d)
    assert "returned 1 gradient(s) but the op has 2 input(s)" in r.message


def test_an_exception_in_backward_is_reported_with_its_line(tmp_path: Path) -> None:
    d = _mutant(tmp_path, "matmul", "da = g @ b.T", "da = g @ b")
    r = check("matmul", d)
    assert r.status in ("error", "wrong")
    assert "matmul.py" in r.message


def test_diagnose_kinds() -> None:
    import numpy as np
    n = np.array([1.0, -2.0, 3.0])
    assert diagnose(-n, n)[0] == "sign"
    assert diagnose(2 * n, n)[0] == "factor" and "factor of 2" in diagnose(2 * n, n)[1]
    assert diagnose(0.5 * n, n)[0] == "factor" and "missing a factor" not in diagnose(0.5 * n, n)[1]
    assert diagnose(np.zeros(3), n)[0] == "zero"
    assert diagnose(np.array([1.0, -2.0, 0.0]), n)[0] == "partial"
    assert diagnose(np.array([np.nan, 0, 0]), n)[0] == "nan"


def test_cli_list_check_show_and_errors(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["--dir", str(SOLUTIONS), "list"]) == 0
    out = capsys.readouterr().out
    assert f"{len(CURRICULUM)}/{len(CURRICULUM)} solved" in out and "[x] solved   softmax" in out
    assert main(["list"]) == 0  # the stubs of this checkout
    out = capsys.readouterr().out
    assert f"0/{len(CURRICULUM)} solved" in out and "[ ] not yet  softmax" in out
    assert main(["check", "softmax"]) == 1
    assert "not started yet" in capsys.readouterr().out
    assert main(["check", "softmax", "--dir", str(SOLUTIONS)]) == 0
    assert "solved" in capsys.readouterr().out
    assert main(["show", "layer_norm"]) == 0
    assert "Derive" in capsys.readouterr().out
    assert main(["check", "nope"]) == 2
    assert "error: no exercise 'nope'" in capsys.readouterr().err
    assert main(["--dir", str(tmp_path / "missing"), "list"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_env_var_points_the_checker_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINYGRAD_EXERCISES_DIR", str(SOLUTIONS))
    assert check("gelu").solved


# ------------------------------------------------------------------ the command line, as a user runs it
def run_cli(*args: str, stdout_to_head: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tensor.exercises", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if stdout_to_head:  # `python -m tensor.exercises ... | head -1`, through a real pipe
        script = " ".join(f"'{c}'" for c in cmd) + " | head -1; echo \"status=${PIPESTATUS[0]}\" >&2"
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300, env=env,
                              cwd=ROOT)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("broken_exercises")
    (d / "mul.py").write_text((SOLUTIONS / "mul.py").read_text())
    (d / "exp.py").write_text("def broken(:\n")
    (d / "log.py").write_text("import numpy\nundefined_name()\n")
    (d / "tanh.py").write_text("x = 1\n")
    return d


@pytest.mark.parametrize("args, needles", [
    (["nope"], ["invalid choice: 'nope'", "list", "check"]),
    ([], ["required"]),
    (["check"], ["check", "required: name"]),
    (["show", "nope"], ["no exercise 'nope'", "softmax"]),
    (["check", "nope"], ["no exercise 'nope'", "softmax"]),
    (["--bogus", "list"], ["unrecognized arguments: --bogus"]),
    (["list", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["check", "mul", "--exa", "3"], ["unrecognized arguments: --exa"]),  # no abbreviations
    (["check", "mul", "--examples", "x"], ["--examples", "whole number", "'x'"]),
    (["check", "mul", "--examples", "0"], ["--examples", "at least 1"]),
    (["--dir", "/no/such/folder", "list"], ["/no/such/folder", "(from --dir) does not exist"]),
    (["check", "mul", "--dir", str(SOLUTIONS / "mul.py")], ["mul.py", "is a file, not a folder"]),
])
def test_cli_bad_input_is_one_error_line(args: list[str], needles: list[str]) -> None:
    assert_one_line_error(run_cli(*args), *needles)


@pytest.mark.parametrize("name, needles", [
    ("exp", ["exp.py", "SyntaxError", "line 1"]),
    ("log", ["log.py", "NameError", "undefined_name", "line 2"]),
    ("tanh", ["tanh.py", "expected one Function subclass"]),
])
@pytest.mark.parametrize("cmd", ["check", "show"])
def test_cli_a_file_that_does_not_import_is_bad_input(broken_dir: Path, cmd: str, name: str,
                                                      needles: list[str]) -> None:
    assert_one_line_error(run_cli(cmd, name, "--dir", str(broken_dir)), "cannot import" if name != "tanh" else "",
                          *needles)


def test_cli_check_all_grades_the_rest_and_reports_each_broken_file(broken_dir: Path) -> None:
    r = run_cli("check", "all", "--dir", str(broken_dir), "--examples", "5")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "[x] mul: solved" in r.stdout
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors)


def test_cli_list_shows_broken_files_as_not_loading(broken_dir: Path) -> None:
    r = run_cli("list", "--dir", str(broken_dir))
    assert r.returncode == 0, r.stderr
    assert "1/4 solved" in r.stdout and "exp  (does not load: python -m tensor.exercises check exp)" in r.stdout


def test_cli_list_into_a_closed_pipe_ends_quietly() -> None:
    r = run_cli("list", "--dir", str(SOLUTIONS), stdout_to_head=True)
    assert r.stdout.startswith("exercises in ") and r.stdout.count("\n") == 1
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr and "Exception ignored" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] in ("status=0", "status=141")


@pytest.mark.parametrize("args", [["list"], ["show", "softmax"], ["check", "mul", "--examples", "3"]])
def test_cli_output_into_a_pipe_already_closed_ends_quietly(args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails with EPIPE: the deterministic form of `| head -1`
    try:
        r = subprocess.run([sys.executable, "-m", "tensor.exercises", *args, "--dir", str(SOLUTIONS)],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == ""


def test_cli_help_and_success_exit_zero() -> None:
    r = run_cli("--help")
    assert r.returncode == 0 and "list" in r.stdout and "check" in r.stdout
    r = run_cli("check", "mul", "--dir", str(SOLUTIONS), "--examples", "5")
    assert r.returncode == 0 and "[x] mul: solved" in r.stdout and r.stderr == ""


def test_cli_names_the_environment_variable_when_its_folder_is_missing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TINYGRAD_EXERCISES_DIR": str(tmp_path / "gone")}
    r = subprocess.run([sys.executable, "-m", "tensor.exercises", "list"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=ROOT)
    assert_one_line_error(r, "gone", "(from $TINYGRAD_EXERCISES_DIR) does not exist")
