"""Stage `score`: hypotheses -> WER, per decode dir, and the experiment's RESULTS.md table.

    reads  exp/<tag>/decode_*/<split>/hyp.jsonl
    writes exp/<tag>/decode_*/<split>/{wer.json, result.txt, errors.txt, ref.trn, hyp.trn},
           exp/<tag>/RESULTS.md (one table over every decode dir, with an environment block)
wer.json records the normaliser; a decode dir scored with another normaliser is rescored.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

from .. import __version__
from ..errors import MavsrError
from ..fsutil import atomic_write_json, atomic_write_text
from ..rates import Rates
from ..recipe import Recipe, is_done
from ..scoring import score as score_texts


def score_dir(d: Path, force: bool = False, normaliser: str = "default") -> dict:
    if (d / "wer.json").is_file() and not force:
        old = json.loads((d / "wer.json").read_text())
        if old.get("normaliser", "default") == normaliser and "cer" in old:
            return old
    recs = [json.loads(line) for line in (d / "hyp.jsonl").read_text().splitlines() if line.strip()]
    full = score_texts([r["ref"] for r in recs], [r["hyp"] for r in recs], [r["id"] for r in recs], normaliser)
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


def parse_decode_name(name: str) -> tuple[Rates, int | None, str, Rates | None]:
    """decode_a16v5_beam15_snr0 -> (Rates(16, 5), 15, 'snr0', None); '' condition = clean;
    decode_a1v1_poola16v5_beam15 -> (Rates(1, 1), 15, '', Rates(16, 5)) (inference-only pooling)."""
    parts = name.split("_")
    rates = Rates.parse(parts[1])
    beam = pool = None
    rest = parts[2:]
    if rest and rest[0].startswith("pool"):
        pool, rest = Rates.parse(rest[0][4:]), rest[1:]
    if rest and rest[0].startswith("beam"):
        beam = int(rest[0][4:])
        rest = rest[1:]
    elif rest and rest[0] == "greedy":  # decode dirs of mavsr 0.1.0
        beam, rest = 1, rest[1:]
    return rates, beam, "_".join(rest), pool


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "-"


def run(recipe: Recipe, exp: Path, force: bool = False, log=print, normaliser: str = "default") -> list[dict]:
    exp = Path(exp) if Path(exp).is_absolute() else recipe.root / exp
    dirs = sorted(d for d in exp.glob("decode_*/*") if is_done(d) and (d / "hyp.jsonl").is_file())
    if not dirs:
        raise MavsrError(f"no finished decode dirs in {exp}: run `mavsr decode` first")
    rows = []
    for d in dirs:
        res = score_dir(d, force, normaliser)
        rates, beam, cond, pool = parse_decode_name(d.parent.name)
        rows.append({"decode": d.parent.name, "split": d.name, "rates": rates, "beam": beam,
                     "condition": cond or "clean", "pool": pool, **res})

    def snr_key(c: str) -> float:
        return float("inf") if c == "clean" else float(c.rsplit("snr", 1)[1])

    rows.sort(key=lambda r: (r["split"], r["condition"] != "clean", r["condition"].rsplit("snr", 1)[0],
                             -snr_key(r["condition"]),
                             r["rates"].audio or 0, r["rates"].video or 0, r["pool"] is not None,
                             r["pool"].tag if r["pool"] else "", r["beam"] or 0))
    lines = [
        f"# Results: {exp.name}", "",
        f"Normaliser: {normaliser}. Tokens: LLM input tokens per second of speech (media + prompt). "
        "'(1,1) pooled at (16,5)': a pair's projectors fed features pooled at other rates at decode time only.", "",
        "| split | (A,V) | noise | beam | WER % | CER % | sub | del | ins | words | tokens/s | decode s/utt | decode dir |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = r["llm_tokens_in_per_utt"] * r["utterances"] / max(r["speech_seconds"], 1e-9)
        pair = r["rates"].pair + (f" pooled at {r['pool'].pair}" if r["pool"] else "")
        lines.append(f"| {r['split']} | {pair} | {r['condition']} | {r['beam']} | {r['wer']:.2f} | "
                     f"{r['cer']:.2f} | {r['sub']} | {r['del']} | {r['ins']} | {r['ref_words']} | {tps:.1f} | "
                     f"{r['decode_time_per_utt']:.4f} | {r['decode']} |")
    lines += ["", "Environment: "
              f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, mavsr {__version__} "
              f"(git {_git_commit()}), Python {platform.python_version()}, torch {_version('torch')}, "
              f"transformers {_version('transformers')}, peft {_version('peft')}, jiwer {_version('jiwer')}, "
              f"{platform.machine()}.", ""]
    atomic_write_text(exp / "RESULTS.md", "\n".join(lines))
    for r in rows:
        log(f"{r['split']:>6} {r['rates'].pair:>8} {r['rates'].tag:>7} beam {r['beam']} {r['condition']:>8}  "
            f"WER {r['wer']:6.2f}%  "
            f"(S {r['sub']} D {r['del']} I {r['ins']} / {r['ref_words']})")
    return rows
