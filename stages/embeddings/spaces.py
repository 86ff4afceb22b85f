"""The conditioning spaces: one registry instead of tuple tables and "clap"/"cavp" literals.

A space is a contrastive embedding space shared by audio and one other modality. Its embedding
feature stores an "audio" array and one named after the other modality. DiffGAP bridges it
(condition <-> audio), the audio generator is conditioned in it, the CLI offers its name.

Adding a space (e.g. a joint video-audio space for CMMD / MM-LDM): one ``register_space(Space(...))``
with its head, embedding feature and towers; the families then loop over ``SPACES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.errors import ConfigError
from stages.core.refs import ref_type
from stages.embeddings.heads import (AUDIO_TOWER, CAVP_FEATURE, CAVP_HEAD, CLAP_FEATURE, CLAP_HEAD, FRAME_TOWER,
                                     TEXT_TOWER)


@dataclass(frozen=True)
class Space:
    name: str               # "clap": used in model names (diffgap_clap) and on the command line
    head: str               # the trained projection heads (an asset and a checkpoint name)
    embedding_feature: str  # the per-shard feature holding "audio" and `other` embeddings
    other: str              # the non-audio modality: its array name in the embedding feature
    letter: str             # its letter in direction names: "T" gives T->A and A->T
    task: str               # what generating audio from it is called: "T2A"
    towers: tuple[str, ...]  # the frozen tower features the head reads
    description: str = ""

    @property
    def directions(self) -> tuple[str, str]:
        return f"{self.letter}->A", f"A->{self.letter}"


SPACES: dict[str, Space] = {}


@ref_type
@dataclass(frozen=True)
class SkippedSpace:
    """What a space's assets pass on when the dataset cannot fill it (e.g. no clip has video), so
    the chain runs on the space that exists and the tables say why this one is absent."""

    dataset: str
    space: str
    reason: str  # "no clip has video"

    def row(self, columns: list[str]) -> dict:
        """One table row in place of this space's results: its directions, then why they are absent
        (in "method" and in the column after "direction", so any table shows it)."""
        row = {column: "" for column in columns}
        why = f"skipped: {self.reason}"
        return {**row, columns[1]: why, "method": why, "direction": " / ".join(get_space(self.space).directions)}


def register_space(space: Space) -> Space:
    SPACES[space.name] = space
    return space


def space_of_head(head: str) -> Space:
    return next(space for space in SPACES.values() if space.head == head)


def get_space(name: str) -> Space:
    if name not in SPACES:
        raise ConfigError(f"space {name!r} is unknown: choose one of {', '.join(SPACES)}")
    return SPACES[name]


CLAP = register_space(Space("clap", CLAP_HEAD, CLAP_FEATURE, "text", "T", "T2A", (AUDIO_TOWER, TEXT_TOWER),
                            "CLAP: audio <-> text (captions, else labels)"))
CAVP = register_space(Space("cavp", CAVP_HEAD, CAVP_FEATURE, "video", "V", "V2A", (AUDIO_TOWER, FRAME_TOWER),
                            "CAVP: audio <-> video frames, per second (Diff-Foley)"))
