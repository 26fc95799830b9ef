"""The one exception for input a user or a file got wrong.

Every command turns a `UserError` into one line, `error: <message>`, and exit status 2
(`tinygrad_lm.cli.main`). Raise it, or a subclass, where bad input is detected, with a
message that names the file or flag, what was found and what was expected. Anything else
that escapes is an internal bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from a flag, a config file, a checkpoint, a tokenizer file or the data."""
