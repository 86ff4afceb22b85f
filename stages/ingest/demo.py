"""Built-in deterministic demo dataset: short mp4 clips (H.264 + AAC) with captions and labels.

Each class pairs a simple visual object and event (a red circle that bounces, a blue square
that flashes, ...) with a class-specific sound whose onsets coincide with the visual events.
The pairing is learnable across modalities but not trivial: shapes, colours, event types and
sounds are each shared or confusable between classes, and every clip adds jitter, background
noise and sometimes distractors.

    from stages.ingest.demo import DemoSpec, generate_demo
    jsonl = generate_demo("data/demo", DemoSpec(n_clips=300))

Clip i depends only on (seed, i), so a larger ``n_clips`` appends clips and never reshuffles.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# Bump when the generated content changes: a stored dataset with another version is rebuilt.
GENERATOR_VERSION = 2
SPEC_FILE = "demo_spec.json"
INDEX_FILE = "clips.jsonl"
MEDIA_DIR = "media"


@dataclass(frozen=True)
class DemoSpec:
    """What to generate; stored as demo_spec.json so a matching dataset is reused."""

    n_clips: int = 300
    seed: int = 0
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    sample_rate: int = 22050
    fps: int = 8
    size: int = 64  # frames are size x size RGB
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass(frozen=True)
class _ClassDef:
    name: str
    shape: str
    colour: str
    event: str
    sound: str


# Shapes, colours, events and sounds each recur across classes (e.g. two circles, two bounces),
# so no single modality cue identifies a class on its own.
_CLASS_DEFS: tuple[_ClassDef, ...] = (
    _ClassDef("bouncing_ball_tone", "circle", "red", "bounce", "tone"),
    _ClassDef("flashing_square_clicks", "square", "blue", "flash", "clicks"),
    _ClassDef("sliding_bar_noise", "bar", "green", "slide", "noise"),
    _ClassDef("pulsing_ring_tremolo", "ring", "yellow", "pulse", "tremolo"),
    _ClassDef("appearing_triangle_rising_chirp", "triangle", "magenta", "appear", "chirp_up"),
    _ClassDef("dropping_diamond_falling_chirp", "diamond", "cyan", "drop", "chirp_down"),
    _ClassDef("shaking_cross_warble", "cross", "orange", "shake", "warble"),
    _ClassDef("flashing_circle_organ", "circle", "white", "flash", "organ"),
    _ClassDef("bouncing_square_knock", "square", "brown", "bounce", "knock"),
    _ClassDef("pulsing_triangle_buzz", "triangle", "purple", "pulse", "buzz"),
    _ClassDef("sliding_ring_hiss", "ring", "teal", "slide", "hiss"),
    _ClassDef("appearing_bar_chime", "bar", "pink", "appear", "chime"),
)
CLASSES: tuple[str, ...] = tuple(c.name for c in _CLASS_DEFS)

_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "blue": (50, 90, 235), "green": (40, 190, 60),
    "yellow": (235, 215, 40), "magenta": (220, 50, 200), "cyan": (40, 210, 220),
    "orange": (245, 140, 30), "white": (235, 235, 235), "brown": (150, 90, 40),
    "purple": (130, 60, 200), "teal": (20, 140, 130), "pink": (250, 140, 180),
}
_SHAPES = ("circle", "square", "bar", "ring", "triangle", "diamond", "cross")

# event -> (verb 3rd person, base verb, noun)
_EVENT_WORDS = {
    "bounce": ("bounces", "bounce", "bounce"), "flash": ("flashes", "flash", "flash"),
    "slide": ("slides", "slide", "slide"), "pulse": ("pulses", "pulse", "pulse"),
    "appear": ("appears", "appear", "appearance"), "drop": ("drops", "drop", "drop"),
    "shake": ("shakes", "shake", "shake"),
}
# sound -> (singular, plural, verb, (low adjective, high adjective), frequency range in Hz)
_SOUNDS = {
    "tone": ("tone", "tones", "beeps", ("low", "high"), (450.0, 1100.0)),
    "clicks": ("click", "clicks", "ticks", ("slow", "rapid"), (30.0, 60.0)),  # clicks per second
    "noise": ("noise burst", "noise bursts", "rumbles", ("dull", "bright"), (600.0, 2500.0)),
    "tremolo": ("tremolo tone", "tremolo tones", "flutters", ("low", "high"), (350.0, 900.0)),
    "chirp_up": ("rising chirp", "rising chirps", "sweeps up", ("low", "high"), (300.0, 800.0)),
    "chirp_down": ("falling chirp", "falling chirps", "sweeps down", ("low", "high"), (300.0, 800.0)),
    "warble": ("warble", "warbles", "wavers", ("low", "high"), (500.0, 1200.0)),
    "organ": ("organ note", "organ notes", "hums", ("low", "high"), (180.0, 400.0)),
    "knock": ("knock", "knocks", "thuds", ("deep", "hollow"), (90.0, 220.0)),
    "buzz": ("buzz", "buzzes", "drones", ("low", "high"), (120.0, 320.0)),
    "hiss": ("hiss", "hisses", "sounds", ("soft", "sharp"), (3000.0, 7000.0)),
    "chime": ("chime", "chimes", "rings", ("mellow", "bright"), (500.0, 1000.0)),
}
_CARDINAL = {1: "one", 2: "two", 3: "three", 4: "four"}
_ADVERB = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
_N_TEMPLATES = 5


def write_mp4(path, frames: np.ndarray | None, fps: int, audio: np.ndarray | None,
              sample_rate: int) -> None:
    """Write an mp4: frames uint8 [T,H,W,3] as H.264 yuv420p (None = no video stream),
    audio float32 mono [N] in [-1, 1] as AAC (None = no audio stream)."""
    import av  # here, not at the top: a run whose demo is complete never encodes (nor imports PyAV)

    if frames is None and audio is None:
        raise ValueError("write_mp4 needs frames or audio")
    if frames is not None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
            raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"yuv420p needs even width/height, got {frames.shape[2]}x{frames.shape[1]}")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or len(audio) == 0:
            raise ValueError(f"audio must be mono [N], got shape {audio.shape}")
        audio = np.ascontiguousarray(np.clip(audio, -1.0, 1.0))

    with av.open(str(path), "w", format="mp4") as container:
        vstream = astream = None
        if frames is not None:
            vstream = container.add_stream("libx264", rate=fps)
            vstream.width, vstream.height = frames.shape[2], frames.shape[1]
            vstream.pix_fmt = "yuv420p"
            # mbtree off: x264's AVX-512 macroblock-tree code reads uninitialised memory, so with
            # it the same frames sometimes encode (and decode) differently; measured here.
            vstream.options = {"crf": "20", "preset": "veryfast", "x264-params": "mbtree=0"}
            # Tiny frames: threads cost more than they save, and one thread is reproducible.
            vstream.codec_context.thread_count = 1
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="mono")
            astream.bit_rate = 64000
        if vstream is not None:
            for i, img in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                vf.pts = i  # stream time base is 1/fps
                container.mux(vstream.encode(vf))
            container.mux(vstream.encode(None))
        if astream is not None:
            # One frame with pts in samples; PyAV re-chunks it to AAC's 1024-sample frames and
            # the muxer's edit list hides the encoder priming, so decoding returns ~N samples.
            af = av.AudioFrame.from_ndarray(audio[None], format="fltp", layout="mono")
            af.sample_rate = sample_rate
            af.time_base = Fraction(1, sample_rate)
            af.pts = 0
            container.mux(astream.encode(af))
            container.mux(astream.encode(None))


# ---------------------------------------------------------------- per-clip parameters


@dataclass(frozen=True)
class DemoClip:
    """One rendered clip: frames uint8 [T,S,S,3], audio float32 [N], and its metadata."""

    id: str
    label: str
    split: str
    caption: str
    seconds: float
    event_times: tuple[float, ...]  # sound onsets in seconds
    event_frames: tuple[int, ...]  # first video frame showing each event
    frames: np.ndarray
    audio: np.ndarray


# Square sizes whose H.264 frames decord 0.6.0 fails to read ("from_size == to_size" check),
# measured for every even size from 16 to 160; the pipeline reads frames with decord.
_DECORD_BAD_SIZES = frozenset({16, 24, 48, 72})


def _check_spec(spec: DemoSpec) -> None:
    if spec.n_clips < 0:
        raise ValueError(f"DemoSpec.n_clips must be >= 0, got {spec.n_clips}")
    if spec.size % 2 or spec.size < 16:
        raise ValueError(f"DemoSpec.size must be even and >= 16 (H.264 yuv420p), got {spec.size}")
    if spec.size in _DECORD_BAD_SIZES:
        raise ValueError(f"DemoSpec.size {spec.size} gives frames decord 0.6 cannot read; pick another (e.g. 64)")
    if spec.fps < 2 or spec.sample_rate < 8000:
        raise ValueError(f"DemoSpec needs fps >= 2 and sample_rate >= 8000, got {spec.fps}, {spec.sample_rate}")
    if not 0 < spec.min_seconds <= spec.max_seconds:
        raise ValueError(f"DemoSpec needs 0 < min_seconds <= max_seconds, got {spec.min_seconds}, {spec.max_seconds}")
    lead, _, tail = _frame_margins(spec.fps)
    if round(spec.min_seconds * spec.fps) < lead + tail + 1:
        raise ValueError(f"DemoSpec.min_seconds too short: need >= {(lead + tail + 1) / spec.fps:.3f} s at {spec.fps} fps")
    if spec.val_fraction < 0 or spec.test_fraction < 0 or spec.val_fraction + spec.test_fraction >= 1:
        raise ValueError("DemoSpec val_fraction and test_fraction must be >= 0 and sum to < 1")


def _frame_margins(fps: int) -> tuple[int, int, int]:
    """(first event frame, min gap between events, frames kept after the last event), in frames."""
    # The gap keeps events separable by eye and ear; the lead leaves quiet, still frames before
    # the first onset so it can be measured; the tail leaves room for the event to be seen.
    return max(2, round(0.25 * fps)), max(3, round(0.4 * fps)), max(3, round(0.4 * fps))


def _clip_rng(seed: int, index: int) -> np.random.Generator:
    # spawn_key=(0, i) is the i-th child of the seed no matter how many clips are asked for.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, index)))


def _class_of(seed: int, index: int) -> int:
    # Each block of len(CLASSES) clips holds every class once, in a seeded order: balanced
    # classes in any prefix, and still stable when n_clips grows.
    block, pos = divmod(index, len(CLASSES))
    perm = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, block))).permutation(len(CLASSES))
    return int(perm[pos])


_PHI = (math.sqrt(5) - 1) / 2


def _split_of(spec: DemoSpec, index: int, cls: int) -> str:
    # The k-th clip of a class (k = block) takes the k-th point of a golden-ratio sequence with a
    # seeded per-class offset: splits stay stratified by class and prefix-stable.
    offset = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(2, cls))).random()
    u = (offset + (index // len(CLASSES)) * _PHI) % 1.0
    if u < spec.test_fraction:
        return "test"
    if u < spec.test_fraction + spec.val_fraction:
        return "val"
    return "train"


def _params(spec: DemoSpec, index: int) -> dict:
    """Draw every random choice of clip `index` up front, so clean and noisy renders agree."""
    rng = _clip_rng(spec.seed, index)
    cls = _class_of(spec.seed, index)
    cdef = _CLASS_DEFS[cls]
    fps, S = spec.fps, spec.size
    n_frames = max(1, round(rng.uniform(spec.min_seconds, spec.max_seconds) * fps))
    lead, gap, tail = _frame_margins(fps)
    span = n_frames - tail - lead  # usable event frames: lead .. n_frames - tail - 1
    capacity = 1 + (span - 1) // gap
    n_ev = int(min(rng.integers(1, 5), capacity))
    # Choose sorted slots in a shrunken range, then spread them by the gap: uniform over all
    # placements that respect the minimum spacing.
    slots = np.sort(rng.choice(span - (n_ev - 1) * (gap - 1), size=n_ev, replace=False))
    ev_frames = slots + np.arange(n_ev) * (gap - 1) + lead
    # Sound onsets fall inside the first 40% of the event frame's period (within one frame).
    ev_times = (ev_frames + rng.uniform(0.0, 0.4, n_ev)) / fps

    lo, hi = _SOUNDS[cdef.sound][4]
    pitch_u = rng.random()
    base_rgb = np.array(_COLOURS[cdef.colour], float)
    p = dict(
        index=index, cls=cls, n_frames=n_frames, ev_frames=ev_frames, ev_times=ev_times,
        # Log-uniform pitch within the class's range; the caption's adjective follows it.
        freq=lo * (hi / lo) ** pitch_u, pitch_u=pitch_u,
        ev_gain=rng.uniform(0.75, 1.0, n_ev),
        snd_seed=int(rng.integers(2**31)),
        peak=rng.uniform(0.55, 0.9),
        snr_db=rng.uniform(8.0, 35.0), brown_noise=bool(rng.random() < 0.4),
        hum=bool(rng.random() < 0.3), hum_freq=rng.uniform(60.0, 400.0), hum_gain=rng.uniform(0.05, 0.15),
        radius=S * rng.uniform(0.11, 0.17),
        pos=rng.uniform(0.0, 1.0, 2), direction=1 if rng.random() < 0.5 else -1,
        colour=np.clip(base_rgb * rng.uniform(0.8, 1.1, 3) + rng.normal(0, 10, 3), 0, 255),
        bg=rng.uniform(0, 80, 3), bg_static=rng.uniform(2, 6), bg_temporal=rng.uniform(0.5, 2.0),
        bg_seed=int(rng.integers(2**31)),
        distractor=bool(rng.random() < 0.4),
        d_shape=str(rng.choice([s for s in _SHAPES if s != cdef.shape])),
        d_colour=str(rng.choice([c for c in _COLOURS if c != cdef.colour])),
        d_radius=S * rng.uniform(0.08, 0.12), d_start=rng.uniform(0.15, 0.85, 2),
        d_vel=rng.normal(0, 1, 2),
        template=int(rng.integers(_N_TEMPLATES)), mention_distractor=bool(rng.random() < 0.5),
    )
    return p


# ---------------------------------------------------------------- video


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Anti-aliased mask in [0, 1]; each shape is written as f(dx, dy) <= r."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        f = np.hypot(dx, dy)
    elif shape == "square":
        f = np.maximum(ax, ay) * 1.1
    elif shape == "diamond":
        f = (ax + ay) * 0.8
    elif shape == "bar":
        f = np.maximum(ax / 0.35, ay)
    elif shape == "ring":
        d = np.hypot(dx, dy)
        f = np.maximum(d, 1.55 * r - d)  # inside when 0.55 r <= d <= r
    elif shape == "triangle":
        f = np.maximum(dy, 2 * ax - dy)  # apex up, base at dy = r
    elif shape == "cross":
        f = np.minimum(np.maximum(ax / 0.3, ay), np.maximum(ay / 0.3, ax))
    else:
        raise ValueError(shape)
    return np.clip(r + 0.5 - f, 0.0, 1.0)


def _render_frames(spec: DemoSpec, p: dict, clean: bool) -> np.ndarray:
    cdef = _CLASS_DEFS[p["cls"]]
    S, T, fps = spec.size, p["n_frames"], spec.fps
    t = np.arange(T, dtype=float)
    # delta[t, k] = frames since event k; the event frame itself (delta 0) already shows the change.
    delta = t[:, None] - p["ev_frames"][None, :].astype(float)
    after = delta >= 0
    decay = lambda tau: np.where(after, np.exp(-np.maximum(delta, 0) / tau), 0.0)  # noqa: E731

    r0 = p["radius"]
    r = np.full(T, r0)
    colour = np.tile(p["colour"], (T, 1))
    alpha = np.ones(T)
    dx = np.zeros(T)
    dy = np.zeros(T)
    # Leave room for the motion of each event type when placing the object.
    ev = cdef.event
    left = {"shake": 0.08 * S, "slide": 0.28 * S if p["direction"] < 0 else 0.0}.get(ev, 0.0)
    right = {"shake": 0.08 * S, "slide": 0.28 * S if p["direction"] > 0 else 0.0}.get(ev, 0.0)
    margin_y = {"bounce": 0.25 * S, "drop": 0.1 * S * len(p["ev_frames"])}.get(ev, 0.0)
    r_max = r0 * (1.7 if ev == "pulse" else 1.0)
    lo_x, hi_x = r_max + 1 + left, S - r_max - 1 - right
    lo_y, hi_y = r_max + 1 + margin_y, S - r_max - 1
    cx0 = lo_x + p["pos"][0] * max(hi_x - lo_x, 0.0)
    cy0 = lo_y + p["pos"][1] * max(hi_y - lo_y, 0.0)

    if ev == "bounce":
        # A hop of 4 frames starting at the event, shifted one frame so frame 0 is already airborne.
        u = np.clip((delta + 1) / 4.0, 0.0, 1.0)
        dy = -(0.25 * S) * np.where(after, 4 * u * (1 - u), 0.0).sum(1)
    elif ev == "flash":
        k = decay(1.2).max(1)
        colour = colour * 0.5 + (255.0 - colour * 0.5) * k[:, None]
    elif ev == "pulse":
        r = r0 * (1 + 0.7 * decay(1.5).max(1))
    elif ev == "appear":
        _, gap, _ = _frame_margins(fps)
        on = min(3, gap - 1)
        # Fully visible for `on` frames, then fades, so the appearance is the sharpest change.
        vis = np.where(after, np.clip(1 - (delta - on + 1) / 3.0, 0.0, 1.0), 0.0)
        alpha = vis.max(1)
    elif ev in ("slide", "drop"):
        # Quick two-frame move (60% on the event frame); slides toggle, drops step down.
        step = np.where(after, np.clip((delta + 1) * 0.6, 0.0, 1.0), 0.0)
        if ev == "slide":
            sign = np.where(np.arange(len(p["ev_frames"])) % 2 == 0, 1.0, -1.0)
            dx = p["direction"] * 0.28 * S * (step * sign).sum(1)
        else:
            dy = 0.1 * S * step.sum(1) - margin_y
    elif ev == "shake":
        wobble = np.where(after & (delta < 5), (-1.0) ** np.maximum(delta, 0), 0.0) * decay(2.0)
        dx = 0.08 * S * wobble.sum(1)

    yy, xx = np.mgrid[0:S, 0:S].astype(float)
    cx, cy = cx0 + dx, cy0 + dy
    m = _shape_mask(cdef.shape, xx[None] - cx[:, None, None], yy[None] - cy[:, None, None], r[:, None, None])
    m = (m * alpha[:, None, None]).astype(np.float32)[..., None]  # float32: half the memory traffic

    bg_rng = np.random.default_rng(p["bg_seed"])
    img = np.broadcast_to(p["bg"], (T, S, S, 3)).astype(np.float32)
    if not clean:
        img = img + p["bg_static"] * bg_rng.standard_normal((1, S, S, 3), dtype=np.float32)
        img = img + p["bg_temporal"] * bg_rng.standard_normal((T, S, S, 3), dtype=np.float32)
        if p["distractor"]:
            # A dimmer second shape drifting slowly (about S/8 per second), with no events.
            pos = p["d_start"][None, :] * S + (t / fps)[:, None] * p["d_vel"][None, :] * S / 8
            pos = np.clip(pos, p["d_radius"] + 1, S - p["d_radius"] - 1)
            dm = _shape_mask(p["d_shape"], xx[None] - pos[:, 0, None, None], yy[None] - pos[:, 1, None, None],
                             np.float64(p["d_radius"])).astype(np.float32)[..., None]
            dcol = np.array(_COLOURS[p["d_colour"]], np.float32) * 0.6
            img = img * (1 - dm) + dcol * dm
    img = img * (1 - m) + colour[:, None, None, :].astype(np.float32) * m
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- audio


def _lowpass(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average via cumulative sums: a cheap low-pass."""
    width = max(1, int(width))
    c = np.cumsum(np.concatenate([np.zeros(width), x]))
    return (c[width:] - c[:-width]) / width


def _event_sound(kind: str, f: float, pitch_u: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One event's sound, starting at its onset, with peak about 1."""
    def t_of(seconds):
        return np.arange(int(seconds * sr)) / sr

    tau = 2 * np.pi
    if kind == "tone":
        t = t_of(0.3)
        y = np.sin(tau * f * t) * np.exp(-t / 0.12)
    elif kind == "clicks":
        t = t_of(0.25)
        y = np.zeros_like(t)
        n_click = 6
        for k in range(n_click):  # f = clicks per second
            start = int(k * sr / f)
            seg = t[: len(t) - start][: int(0.006 * sr)]
            y[start: start + len(seg)] += rng.uniform(-1, 1, len(seg)) * np.exp(-seg / 0.0015) * (1 - 0.08 * k)
    elif kind == "noise":
        t = t_of(0.3)
        y = _lowpass(rng.normal(0, 1, len(t)), sr / f) * np.exp(-t / 0.12)
    elif kind == "tremolo":
        t = t_of(0.35)
        fm = 16 + 14 * pitch_u
        y = np.sin(tau * f * t) * (0.6 + 0.4 * np.cos(tau * fm * t))
    elif kind in ("chirp_up", "chirp_down"):
        dur = 0.25
        t = t_of(dur)
        f0, f1 = (f, 2.5 * f) if kind == "chirp_up" else (2.5 * f, f)
        y = np.sin(tau * (f0 * t + (f1 - f0) * t**2 / (2 * dur)))
    elif kind == "warble":
        t = t_of(0.35)
        # Instantaneous frequency f + 0.15 f sin(2 pi 9 t): a 9 Hz vibrato.
        y = np.sin(tau * f * t - (0.15 * f / 9.0) * np.cos(tau * 9.0 * t))
    elif kind == "organ":
        t = t_of(0.35)
        hs = [h for h in range(1, 7) if h * f < sr / 2.2]
        y = sum(np.sin(tau * h * f * t) / h for h in hs) * np.exp(-t / 0.25)
    elif kind == "knock":
        t = t_of(0.2)
        y = np.sin(tau * f * t) * np.exp(-t / 0.04)
        n = int(0.005 * sr)
        y[:n] += 0.5 * rng.uniform(-1, 1, n)
    elif kind == "buzz":
        t = t_of(0.22)
        hs = [h for h in range(1, 16, 2) if h * f < sr / 2.2]
        y = sum(np.sin(tau * h * f * t) / h for h in hs)
    elif kind == "hiss":
        t = t_of(0.25)
        w = rng.normal(0, 1, len(t))
        y = (w - _lowpass(w, sr / f)) * np.exp(-t / 0.1)
    elif kind == "chime":
        t = t_of(0.6)
        parts = ((1.0, 1.0, 0.35), (2.76, 0.6, 0.2), (5.4, 0.4, 0.12), (8.93, 0.25, 0.08))
        y = sum(a * np.sin(tau * m * f * t) * np.exp(-t / d) for m, a, d in parts if m * f < sr / 2.2)
    else:
        raise ValueError(kind)
    # A 2 ms attack avoids a click artefact but keeps the onset sharp; a short release avoids
    # a cut-off click at the end.
    env = np.minimum(1.0, np.arange(len(t)) / (0.002 * sr))
    env *= np.minimum(1.0, (len(t) - np.arange(len(t))) / (0.02 * sr))
    y = y * env
    return y / (np.abs(y).max() + 1e-9)


def _render_audio(spec: DemoSpec, p: dict, clean: bool) -> np.ndarray:
    from scipy.signal import lfilter

    cdef = _CLASS_DEFS[p["cls"]]
    sr = spec.sample_rate
    n = round(p["n_frames"] / spec.fps * sr)
    rng = np.random.default_rng(p["snd_seed"])
    y = np.zeros(n)
    for t0, g in zip(p["ev_times"], p["ev_gain"]):
        s = _event_sound(cdef.sound, p["freq"], p["pitch_u"], sr, rng) * g
        i0 = round(t0 * sr)
        seg = s[: max(0, n - i0)]
        y[i0: i0 + len(seg)] += seg
    # Noise draws happen even for clean renders so the rng stream (and the events) stay the same.
    noise = rng.normal(0, 1, n)
    if p["brown_noise"]:
        # Leaky integration (one-pole low-pass): a smooth red-noise spectrum, unlike a moving
        # average whose notches would leave tell-tale stripes.
        noise = lfilter([1.0], [1.0, -0.98], noise)
    hum_phase = rng.uniform(0, 2 * np.pi)
    if not clean:
        t = np.arange(n) / sr
        if p["hum"]:
            # A quiet steady hum with a slow fade-in: present but without onsets of its own.
            hum = sum(np.sin(2 * np.pi * h * p["hum_freq"] * t + hum_phase) / h for h in (1, 2, 3))
            y = y + p["hum_gain"] * hum / 1.8 * np.minimum(1.0, t / 0.5)
        sig_power = np.mean(y**2) + 1e-12
        noise *= np.sqrt(sig_power / (np.mean(noise**2) + 1e-12) / 10 ** (p["snr_db"] / 10))
        y = y + noise
    return (y * (p["peak"] / (np.abs(y).max() + 1e-9))).astype(np.float32)


# ---------------------------------------------------------------- captions


def _bg_name(rgb: np.ndarray) -> str:
    if rgb.max() - rgb.min() < 25:
        return "black" if rgb.mean() < 30 else "grey"
    return "dark " + ("red", "green", "blue")[int(np.argmax(rgb))]


def _timing(times: np.ndarray, seconds: float) -> str:
    if len(times) > 1:
        return "in quick succession" if times[-1] - times[0] < 0.4 * seconds else "throughout the clip"
    return ("near the start", "in the middle", "near the end")[min(2, int(times[0] / seconds * 3))]


def _caption(spec: DemoSpec, p: dict) -> str:
    cdef = _CLASS_DEFS[p["cls"]]
    n = len(p["ev_frames"])
    ev3, evb, evn = _EVENT_WORDS[cdef.event]
    sing, plur, sverb, adjs, _ = _SOUNDS[cdef.sound]
    adj = adjs[int(p["pitch_u"] >= 0.5)]
    obj = f"{cdef.colour} {cdef.shape}"
    snds = f"{adj} {sing if n == 1 else plur}"
    card, adv = _CARDINAL[n], _ADVERB[n]
    timing = _timing(p["ev_times"], p["n_frames"] / spec.fps)
    k = p["template"]
    a_obj = ("an " if obj[0] in "aeiou" else "a ") + obj
    if k == 0:
        c = f"{a_obj} {ev3} {adv} while a {adj} {sing} {sverb}"
    elif k == 1:
        c = f"{card} {snds} as {a_obj} {ev3} {timing}"
    elif k == 2:
        c = f"{timing}, {a_obj} {ev3} {adv} in sync with a {adj} {sing}"
    elif k == 3:
        c = f"you hear {card} {snds} and see {a_obj} {evb} {adv}"
    else:
        each = "the" if n == 1 else "each"
        c = f"{a_obj} on a {_bg_name(p['bg'])} background {ev3} {adv}; {each} {evn} comes with a {adj} {sing}"
    if p["distractor"] and p["mention_distractor"]:
        d_obj = f"{p['d_colour']} {p['d_shape']}"
        c += f", while {'an' if d_obj[0] in 'aeiou' else 'a'} {d_obj} drifts slowly"
    return c[0].upper() + c[1:]


# ---------------------------------------------------------------- clips and dataset


def _record(spec: DemoSpec, p: dict) -> dict:
    cid = f"demo_{p['index']:06d}"
    return {
        "id": cid,
        "path": f"{MEDIA_DIR}/{cid}.mp4",
        "caption": _caption(spec, p),
        "label": CLASSES[p["cls"]],
        "split": _split_of(spec, p["index"], p["cls"]),
        "seconds": p["n_frames"] / spec.fps,
        "event_times": [round(float(x), 4) for x in p["ev_times"]],
    }


def make_clip(spec: DemoSpec, index: int, clean: bool = False) -> DemoClip:
    """Render clip `index` of `spec` in memory. clean=True drops background noise, the hum and
    the distractor object but keeps everything else (same events, caption and label)."""
    _check_spec(spec)
    p = _params(spec, index)
    rec = _record(spec, p)
    return DemoClip(
        id=rec["id"], label=rec["label"], split=rec["split"], caption=rec["caption"],
        seconds=rec["seconds"], event_times=tuple(rec["event_times"]),
        event_frames=tuple(int(x) for x in p["ev_frames"]),
        frames=_render_frames(spec, p, clean), audio=_render_audio(spec, p, clean),
    )


def _marker(spec: DemoSpec) -> dict:
    return {"generator": "stages.demo", "version": GENERATOR_VERSION, "spec": dataclasses.asdict(spec)}


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(out_dir: Path, spec: DemoSpec) -> bool:
    return _read_marker(out_dir) == _marker(spec) and (out_dir / INDEX_FILE).is_file()


def _reusable_count(out_dir: Path, spec: DemoSpec) -> int:
    """How many leading clips of a complete dataset in out_dir equal those of `spec`:
    all of them when only n_clips differs (clip i depends only on seed and i)."""
    old = _read_marker(out_dir)
    if not old or not (out_dir / INDEX_FILE).is_file():
        return 0
    want = _marker(spec)
    old_spec = dict(old.get("spec", {}))
    n_old = old_spec.pop("n_clips", 0)
    new_spec = dict(want["spec"])
    new_spec.pop("n_clips")
    if old.get("version") != want["version"] or old_spec != new_spec:
        return 0
    return min(int(n_old), spec.n_clips)


def generate_demo(out_dir, spec: DemoSpec = DemoSpec()) -> Path:
    """Write out_dir/media/<id>.mp4 and out_dir/clips.jsonl; return the jsonl path.

    Returns at once when out_dir already holds the dataset for `spec`. Otherwise builds in a
    temporary sibling folder and renames it into place, so a crash never leaves a half dataset
    that looks complete; clips shared with an older dataset of the same seed are reused.
    """
    _check_spec(spec)
    out_dir = Path(out_dir)
    if _is_complete(out_dir, spec):
        return out_dir / INDEX_FILE
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and _read_marker(out_dir) is None)):
        raise FileExistsError(f"{out_dir} exists and is not a demo dataset (no {SPEC_FILE}); "
                              "remove it or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / MEDIA_DIR).mkdir(parents=True)
        n_reuse = _reusable_count(out_dir, spec)
        lines = []
        for i in range(spec.n_clips):
            p = _params(spec, i)
            rec = _record(spec, p)
            dst = tmp / rec["path"]
            src = out_dir / rec["path"]
            if i < n_reuse and src.is_file():
                try:
                    os.link(src, dst)  # same bytes, no copy; the old folder is removed later
                except OSError:
                    shutil.copyfile(src, dst)
            else:
                write_mp4(dst, _render_frames(spec, p, False), spec.fps,
                          _render_audio(spec, p, False), spec.sample_rate)
            lines.append(json.dumps(rec, ensure_ascii=False))
        (tmp / INDEX_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        # The marker is written last: its presence means everything else is complete.
        (tmp / SPEC_FILE).write_text(json.dumps(_marker(spec), indent=2, sort_keys=True) + "\n", encoding="utf-8")

        if _is_complete(out_dir, spec):  # a concurrent run finished first; keep its result
            shutil.rmtree(tmp)
            return out_dir / INDEX_FILE
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / INDEX_FILE


def known_event_times(clip_uris: dict[str, str]) -> dict[str, tuple[float, ...]]:
    """The sound-onset times (s) the demo rendered, which are its visual events' times, per clip id,
    read from the clips.jsonl beside the clips' media folder; {} for clips that are not local
    demo media (a real collection has no known event times)."""
    found: dict[str, tuple[float, ...]] = {}
    indexes: dict[Path, dict[str, tuple[float, ...]]] = {}
    for clip_id, uri in clip_uris.items():
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if "://" in path:
            continue
        index_path = Path(path).resolve().parent.parent / INDEX_FILE
        if index_path not in indexes:
            rows: dict[str, tuple[float, ...]] = {}
            if index_path.is_file():
                for line in index_path.read_text().splitlines():
                    if line.strip():
                        row = json.loads(line)
                        if "event_times" in row:
                            rows[row["id"]] = tuple(float(t) for t in row["event_times"])
            indexes[index_path] = rows
        if clip_id in indexes[index_path]:
            found[clip_id] = indexes[index_path][clip_id]
    return found
