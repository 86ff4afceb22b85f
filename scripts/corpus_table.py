"""Print, per source kind, what the hostile test corpus (tests/fixtures/corpus.py) becomes: rows listed,
clips ingested (a mel row) and clips quarantined, by reason. For a change note or a closing report.

    .venv/bin/python scripts/corpus_table.py
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.corpus import INGESTED, KINDS, ingest_outcomes, write_corpus  # noqa: E402


def reason_kind(reason: str) -> str:
    """A reason without its per-file details (numbers, decoder messages)."""
    reason = re.sub(r"\(first seen at .*\)", "", reason)
    head = reason.split(":")[0].split(" (")[0]
    return re.sub(r"\d+(\.\d+)?", "N", head).strip()


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        corpus = write_corpus(Path(work) / "corpus")
        rows = []
        for kind in KINDS:
            outcomes, manifest = ingest_outcomes(kind, corpus, str(Path(work) / f"store_{kind}"))
            reasons = Counter(reason_kind(r) for r in outcomes.values() if r != INGESTED)
            duplicates = [q for q in manifest.quarantined if q["reason"].startswith("duplicate clip id")]
            reasons.update("duplicate clip id" for _ in duplicates)
            ingested = sum(1 for r in outcomes.values() if r == INGESTED)
            rows.append((kind, len(outcomes) + len(duplicates), ingested, sum(reasons.values()), reasons,
                         manifest.metadata["splits"]))
    print(f"{'source':<10} {'rows':>4} {'ingested':>8} {'quarantined':>11}  splits")
    for kind, total, ingested, quarantined, _, splits in rows:
        print(f"{kind:<10} {total:>4} {ingested:>8} {quarantined:>11}  {splits}")
    print()
    print("quarantined by reason (folder / jsonl / audiocaps / vggsound):")
    every = sorted({r for *_, reasons, _ in rows for r in reasons})
    for reason in every:
        counts = " / ".join(str(reasons.get(reason, 0)) for *_, reasons, _ in rows)
        print(f"  {reason:<40} {counts}")


if __name__ == "__main__":
    main()
