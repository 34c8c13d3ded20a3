"""Renamed arguments keep their old names for a while, with a DeprecationWarning."""
from __future__ import annotations

import warnings


def renamed_argument(old: str, old_value, new: str, new_value):
    """The value of an argument renamed from ``old`` to ``new``: ``old_value`` (with a warning)
    when the caller used the old name, else ``new_value``."""
    if old_value is None:
        return new_value
    warnings.warn(f"argument {old!r} is deprecated: use {new!r}", DeprecationWarning, stacklevel=3)
    return old_value
