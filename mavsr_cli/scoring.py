"""Text normalisation and WER with substitutions, deletions and insertions (jiwer).

Normaliser "default" (applied to reference and hypothesis alike): lower-case, strip punctuation
except apostrophes, collapse whitespace (paper.md: corpus WER on lower-cased, whitespace-split text).
"""

from __future__ import annotations

import re

import jiwer

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def wer(refs: list[str], hyps: list[str]) -> dict:
    """Corpus WER over utterance pairs; empty hypotheses count as deletions."""
    refs = [normalise(r) for r in refs]
    hyps = [normalise(h) for h in hyps]
    s = d = i = h = 0
    for r, y in zip(refs, hyps, strict=True):
        if not r:
            i += len(y.split())
            continue
        if not y:
            d += len(r.split())
            continue
        out = jiwer.process_words(r, y)
        s, d, i, h = s + out.substitutions, d + out.deletions, i + out.insertions, h + out.hits
    n = sum(len(r.split()) for r in refs)
    return {
        "wer": 100.0 * (s + d + i) / max(1, n),
        "sub": s, "del": d, "ins": i, "ref_words": n, "utterances": len(refs),
    }
