"""Duplicates in a dataset: byte-identical media under different ids, and texts shared by clips.

Kept as distinct pairs, they make retrieval "misses" that are not: a query whose caption is shared
by ten clips cannot tell them apart. Retrieval reports them and a duplicate-aware R@k beside the
standard one (``relevance``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def clip_texts(clip) -> tuple[str, ...]:
    """Every text of a clip, whitespace-normalised: all its captions (AudioCaps and Clotho have
    five), else its caption, else its label (what the text tower embeds)."""
    captions = tuple(getattr(clip, "captions", ()) or ()) or ((clip.caption,) if clip.caption else ())
    texts = captions or ((clip.label,) if clip.label else ())
    return tuple(t for t in (" ".join(str(text).split()) for text in texts) if t)


@dataclass(frozen=True)
class Duplicates:
    media: list[list[str]] = field(default_factory=list)  # groups (>= 2 ids) sharing a content hash
    texts: dict[str, int] = field(default_factory=dict)   # text -> clips that have it (>= 2)

    def summary(self) -> str:
        clips = sum(len(group) for group in self.media)
        shared = sum(self.texts.values())
        return (f"{len(self.media)} byte-identical media groups ({clips} clips); "
                f"{len(self.texts)} captions shared by {shared} clips")

    def markdown(self, shown: int = 10) -> str:
        lines = ["| duplicate | clips |", "| --- | --- |"]
        for group in self.media[:shown]:
            lines.append(f"| same media | {', '.join(group)} |")
        for text, count in sorted(self.texts.items(), key=lambda item: -item[1])[:shown]:
            lines.append(f"| caption \"{text.replace('|', '/')}\" | {count} |")
        return "\n".join(lines) if len(lines) > 2 else "No duplicate media or shared caption."


def find_duplicates(clips, metadata: dict | None = None) -> Duplicates:
    """Byte-identical media (same content hash, different ids) and texts shared by several clips.
    A clip manifest's ``metadata["duplicate_media"]`` wins; shared texts are always counted here:
    the manifest lists only its most used captions, and labels stand in for missing captions."""
    metadata = metadata or {}
    media = metadata.get("duplicate_media")
    if media is None:
        groups: dict[str, list[str]] = {}
        for clip in clips:
            groups.setdefault(clip.content_hash, []).append(clip.id)
        media = [sorted(ids) for ids in groups.values() if len(ids) > 1]
    counts = Counter(text for clip in clips for text in set(clip_texts(clip)))
    texts = {text: n for text, n in counts.items() if n > 1}
    return Duplicates(sorted(sorted(group) for group in media), dict(texts))


def relevance(query_owner, gallery_owner, content_hashes, query_texts=None, gallery_texts=None) -> tuple[np.ndarray, np.ndarray]:
    """(paired, duplicate-aware) [Q, G] relevance. Owners index the clips (``content_hashes``).
    Paired: the same clip. Duplicate-aware also: byte-identical media, and when both sides have
    texts (a tuple per row: a caption row its caption, an audio row all its clip's captions), any
    text in common."""
    query_owner, gallery_owner = np.asarray(query_owner), np.asarray(gallery_owner)
    hashes = np.asarray(content_hashes)
    paired = query_owner[:, None] == gallery_owner[None, :]
    aware = paired | (hashes[query_owner][:, None] == hashes[gallery_owner][None, :])
    if query_texts is not None and gallery_texts is not None:
        vocabulary = {text: i for i, text in enumerate(sorted({t for row in (*query_texts, *gallery_texts) for t in row}))}

        def has(rows) -> np.ndarray:  # [rows, vocabulary] 0/1
            out = np.zeros((len(rows), len(vocabulary)), np.float32)
            for i, texts in enumerate(rows):
                out[i, [vocabulary[t] for t in texts]] = 1
            return out

        aware |= (has(query_texts) @ has(gallery_texts).T) > 0
    return paired, aware
