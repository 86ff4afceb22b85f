"""Small PNG previews of mels and audio images (for the Dagster UI and for people)."""

from __future__ import annotations

import io

import numpy as np

# Anchor colours of a viridis-like map; a mel reads better in colour than in grey.
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def colorize(plane: np.ndarray) -> np.ndarray:
    """2-D float array -> uint8 RGB, scaled to its own 1st..99th percentile."""
    lo, hi = np.percentile(plane, [1, 99]) if plane.size else (0.0, 1.0)
    unit = np.clip((plane - lo) / max(hi - lo, 1e-6), 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(unit).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (unit - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def preview_png(mels: np.ndarray | None = None, images: np.ndarray | None = None, height: int = 96) -> bytes:
    """One row per clip: the mel (low frequencies at the bottom) and/or its audio image."""
    from PIL import Image

    count = len(mels) if mels is not None else len(images)
    rows = []
    for i in range(count):
        tiles = []
        if mels is not None:
            mel = colorize(np.asarray(mels[i], np.float32)[::-1])
            width = max(1, round(mel.shape[1] * height / mel.shape[0]))
            tiles.append(np.asarray(Image.fromarray(mel).resize((width, height), Image.Resampling.BILINEAR)))
        if images is not None:
            tiles.append(np.asarray(Image.fromarray(np.asarray(images[i])).resize((height, height), Image.Resampling.NEAREST)))
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    buffer = io.BytesIO()
    Image.fromarray(canvas).save(buffer, format="PNG")
    return buffer.getvalue()
