"""Text normalisation, WER and CER with substitutions, deletions and insertions (jiwer), alignments.

Normalisers (applied to reference and hypothesis alike):
  default  lower-case, strip punctuation except apostrophes, collapse whitespace (paper.md: corpus
           WER on lower-cased, whitespace-split text)
  none     collapse whitespace only
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jiwer

from .errors import MavsrError

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


NORMALISERS: dict[str, Callable[[str], str]] = {
    "default": normalise,
    "none": lambda t: " ".join(t.split()),
}


def get_normaliser(name: str) -> Callable[[str], str]:
    if name not in NORMALISERS:
        raise MavsrError(f"unknown normaliser {name!r}; choose from {', '.join(NORMALISERS)}")
    return NORMALISERS[name]


def _counts(r: str, y: str, chars: bool = False) -> tuple[int, int, int, int, list]:
    """(sub, del, ins, n_ref, alignment chunks) of one normalised pair."""
    unit = list(r.replace(" ", "_")) if chars else r.split()
    hyp = list(y.replace(" ", "_")) if chars else y.split()
    if not unit:
        return 0, 0, len(hyp), 0, []
    if not hyp:
        return 0, len(unit), 0, len(unit), []
    out = jiwer.process_words(" ".join(unit), " ".join(hyp))
    return out.substitutions, out.deletions, out.insertions, len(unit), out.alignments[0]


def alignment_lines(r: str, y: str, chunks: list) -> tuple[str, str, str]:
    """sclite-style REF/HYP lines (errors upper-cased, *** for a gap) and an error-marker line."""
    ref, hyp = r.split(), y.split()
    if not chunks:  # one side empty
        chunks = [type("C", (), {"type": "delete" if ref else "insert", "ref_start_idx": 0, "ref_end_idx": len(ref),
                                  "hyp_start_idx": 0, "hyp_end_idx": len(hyp)})()] if (ref or hyp) else []
    a, b, m = [], [], []
    for c in chunks:
        rs, hs = ref[c.ref_start_idx:c.ref_end_idx], hyp[c.hyp_start_idx:c.hyp_end_idx]
        for k in range(max(len(rs), len(hs))):
            x = rs[k] if k < len(rs) else None
            z = hs[k] if k < len(hs) else None
            if c.type == "equal":
                x_, z_, mark = x, z, ""
            else:
                x_ = x.upper() if x else "*" * len(z)
                z_ = z.upper() if z else "*" * len(x)
                mark = {"substitute": "S", "delete": "D", "insert": "I"}[c.type]
            w = max(len(x_), len(z_))
            a.append(x_.ljust(w))
            b.append(z_.ljust(w))
            m.append(mark.ljust(w))
    return " ".join(a), " ".join(b), " ".join(m).rstrip()


def score(refs: list[str], hyps: list[str], ids: list[str] | None = None, normaliser: str = "default") -> dict:
    """Corpus WER and CER over utterance pairs, plus per-utterance alignments.

    Returns wer/cer (%), sub/del/ins/ref_words, cer counts, utterances, and `details`: one dict
    per utterance with id, normalised ref and hyp, its counts and the three alignment lines."""
    norm = get_normaliser(normaliser)
    ids = ids or [str(k) for k in range(len(refs))]
    s = d = i = n = 0
    cs = cd = ci = cn = 0
    details = []
    for uid, r0, y0 in zip(ids, refs, hyps, strict=True):
        r, y = norm(r0), norm(y0)
        ws, wd, wi, wn, chunks = _counts(r, y)
        xs, xd, xi, xn, _ = _counts(r, y, chars=True)
        s, d, i, n = s + ws, d + wd, i + wi, n + wn
        cs, cd, ci, cn = cs + xs, cd + xd, ci + xi, cn + xn
        details.append({"id": uid, "ref": r, "hyp": y, "sub": ws, "del": wd, "ins": wi, "words": wn,
                        "lines": alignment_lines(r, y, chunks)})
    return {
        "wer": 100.0 * (s + d + i) / max(1, n), "sub": s, "del": d, "ins": i, "ref_words": n,
        "cer": 100.0 * (cs + cd + ci) / max(1, cn), "char_sub": cs, "char_del": cd, "char_ins": ci, "ref_chars": cn,
        "utterances": len(refs), "normaliser": normaliser, "details": details,
    }


def wer(refs: list[str], hyps: list[str]) -> dict:
    """Corpus WER over utterance pairs; empty hypotheses count as deletions."""
    out = score(refs, hyps)
    return {k: out[k] for k in ("wer", "sub", "del", "ins", "ref_words", "utterances")}
