"""A captioned speech collection synthesised with espeak-ng: a second dataset the demo generator
did not make, laid out as a real one (WAV files + a JSONL read by the ``jsonl`` source kind).

Every clip is one sentence spoken by an espeak-ng voice with a drawn voice type (man, woman,
whisper, croak), pitch, speaking rate, loudness and length (a few words or a long sentence).
Its caption says those attributes, i.e. what an audio tower can hear, never the words spoken
(a sound-event tower does not transcribe). Several caption templates say the same attributes.

    from stages.ingest.speech import SpeechSpec, make_speech_dataset
    jsonl = make_speech_dataset("data/speech", SpeechSpec(n_clips=400))
    # then: xmodal dataset add speech --kind jsonl --path data/speech/speech.jsonl

Clip i depends only on (seed, i); splits are given in the JSONL (``split_fractions`` of a seeded
permutation), as a published collection gives them. Nothing is downloaded: espeak-ng is an apt
package (``apt-get install espeak-ng``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SPEECH_GENERATOR_VERSION = 1
INDEX_FILE = "speech.jsonl"
SPEC_FILE = "speech_spec.json"
CLIPS_DIR = "clips"
SAMPLE_RATE = 22050  # espeak-ng's own output rate

# (caption word, espeak-ng variants): the voice types a listener (and a tower) can tell apart.
VOICES = {
    "man": ("m1", "m2", "m3", "m4", "m6", "m7"),
    "woman": ("f1", "f2", "f3", "f4", "f5"),
    "whispering voice": ("whisper",),
    "croaky voice": ("croak",),
}
PITCHES = {"low": 10, "medium": 50, "high": 90}          # espeak-ng -p (0-99)
RATES = {"slowly": 100, "at a normal pace": 165, "quickly": 260}  # words per minute (-s)
LOUDNESS = {"quietly": 0.04, "at a normal volume": 0.25, "loudly": 0.95}  # peak amplitude after scaling
LENGTHS = ("a few words", "a long sentence")

SHORT_TEXTS = ("yes, please", "over here", "not today", "good morning", "thank you", "wait a moment",
               "right away", "see you soon", "hello there", "all done")
LONG_TEXTS = ("the train to the coast leaves at seven every morning",
              "please remember to close the window before you go to sleep",
              "we walked along the river until the sun went down",
              "the market was crowded with people buying fresh bread",
              "she said the meeting would start a little later than planned",
              "turn left at the bakery and then follow the road to the hill",
              "my brother fixed the old bicycle in the garden yesterday",
              "the library closes early on the first friday of the month")

TEMPLATES = (
    "a {voice} with a {pitch} pitch speaking {rate} and {loud}, {length}",
    "{length} said {loud} by a {pitch}-pitched {voice}, {rate}",
    "a {pitch}-pitched {voice} talks {rate} and {loud}: {length}",
    "speech: {voice}, {pitch} pitch, {rate}, {loud}, {length}",
)


@dataclass(frozen=True)
class SpeechSpec:
    n_clips: int = 400
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test
    max_seconds: float = 4.0  # longer renderings are cut here (the pipeline's clip length)

    def params(self) -> dict:
        return {**asdict(self), "split_fractions": list(self.split_fractions), "version": SPEECH_GENERATOR_VERSION}


def espeak_binary() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise RuntimeError("espeak-ng is not installed: apt-get install espeak-ng")
    return found


def clip_attributes(spec: SpeechSpec, index: int) -> dict:
    """What clip ``index`` says and how: a function of (seed, index) only."""
    rng = np.random.default_rng([spec.seed, index])
    voice = list(VOICES)[rng.integers(len(VOICES))]
    length = LENGTHS[rng.integers(len(LENGTHS))]
    texts = SHORT_TEXTS if length == LENGTHS[0] else LONG_TEXTS
    return {
        "voice": voice, "variant": str(rng.choice(VOICES[voice])),
        "pitch": list(PITCHES)[rng.integers(len(PITCHES))],
        "rate": list(RATES)[rng.integers(len(RATES))],
        "loud": list(LOUDNESS)[rng.integers(len(LOUDNESS))],
        "length": length, "text": str(texts[rng.integers(len(texts))]),
        "template": int(rng.integers(len(TEMPLATES))),
        # small jitter so no two renderings of one attribute set are identical
        "pitch_jitter": int(rng.integers(-6, 7)), "rate_jitter": int(rng.integers(-12, 13)),
    }


def caption(attributes: dict) -> str:
    return TEMPLATES[attributes["template"]].format(**attributes)


def synthesise(attributes: dict, max_seconds: float, binary: str | None = None) -> np.ndarray:
    """One clip's float32 waveform at SAMPLE_RATE, scaled to its loudness."""
    import soundfile as sf

    binary = binary or espeak_binary()
    pitch = int(np.clip(PITCHES[attributes["pitch"]] + attributes["pitch_jitter"], 0, 99))
    rate = RATES[attributes["rate"]] + attributes["rate_jitter"]
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "out.wav")
        subprocess.run([binary, "-v", f"en+{attributes['variant']}", "-p", str(pitch), "-s", str(rate), "-w", wav,
                        attributes["text"]], check=True, capture_output=True)
        audio, rate_read = sf.read(wav, dtype="float32")
    if rate_read != SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate_read} Hz, expected {SAMPLE_RATE}")
    audio = audio[: int(max_seconds * SAMPLE_RATE)]
    peak = float(np.abs(audio).max()) or 1.0
    return (audio * (LOUDNESS[attributes["loud"]] / peak)).astype(np.float32)


def splits(spec: SpeechSpec) -> list[str]:
    order = np.random.default_rng(spec.seed + 7919).permutation(spec.n_clips)
    n_train = int(round(spec.split_fractions[0] * spec.n_clips))
    n_val = int(round(spec.split_fractions[1] * spec.n_clips))
    names = np.empty(spec.n_clips, dtype=object)
    names[order[:n_train]], names[order[n_train:n_train + n_val]], names[order[n_train + n_val:]] = "train", "val", "test"
    return list(names)


def make_speech_dataset(out_dir: str | os.PathLike, spec: SpeechSpec = SpeechSpec()) -> str:
    """Write ``out_dir/clips/*.wav`` and ``out_dir/speech.jsonl``; returns the JSONL's path. A
    folder already holding this spec's dataset is reused as it is."""
    import soundfile as sf

    out = Path(out_dir)
    index, spec_file = out / INDEX_FILE, out / SPEC_FILE
    if index.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec.params():
        return str(index)
    binary = espeak_binary()
    (out / CLIPS_DIR).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, split in enumerate(splits(spec)):
        attributes = clip_attributes(spec, i)
        clip_id = f"speech_{i:05d}"
        sf.write(out / CLIPS_DIR / f"{clip_id}.wav", synthesise(attributes, spec.max_seconds, binary), SAMPLE_RATE,
                 subtype="PCM_16")
        rows.append({"id": clip_id, "path": f"{CLIPS_DIR}/{clip_id}.wav", "caption": caption(attributes), "split": split,
                     "label": attributes["voice"]})
    tmp = index.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, index)  # the index appears whole, after every clip it names
    spec_file.write_text(json.dumps(spec.params()))
    return str(index)
