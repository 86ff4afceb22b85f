"""Expected failures, one base: what a user can fix (bad config, unusable source, store problems).

Assets turn an ``XmodalError`` into a one-line Dagster ``Failure`` naming the fix; any other
exception is a bug and keeps its traceback. Raise the most specific subclass, with a message
that says what is wrong and what to change, on one line.
"""

from __future__ import annotations


class XmodalError(Exception):
    """Base of every expected failure; ``str(exc)`` is the one line the user sees."""


class ConfigError(XmodalError, ValueError):
    """A parameter or setting is invalid (a ValueError too, for callers that catch those)."""


class EnvironmentMismatchError(XmodalError, RuntimeError):
    """This machine's packages or weights differ from the ones a stored key was made with."""


class DatasetError(XmodalError):
    """A dataset is unknown, unregistered or busy beyond the wait allowed."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Every exception type that means "the user must fix something", including the model
    layer's (models/ cannot import stages/, so its errors are listed here, in one place)."""
    from models.towers import TowerWeightsError
    from models.vae import PretrainedVaeError
    from models.vocoder import VocoderWeightsError

    return (XmodalError, TowerWeightsError, PretrainedVaeError, VocoderWeightsError)
