"""Stage `score`: hypotheses -> WER, per decode dir, and the experiment's RESULTS.md table.

    reads  exp/<tag>/decode_*/<split>/hyp.jsonl
    writes exp/<tag>/decode_*/<split>/{wer.json, result.txt}, exp/<tag>/RESULTS.md
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

from .. import __version__
from ..errors import MavsrError
from ..rates import Rates
from ..recipe import Recipe, atomic_write_json, atomic_write_text, is_done
from ..scoring import wer


def score_dir(d: Path, force: bool = False) -> dict:
    if (d / "wer.json").is_file() and not force:
        return json.loads((d / "wer.json").read_text())
    recs = [json.loads(line) for line in (d / "hyp.jsonl").read_text().splitlines() if line.strip()]
    res = wer([r["ref"] for r in recs], [r["hyp"] for r in recs])
    dur = sum(r["duration"] for r in recs)
    res["decode_time_per_utt"] = sum(r["time"] for r in recs) / max(1, len(recs))
    res["llm_tokens_in_per_utt"] = sum(r["tokens_in"] for r in recs) / max(1, len(recs))
    res["speech_seconds"] = round(dur, 3)
    atomic_write_json(d / "wer.json", res)
    atomic_write_text(d / "result.txt",
                      f"%WER {res['wer']:.2f} [ {res['sub'] + res['del'] + res['ins']} / {res['ref_words']}, "
                      f"{res['sub']} sub, {res['del']} del, {res['ins']} ins ] over {res['utterances']} utterances\n")
    return res


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def run(recipe: Recipe, exp: Path, force: bool = False, log=print) -> list[dict]:
    exp = Path(exp) if Path(exp).is_absolute() else recipe.root / exp
    dirs = sorted(d for d in exp.glob("decode_*/*") if is_done(d) and (d / "hyp.jsonl").is_file())
    if not dirs:
        raise MavsrError(f"no finished decode dirs in {exp}: run `mavsr decode` first")
    rows = []
    for d in dirs:
        res = score_dir(d, force)
        rates = Rates.parse(d.parent.name.split("_")[1])
        rows.append({"decode": d.parent.name, "split": d.name, "rates": rates, **res})
    rows.sort(key=lambda r: (r["split"], r["rates"].audio or 0, r["rates"].video or 0))
    lines = [
        f"# Results: {exp.name}", "",
        "| decode dir | split | (A,V) | WER % | sub | del | ins | words | LLM tokens/s of speech | decode s/utt |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tps = r["llm_tokens_in_per_utt"] * r["utterances"] / max(r["speech_seconds"], 1e-9)
        lines.append(f"| {r['decode']} | {r['split']} | {r['rates'].pair} | {r['wer']:.2f} | {r['sub']} | "
                     f"{r['del']} | {r['ins']} | {r['ref_words']} | {tps:.1f} | {r['decode_time_per_utt']:.4f} |")
    lines += ["", "Environment: "
              f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, mavsr {__version__} "
              f"(git {_git_commit()}), Python {platform.python_version()}, {platform.machine()}.", ""]
    atomic_write_text(exp / "RESULTS.md", "\n".join(lines))
    for r in rows:
        log(f"{r['split']:>6} {r['rates'].pair:>8} {r['rates'].tag:>7}  WER {r['wer']:6.2f}%  "
            f"(S {r['sub']} D {r['del']} I {r['ins']} / {r['ref_words']})")
    return rows
