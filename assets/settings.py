"""Project-local defaults; each can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    return Path(os.environ.get("XMODAL_DATA_DIR", PROJECT_DIR / ".data"))


def default_store_root() -> str:
    return os.environ.get("XMODAL_STORE_ROOT", str(data_dir() / "features"))


def default_demo_dir() -> str:
    return str(data_dir() / "demo")
