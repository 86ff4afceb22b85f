"""stages.core.ids: which names may become file names in the store, which media paths may be opened."""

import pytest

from stages.core.ids import UnsafeNameError, check_name, check_relative_path, is_safe_name

SAFE_NAMES = [
    "a",
    "0",
    "clip_001",
    "A-b_c",
    "a-",
    "_a",
    "-0BIyqJj9ZU_000030",  # VGGSound ids may start with '-'
    "s000001-0a1b2c3d4e",  # shard store names
    "x" * 128,
]

UNSAFE_NAMES = [
    ("", "empty"),
    ("x" * 129, "too long"),
    ("..", "parent folder"),
    (".", "current folder"),
    ("../evil", "escapes the folder"),
    ("a/b", "slash"),
    ("x.y", "dot splits a WebDataset key"),
    ("a b", "space"),
    ("a\\b", "backslash"),
    ("a\x00b", "NUL"),
    ("abc\n", "trailing newline ('$' of re.match matches before it)"),
    ("\nabc", "leading newline"),
    ("a\tb", "tab"),
    ("a:b", "colon"),
    ("a*", "glob"),
    ("café", "non-ASCII letter"),
    ("ａ", "full-width letter"),
    ("-", "only dashes"),
    ("__", "only underscores"),
    ("-_-", "only dashes and underscores"),
    (None, "not a string"),
    (5, "not a string"),
    (b"abc", "bytes"),
]


@pytest.mark.parametrize("name", SAFE_NAMES)
def test_check_name_accepts(name):
    assert check_name(name) == name
    assert is_safe_name(name)


@pytest.mark.parametrize("name,why", UNSAFE_NAMES, ids=[why for _, why in UNSAFE_NAMES])
def test_check_name_refuses(name, why):
    with pytest.raises(UnsafeNameError) as err:
        check_name(name, "clip id")
    assert not is_safe_name(name)
    message = str(err.value)
    assert message.startswith(f"clip id {name!r} is not allowed")
    assert "\n" not in message and len(message) < 300 + len(repr(name))


def test_unsafe_name_error_is_a_value_error():
    # Callers that only know ValueError (pydantic validators, argparse) still catch it.
    with pytest.raises(ValueError):
        check_name("../evil")


SAFE_PATHS = [
    "a.wav",
    "media/a.wav",
    "./media/a.wav",
    "media/./a.wav",
    "a..b.wav",  # two dots inside a name are not a parent folder
    "...",
    ".hidden.wav",
    "clips/with space.mp4",
    "-0BIyqJj9ZU_000030.mp4",
]

UNSAFE_PATHS = [
    ("", "empty"),
    ("   ", "blank"),
    (None, "missing"),
    (5, "not a string"),
    ("/abs/file.mp4", "absolute"),
    ("/", "root"),
    ("../../etc/passwd", "parent folders"),
    ("..", "parent folder"),
    ("media/../../x.wav", "parent folder in the middle"),
    ("media/..", "parent folder at the end"),
    ("./../x.wav", "parent folder after ./"),
    ("a//b.wav", "empty part"),
    ("media/", "trailing slash"),
    ("a\\b.wav", "backslash"),
    ("..\\evil.wav", "windows parent folder"),
    ("C:\\evil.wav", "windows drive"),
    ("a\x00b.wav", "NUL"),
    ("s3://bucket/x.wav", "URL"),
    ("file:///etc/passwd", "file URL"),
    ("http://host/x.wav", "http URL"),
]


@pytest.mark.parametrize("path", SAFE_PATHS)
def test_check_relative_path_accepts(path):
    assert check_relative_path(path) == path


@pytest.mark.parametrize("path,why", UNSAFE_PATHS, ids=[why for _, why in UNSAFE_PATHS])
def test_check_relative_path_refuses(path, why):
    with pytest.raises(UnsafeNameError) as err:
        check_relative_path(path, "media path")
    message = str(err.value)
    assert message.startswith(f"media path {path!r} ")
    assert "\n" not in message


@pytest.mark.parametrize("path", ["../../etc/passwd", "/abs/file.mp4", "media/../../x.wav"])
def test_escaping_paths_say_why(path):
    with pytest.raises(UnsafeNameError, match="escape.*relative"):
        check_relative_path(path, "media path")
