"""Shared pytest setup.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        (default) 100 examples per property, derandomized: every run draws the same examples
  thorough  1000 examples per property, still derandomized (reproducible, just longer)
  dev       20 examples, for quick local iterations
"""
from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# `import tensor` works from a plain checkout; `import test_tensor_common` works under any import mode
for _p in (_ROOT, _HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

_common = dict(deadline=None, derandomize=True, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
