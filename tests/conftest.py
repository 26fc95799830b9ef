"""Shared pytest setup.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        (default) 100 examples per property, derandomized: every run draws the same examples
  thorough  1000 examples per property, still derandomized (reproducible, just longer)
  dev       20 examples, for quick local iterations
"""
from __future__ import annotations

import os
import sys

import pytest
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


def pytest_collection_modifyitems(session, config, items) -> None:
    """A test asking for an argument that no fixture or parametrization provides fails the collection, on any
    machine: the GPU tests are skipped without a GPU, so their setup, where pytest would notice, never runs here."""
    missing = []
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        missing += [f"{item.nodeid}: {name}" for name in info.argnames
                    if name not in params and name not in info.name2fixturedefs and name != "request"]
    if missing:
        raise pytest.UsageError("tests ask for arguments nothing provides (a parametrize lost?):\n  "
                                + "\n  ".join(missing[:20]))
