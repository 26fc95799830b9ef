"""Grade a learner's `backward` with gradcheck over Hypothesis-drawn shapes.

An exercise file (`examples/exercises/NAME.py`) defines
  * one `Function` subclass: `forward` given, `backward` to write;
  * `make_inputs(draw, rng)` -> {name: array} (float arrays get gradients, integer
    arrays are constants), or ({name: array}, {keyword: value}) for op keywords;
  * optionally `HINTS = {kind: text}`, shown when that kind of mistake is found
    (kinds: "shape", "sign", "factor", "zero", "none", "partial", "wrong", "nan").

`check(name)` runs about 30 examples (float64, a fixed seed, no shrinking: fast) and
returns a `Result` whose `message` is the teaching text the command line prints.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tensor.gradcheck import GradcheckError, gradcheck, numeric_grad
from tensor.tensor import Function, Tensor, no_grad

# The order a learner meets them in: scalars, broadcasting, reductions, matrices, then GPT parts.
CURRICULUM = [
    "mul", "div", "pow", "exp", "log", "tanh",
    "broadcast_add", "sum", "matmul", "max",
    "softmax", "log_softmax", "cross_entropy", "layer_norm", "embedding", "gelu",
    "attention", "transformer_block", "tensor_parallel",
]

ENV_DIR = "TINYGRAD_EXERCISES_DIR"
DEFAULT_EXAMPLES = 30
DEV_EXTRA_HELP = "the exercise checker needs Hypothesis: pip install -e '.[dev]'"

SOLVED, NOT_STARTED, WRONG, ERROR, MISSING = "solved", "not started", "wrong", "error", "missing"
BROKEN = "does not load"  # the file is there but does not import, or defines no single Function
GRADIENT = "gradient"  # a gradcheck mismatch, diagnosed once several examples are in
DIAGNOSE_AFTER = 4     # wrong-gradient examples collected before the verdict (more data, surer diagnosis)


class ExerciseSetupError(RuntimeError):
    """The exercises folder or an exercise file cannot be found or is malformed."""


@dataclass
class Result:
    name: str
    status: str                   # solved / not started / wrong / error / missing / does not load
    message: str                  # what to print
    examples: int = 0             # examples that passed before the verdict
    kind: str = ""                # the diagnosis for a wrong gradient (sign, factor, shape, ...)
    details: dict = field(default_factory=dict)

    @property
    def solved(self) -> bool:
        return self.status == SOLVED


# ------------------------------------------------------------------ finding the files
def find_exercise_dir(directory: str | os.PathLike | None = None) -> Path:
    """--dir, else $TINYGRAD_EXERCISES_DIR, else examples/exercises/ of this checkout."""
    source = "--dir"
    if directory is None:
        directory, source = os.environ.get(ENV_DIR), f"${ENV_DIR}"
    if directory is not None:
        p = Path(directory)
        if not p.is_dir():
            found = "is a file, not a folder" if p.exists() else "does not exist"
            raise ExerciseSetupError(f"exercise folder {p} (from {source}) {found}")
        return p
    repo = Path(__file__).resolve().parents[2]  # tensor/exercises/checker.py -> repo root
    for candidate in (repo / "examples" / "exercises", Path.cwd() / "examples" / "exercises"):
        if candidate.is_dir():
            return candidate
    raise ExerciseSetupError(
        "cannot find examples/exercises/: it lives in the tinygrad-lm source checkout "
        "(install it with `pip install -e .` from the checkout, run from the checkout's root, "
        f"or pass --dir PATH / set {ENV_DIR})")


def exercise_names(directory: Path) -> list[str]:
    """The curriculum's exercises present in `directory`, then any other *.py files there."""
    present = {p.stem for p in directory.glob("*.py") if not p.name.startswith("_")}
    return [n for n in CURRICULUM if n in present] + sorted(present - set(CURRICULUM))


def load_exercise(name: str, directory: Path) -> ModuleType:
    """Import directory/name.py under a private module name (no sys.path changes)."""
    path = directory / f"{name}.py"
    if not path.is_file():
        known = ", ".join(exercise_names(directory)) or "none"
        raise ExerciseSetupError(f"no exercise {name!r} in {directory} (exercises: {known})")
    tag = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    spec = importlib.util.spec_from_file_location(f"_exercise_{name}_{tag}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except (Exception, SystemExit) as e:  # a syntax error in the learner's file, say: one line that names it
        detail = " ".join(str(e).split())
        raise ExerciseSetupError(f"cannot import {path}: {type(e).__name__}: {detail}{_user_frame(e, str(path))}") \
            from e
    return module


def load_op(name: str, directory: Path) -> tuple[ModuleType, type[Function]]:
    """The exercise's module and its Function; ExerciseSetupError when the file is missing or broken."""
    module = load_exercise(name, directory)
    return module, exercise_op(module)


def exercise_op(module: ModuleType) -> type[Function]:
    """The one Function subclass the exercise file defines."""
    ops = [v for v in vars(module).values() if inspect.isclass(v) and issubclass(v, Function)
           and v is not Function and v.__module__ == module.__name__]
    if len(ops) != 1:
        raise ExerciseSetupError(f"{module.__file__}: expected one Function subclass, found "
                                 f"{[o.__name__ for o in ops] or 'none'}")
    return ops[0]


# ------------------------------------------------------------------ one example
class _Failed(Exception):
    """Raised inside the Hypothesis loop to stop at the first failing example."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.message)
        self.result = result


def _fmt_shape(s: tuple) -> str:
    return "(" + ", ".join(str(n) for n in s) + ("," if len(s) == 1 else "") + ")"


def _case(module: ModuleType, draw: Any, rng: np.random.Generator) -> tuple[dict, dict]:
    made = module.make_inputs(draw, rng)
    arrays, kwargs = made if isinstance(made, tuple) else (made, {})
    return {k: np.asarray(v) for k, v in arrays.items()}, dict(kwargs)


def _user_frame(exc: BaseException, path: str) -> str:
    """'line N: code' of the deepest frame of the traceback inside the learner's file."""
    where = ""
    for fr in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(fr.filename) == os.path.abspath(path):
            where = f" (line {fr.lineno}: {fr.line})"
    return where


def _seed_v(shape: tuple) -> np.ndarray:
    """The output weights v gradcheck uses (L = sum(out * v)), seed 0: the same draw."""
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape) if shape else np.asarray(1.0)


def check_example(name: str, module: ModuleType, op: type[Function], arrays: dict, kwargs: dict) -> None:
    """Grade one drawn example; raise _Failed with a teaching message on the first problem."""
    path = module.__file__ or ""
    hints: dict = getattr(module, "HINTS", {})
    names = list(arrays)
    desc = ", ".join(f"{k} {_fmt_shape(a.shape)}" for k, a in arrays.items())
    if kwargs:
        desc += ", " + ", ".join(f"{k}={v!r}" for k, v in kwargs.items())

    def fail(status: str, headline: str, kind: str = "", diagnosis: str = "", details: dict | None = None) -> None:
        msg = teaching_message(name, headline, kind, diagnosis, hints, desc, path)
        raise _Failed(Result(name, status, msg, kind=kind, details=dict(details or {}, headline=headline,
                                                                          example=desc)))

    def fresh() -> list[Tensor]:
        return [Tensor(a.copy(), requires_grad=a.dtype.kind == "f") for a in arrays.values()]

    # 1. the returned gradients: one per input, right shape and dtype (called directly, so
    #    mistakes get named before the engine or gradcheck trip over them)
    ts = fresh()
    out = op.apply(*ts, **kwargs)
    ctx = out._ctx
    if ctx is None:
        fail(ERROR, "the forward made no graph node (does an input require grad?)")
    g = _seed_v(out.shape)
    try:
        grads = ctx.backward(g)
    except NotImplementedError as e:
        raise _Failed(Result(name, NOT_STARTED, f"[ ] {name}: not started yet: backward raises "
                             f"NotImplementedError({str(e)!r}).\n    Open {path}, read the docstring, "
                             "and replace the TODO with your backward.")) from None
    except Exception as e:  # noqa: BLE001 - any bug in the learner's code is reported, not raised
        fail(ERROR, f"backward raised {type(e).__name__}: {e}{_user_frame(e, path)}", "error",
             "read the error; compare each array's shape with the docstring's (print them!).")
    if not isinstance(grads, (tuple, list)):
        fail(WRONG, f"backward must return a tuple (one gradient per input), got {type(grads).__name__}",
             "none", f"return a tuple even for one input: `return (dx,)`; inputs are {names}")
    if len(grads) != len(names):
        fail(WRONG, f"backward returned {len(grads)} gradient(s) but the op has {len(names)} input(s) {names}",
             "none", "did you return the gradient for every input (None for an integer input)?")
    analytic: dict[str, np.ndarray] = {}
    for k, gr, t in zip(names, grads, ts):
        if not t.requires_grad:
            continue  # integer inputs: anything (normally None) is ignored
        if gr is None:
            fail(WRONG, f"backward returned None for input '{k}', which needs a gradient", "none",
                 "did you return the gradient for every input?")
        gr = np.asarray(gr)
        if gr.shape != t.shape:
            if _broadcasts(t.shape, gr.shape):
                diag = (f"the gradient has the shape of the broadcast result {_fmt_shape(gr.shape)}: "
                        "did you reduce over the broadcast axes? (sum over every axis that broadcasting added or stretched)")
            elif gr.size == t.size:
                diag = "same number of elements in another layout: a missing transpose or reshape?"
            else:
                diag = "each gradient must have exactly its input's shape"
            fail(WRONG, f"the gradient for '{k}' has shape {_fmt_shape(gr.shape)}, but '{k}' has shape "
                        f"{_fmt_shape(t.shape)}", "shape", diag)
        if gr.dtype != t.dtype:
            fail(WRONG, f"the gradient for '{k}' has dtype {gr.dtype}, but '{k}' is {t.dtype}", "dtype",
                 "keep the input's dtype (float64 here): avoid float32 constants and integer arrays")
        analytic[k] = gr.astype(np.float64)

    # 2. gradcheck: analytic against central differences
    ts = fresh()
    try:
        gradcheck(lambda *xs: op.apply(*xs, **kwargs), ts)
    except GradcheckError as e:
        k = names[e.input_index]
        idx = tuple(e.index)
        fail(WRONG, f"the gradient of input '{k}' {_fmt_shape(arrays[k].shape)} is wrong at index {idx}: "
                    f"expected {e.numeric:.6g} (numeric), got {e.analytic:.6g} (your backward)",
             GRADIENT, details={"input": k, "index": idx, "expected": e.numeric, "got": e.analytic,
                                "analytic": analytic[k], "numeric": _numeric(op, arrays, kwargs, k)})
    except Exception as e:  # noqa: BLE001
        fail(ERROR, f"backward raised {type(e).__name__} during gradcheck: {e}{_user_frame(e, path)}", "error")


def teaching_message(name: str, headline: str, kind: str, diagnosis: str, hints: dict, example: str,
                     path: str) -> str:
    """The text printed for a failed check: what is wrong, the likely cause, a hint, the example."""
    lines = [f"[ ] {name}: {headline}"]
    if diagnosis:
        lines.append(f"    diagnosis: {diagnosis}")
    if kind and kind in hints:
        lines.append(f"    hint: {hints[kind]}")
    lines.append(f"    example: {example}")
    lines.append(f"    file: {path}")
    return "\n".join(lines)


def _broadcasts(small: tuple, big: tuple) -> bool:
    if len(small) > len(big):
        return False
    return all(s in (1, b) for s, b in zip(small[::-1], big[::-1]))


def _numeric(op: type[Function], arrays: dict, kwargs: dict, which: str) -> np.ndarray:
    """Central differences of L = sum(op(...) * v) with respect to input `which`."""
    vals = {k: a.copy() for k, a in arrays.items()}
    with no_grad():
        shape = op.apply(*[Tensor(a) for a in vals.values()], **kwargs).shape
    v = _seed_v(shape)

    def loss() -> float:
        with no_grad():
            return float((op.apply(*[Tensor(a) for a in vals.values()], **kwargs).data * v).sum())
    return numeric_grad(loss, vals[which], 1e-6)


def diagnose(analytic: np.ndarray, numeric: np.ndarray) -> tuple[str, str]:
    """Name the likely mistake from one whole gradient: (kind, explanation)."""
    return diagnose_many([(analytic, numeric, "")])


def diagnose_many(cases: list[tuple[np.ndarray, np.ndarray, str]]) -> tuple[str, str]:
    """Name the likely mistake from the wrong gradients of several examples.

    cases: (analytic, numeric, example description) of one input in each failing example.
    Kinds: nan, zero, sign, factor (a constant multiple), partial (right at some elements),
    wrong (anything else).
    """
    pairs = [(np.asarray(a, np.float64).reshape(-1), np.asarray(n, np.float64).reshape(-1)) for a, n, _ in cases]
    a_all = np.concatenate([a for a, _ in pairs])
    n_all = np.concatenate([n for _, n in pairs])
    if not np.all(np.isfinite(a_all)):
        return "nan", "your gradient holds NaN or inf: a division by zero, or the log of a non-positive number?"
    scale = max(float(np.abs(n_all).max(initial=0.0)), 1e-12)
    if np.abs(a_all).max(initial=0.0) <= 1e-6 * scale:
        return "zero", ("your gradient is zero everywhere: did you return the gradient for every input, "
                        "and multiply by the incoming gradient g rather than by zeros?")
    if np.allclose(a_all, -n_all, rtol=1e-3, atol=1e-5):
        return "sign", "your gradient is the exact negative of the true one: a sign error?"
    factors, fits, informative = [], True, 0
    for a, n in pairs:
        c = float(a @ n) / max(float(n @ n), 1e-300)
        factors.append(c)
        fits &= bool(np.allclose(a, c * n, rtol=1e-3, atol=1e-5 * max(1.0, abs(c))))
        informative = max(informative, int((np.abs(n) > 1e-6 * scale).sum()))
    if fits and informative >= 2 and all(1e-3 < abs(c) < 1e3 for c in factors):
        if max(factors) - min(factors) <= 1e-3 * max(abs(c) for c in factors):
            c = factors[0]
            return "factor", (f"your gradient is {c:.4g} times the true one everywhere: "
                              f"{'an extra' if abs(c) > 1 else 'a missing'} factor of "
                              f"{_nice(c if abs(c) > 1 else 1 / c)}?")
        seen = ", ".join(f"{c:.4g} for {desc}" for c, (_, _, desc) in zip(factors, cases))
        return "factor", (f"your gradient is a constant multiple of the true one, but the constant changes "
                          f"with the shapes ({seen}): a missing division by a size (1/N? 1/sqrt(D)?)")
    close = np.abs(a_all - n_all) <= 1e-5 + 1e-3 * np.abs(n_all)
    if close.mean() >= 0.25:
        return "partial", (f"right at {int(close.sum())} of {close.size} elements, wrong at the rest: "
                           "look at what is special about the wrong ones (ties? masked positions? repeated ids? "
                           "an axis you summed over?)")
    return "wrong", ("wrong at most elements: re-derive on a tiny case by hand (1 or 2 elements), "
                     "and check that you multiply by the incoming gradient g (the chain rule)")


def _nice(x: float) -> str:
    """2.0 -> '2', 0.333 -> '1/3', 1.4142 -> '1.414'."""
    for d in range(1, 13):
        if abs(x * d - round(x * d)) < 1e-3 * max(1.0, abs(x * d)):
            num = int(round(x * d))
            return str(num) if d == 1 else f"{num}/{d}"
    return f"{x:.4g}"


# ------------------------------------------------------------------ the whole check
def check(name: str, directory: str | os.PathLike | None = None, examples: int = DEFAULT_EXAMPLES,
          seed: int = 0) -> Result:
    """Grade exercise `name` on `examples` Hypothesis-drawn examples; never raises for learner bugs."""
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import strategies as st
    except ImportError:
        raise ExerciseSetupError(DEV_EXTRA_HELP) from None
    folder = find_exercise_dir(directory)
    try:
        module, op = load_op(name, folder)
    except ExerciseSetupError as e:  # missing, does not import, or no Function in it
        status = BROKEN if (folder / f"{name}.py").is_file() else MISSING
        return Result(name, status, f"[ ] {name}: {e}", details={"error": str(e)})
    passed = [0]
    failure: list[Result] = []     # a structural failure: stop at once
    wrong: list[Result] = []       # wrong gradients: collect a few, then diagnose them together

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data: Any) -> None:
        if failure or len(wrong) >= DIAGNOSE_AFTER:
            raise _Failed((failure or wrong)[0])
        rng = np.random.default_rng([seed, data.draw(st.integers(0, 2 ** 31 - 1), label="seed")])
        arrays, kwargs = _case(module, data.draw, rng)
        try:
            check_example(name, module, op, arrays, kwargs)
        except _Failed as f:
            if f.result.kind != GRADIENT:
                f.result.examples = passed[0]
                failure.append(f.result)
                raise
            wrong.append(f.result)
            if len(wrong) >= DIAGNOSE_AFTER:
                raise
            return
        passed[0] += 1

    try:
        run()
    except Exception as e:  # noqa: BLE001 - _Failed, or make_inputs itself broke
        if failure:
            return failure[0]
        if not wrong:
            return Result(name, ERROR, f"[ ] {name}: the check itself failed: {type(e).__name__}: {e}")
    if wrong:
        return _gradient_verdict(name, module, wrong, passed[0])
    return Result(name, SOLVED, f"[x] {name}: solved! gradcheck passed on {passed[0]} examples.",
                  examples=passed[0])


def _gradient_verdict(name: str, module: ModuleType, wrong: list[Result], passed: int) -> Result:
    """Report the first (smallest) failing example, diagnosed over every failure of that input."""
    first = wrong[0]
    k = first.details["input"]
    same = [r for r in wrong if r.details["input"] == k]
    kind, diag = diagnose_many([(r.details["analytic"], r.details["numeric"], r.details["example"]) for r in same])
    msg = teaching_message(name, first.details["headline"], kind, diag, getattr(module, "HINTS", {}),
                           first.details["example"], module.__file__ or "")
    return Result(name, WRONG, msg, examples=passed, kind=kind, details=first.details)


def statement(name: str, directory: str | os.PathLike | None = None) -> str:
    """The exercise's docstring: what to derive."""
    module, op = load_op(name, find_exercise_dir(directory))
    return inspect.cleandoc(module.__doc__ or "") + "\n\n" + inspect.cleandoc(op.__doc__ or "")
