"""Backward-pass exercises: write the gradient of an op, and a checker grades it.

    python -m tensor.exercises list            # every exercise, solved or not yet
    python -m tensor.exercises show softmax    # what to derive
    python -m tensor.exercises check softmax   # grade examples/exercises/softmax.py
    python -m tensor.exercises check all --dir examples/exercises/solutions

The exercise files live in `examples/exercises/` of the source checkout; reference
solutions in `examples/exercises/solutions/`. See `tensor/exercises/checker.py`.
"""
from tensor.exercises.checker import (CURRICULUM, ENV_DIR, ExerciseSetupError, Result, check, diagnose,
                                      exercise_names, find_exercise_dir, statement)

__all__ = ["CURRICULUM", "ENV_DIR", "ExerciseSetupError", "Result", "check", "diagnose", "exercise_names",
           "find_exercise_dir", "statement"]
