"""Synthesise the espeak-ng speech collection (stages.ingest.speech) and print how to register it.

    .venv/bin/python scripts/make_speech_dataset.py --out .data/speech --clips 400
    .venv/bin/xmodal dataset add speech --kind jsonl --path .data/speech/speech.jsonl
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.ingest.speech import SpeechSpec, make_speech_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".data/speech", help="folder to write clips/ and speech.jsonl into")
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        jsonl = make_speech_dataset(args.out, SpeechSpec(n_clips=args.clips, seed=args.seed))
    except RuntimeError as exc:
        raise SystemExit(f"make_speech_dataset: {exc}") from None
    print(f"{jsonl}\nregister it: .venv/bin/xmodal dataset add speech --kind jsonl --path {jsonl}")


if __name__ == "__main__":
    main()
