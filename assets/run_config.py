"""Every asset config of a run is checked when the run starts, before any step does work.

Pydantic checks types when Dagster launches a run, but the ranges and choices live in the stage
parameter types (``MelParams``, ``DiffgapTrainConfig``, ...), which an asset builds only when its
step runs: ``audio_images.size: 4`` used to fail after every mel shard was computed. Each asset
registers how its config becomes stage parameters (``dataset_asset`` does it for every asset
with a ``config`` parameter); the dataset lease resource runs all of them at run start and fails
with one line per bad asset.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from stages.core.errors import ConfigError

# asset name -> check(config dict) raising ConfigError / ValueError with a one-line reason
CONFIG_CHECKS: dict[str, Callable[[dict], None]] = {}
# Methods through which an asset Config becomes stage parameters (their __post_init__ validates).
_BUILDERS = ("train_config", "sample_config", "params")


def register_config_check(asset: str, check: Callable[[dict], None]) -> None:
    CONFIG_CHECKS[asset] = check


def config_type_of(fn: Callable) -> type | None:
    """The Config class of an asset function's ``config`` parameter, if it has one."""
    parameter = inspect.signature(fn).parameters.get("config")
    annotation = parameter.annotation if parameter is not None else None
    return annotation if isinstance(annotation, type) else None


def builds_stage_params(config_type: type, build: Callable[[Any], Any] | None = None) -> Callable[[dict], None]:
    """The check of one Config class: construct it, then build its stage parameters (``build``,
    else every builder method it has)."""

    def check(values: dict) -> None:
        config = config_type(**values)
        if build is not None:
            build(config)
            return
        for name in _BUILDERS:
            method = getattr(config, name, None)
            if callable(method):
                method()

    return check


def check_run_config(run_config: dict | None) -> list[str]:
    """One line per asset whose config in ``run_config`` would fail its step."""
    problems = []
    for asset, section in sorted(((run_config or {}).get("ops") or {}).items()):
        values = (section or {}).get("config") if isinstance(section, dict) else None
        check = CONFIG_CHECKS.get(asset)
        if check is None or values is None:
            continue
        try:
            check(dict(values))
        except (ConfigError, ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            problems.append(f"bad {asset} config: {_first_line(exc)}")
    return problems


def _first_line(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic: name the field and say what is wrong with it
        try:
            first = errors()[0]
            return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', '')}"
        except Exception:  # noqa: BLE001 - fall back to the text
            pass
    return " ".join(str(exc).split())[:300] or type(exc).__name__
