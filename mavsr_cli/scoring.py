"""Text normalisation, WER and CER with substitutions, deletions and insertions (jiwer), alignments.

Normalisers (applied to reference and hypothesis alike):
  default  lower-case, strip punctuation except apostrophes, collapse whitespace (docs/method.md,
           Decoding and scoring: the authors' WER is on lower-cased, whitespace-split text)
  none     collapse whitespace only
`score_dir` scores one decode dir: hyp.jsonl -> wer.json, result.txt, errors.txt, ref.trn, hyp.trn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jiwer

from .errors import MavsrError
from .fsutil import atomic_write_json, atomic_write_text
from .options import Normaliser

_PUNCT = re.compile(r"[^\w\s']", re.UNICODE)


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


NORMALISERS: dict[str, Callable[[str], str]] = {  # options.Normaliser lists them for the CLI
    Normaliser.default.value: normalise,
    Normaliser.none.value: lambda t: " ".join(t.split()),
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


def score_dir(d: Path, force: bool = False, normaliser: str = "default") -> dict:
    if (d / "wer.json").is_file() and not force:
        old = json.loads((d / "wer.json").read_text())
        if old.get("normaliser", "default") == normaliser and "cer" in old:
            return old
    recs = [json.loads(line) for line in (d / "hyp.jsonl").read_text().splitlines() if line.strip()]
    full = score([r["ref"] for r in recs], [r["hyp"] for r in recs], [r["id"] for r in recs], normaliser)
    details = full.pop("details")
    res = dict(full)
    dur = sum(r["duration"] for r in recs)
    res["decode_time_per_utt"] = sum(r["time"] for r in recs) / max(1, len(recs))
    res["llm_tokens_in_per_utt"] = sum(r["tokens_in"] for r in recs) / max(1, len(recs))
    res["speech_seconds"] = round(dur, 3)
    atomic_write_json(d / "wer.json", res)
    atomic_write_text(d / "result.txt",
                      f"%WER {res['wer']:.2f} [ {res['sub'] + res['del'] + res['ins']} / {res['ref_words']}, "
                      f"{res['sub']} sub, {res['del']} del, {res['ins']} ins ] over {res['utterances']} utterances\n"
                      f"%CER {res['cer']:.2f} [ {res['char_sub'] + res['char_del'] + res['char_ins']} / "
                      f"{res['ref_chars']} ]  normaliser: {normaliser}\n")
    # sclite-style transcripts and per-utterance alignments
    atomic_write_text(d / "ref.trn", "".join(f"{x['ref']} ({x['id']})\n" for x in details))
    atomic_write_text(d / "hyp.trn", "".join(f"{x['hyp']} ({x['id']})\n" for x in details))
    blocks = []
    for x in details:
        if not (x["sub"] or x["del"] or x["ins"]):
            continue
        ref, hyp, marks = x["lines"]
        blocks.append(f"id: {x['id']}  S {x['sub']} D {x['del']} I {x['ins']} / {x['words']}\n"
                      f"REF:  {ref}\nHYP:  {hyp}\n      {marks}\n")
    head = (f"# {len(blocks)} of {len(details)} utterances with errors; errors upper-case, *** = gap, "
            f"S/D/I under each error\n\n")
    atomic_write_text(d / "errors.txt", head + "\n".join(blocks))
    return res
