"""Names that become file names in the feature store must not be able to escape it."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import PurePosixPath

from stages.core.errors import XmodalError

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


def safe_id(value: str) -> str:
    """``value`` itself when it is a safe name (existing caches keep their ids), else a slug of it
    plus a short hash of the original, stable across runs: ``café`` -> ``cafe-1a2b3c4d``.

    A name that is not valid UTF-8 (a POSIX file name read with surrogateescape) hashes by its bytes.
    """
    if is_safe_name(value):
        return value
    raw = value.encode("utf-8", "surrogateescape")
    ascii_text = unicodedata.normalize("NFKD", value.encode("utf-8", "replace").decode("utf-8", "replace"))
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", ascii_text.encode("ascii", "ignore").decode()).strip("_-")[:100]
    digest = hashlib.blake2b(raw, digest_size=4).hexdigest()
    return f"{slug}-{digest}" if slug else f"clip-{digest}"


def printable_name(value: str) -> str:
    """A name as a manifest can hold it: undecodable bytes as U+FFFD, control characters escaped."""
    text = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
