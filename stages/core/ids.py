"""Names that become file names in the feature store must not be able to escape it."""

from __future__ import annotations

import re
from stages.core.errors import XmodalError
from pathlib import PurePosixPath

# No dots: a dot would split a WebDataset key, and '.'/'..' would walk the tree. Used with
# fullmatch: with match, '$' also matches before a trailing newline ("abc\n" passed).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class UnsafeNameError(XmodalError, ValueError):
    """A clip id, dataset or shard name that could escape the store or break a shard key."""


def check_name(value: object, what: str = "name") -> str:
    """Return `value` if it is a safe store name, else raise UnsafeNameError with a one-line reason."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or set(value) <= {"-", "_"}:
        raise UnsafeNameError(
            f"{what} {value!r} is not allowed: use 1-128 letters, digits, '_' or '-' "
            "(no '/', '.', spaces or other characters)"
        )
    return value


def is_safe_name(value: object) -> bool:
    try:
        check_name(value)
    except UnsafeNameError:
        return False
    return True


def check_relative_path(value: object, what: str = "path") -> str:
    """A media path given relative to its manifest or media folder: no absolute paths, no '..'."""
    if not isinstance(value, str) or not value.strip():
        raise UnsafeNameError(f"{what} {value!r} is empty")
    if "\\" in value or "\x00" in value or "://" in value:
        raise UnsafeNameError(f"{what} {value!r} is not allowed: use a relative POSIX path")
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", "") for part in value.split("/")):
        raise UnsafeNameError(f"{what} {value!r} could escape its folder: use a relative path without '..'")
    return value
