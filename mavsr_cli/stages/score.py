"""Stage `score`: hypotheses -> WER, per decode dir, and the experiment's RESULTS.md table.

    reads  exp/<tag>/decode_*/<split>/hyp.jsonl
    writes exp/<tag>/decode_*/<split>/{wer.json, result.txt, errors.txt, ref.trn, hyp.trn},
           exp/<tag>/RESULTS.md (one table over every decode dir, with an environment block)
wer.json records the normaliser; a decode dir scored with another normaliser is rescored.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

from .. import __version__
from ..errors import MavsrError
from ..fsutil import atomic_write_text
from ..rates import DecodeTag, condition_snr
from ..recipe import Recipe, decoding_checkpoint, is_done, other_checkpoint
from ..scoring import score_dir


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
    if not (exp / "config.yaml").is_file():  # as decode, bench and serve say it
        raise MavsrError(f"{exp} is not an experiment dir (no config.yaml)")
    dirs = sorted(d for d in exp.glob("decode_*/*") if is_done(d) and (d / "hyp.jsonl").is_file())
    if not dirs:
        raise MavsrError(f"no finished decode dirs in {exp}: run `mavsr decode` first")
    rows, now = [], decoding_checkpoint(exp)
    for d in dirs:
        res = score_dir(d, force, normaliser)
        tag = DecodeTag.parse(d.parent.name)
        old = other_checkpoint(d, now)
        if old:
            log(f"score: warning: {d.parent.name}/{d.name} was decoded from {old}, not the experiment's checkpoint "
                "now; decode it again with --force")
        rows.append({"decode": d.parent.name + (f" (from {old})" if old else ""), "split": d.name,
                     "rates": tag.rates, "beam": tag.beam, "condition": tag.condition or "clean", "pool": tag.pool,
                     **res})

    def snr_key(c: str) -> float:
        return float("inf") if c == "clean" else condition_snr(c)

    rows.sort(key=lambda r: (r["split"], r["condition"] != "clean", r["condition"].rsplit("snr", 1)[0],
                             -snr_key(r["condition"]),
                             r["rates"].audio or 0, r["rates"].video or 0, r["pool"] is not None,
                             r["pool"].tag if r["pool"] else "", r["beam"] or 0))
    lines = [
        f"# Results: {exp.name}", "",
        f"Normaliser: {normaliser}. Tokens: LLM input tokens per second of speech (media + prompt). "
        "'(1,1) pooled at (16,5)': a pair's projectors fed features pooled at other rates at decode time only.", "",
        "| split | (A,V) | noise | beam | WER % | CER % | sub | del | ins | words | tokens/s | decode s/utt "
        "| decode dir |",
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
