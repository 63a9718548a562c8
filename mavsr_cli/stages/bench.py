"""Stage `bench`: the elastic-inference report of trained experiments.

For each experiment (its modality and rate grid come from its checkpoint), each trained rate pair
and each noise condition (clean and babble at the given SNRs), the split is decoded afresh in
this one run, so latencies and memory are measured side by side (the pairs taking turns for
`--rounds`, each row keeping its least time), then scored:
    WER, CER, LLM input tokens per second of speech, decode latency per utterance, real-time
    factor (decode time / speech time), peak memory during the decode (the largest over the
    rounds; CUDA: peak allocated; CPU: the process's peak resident set, sampled every 5 ms; the
    model included in both)
writes <out>/bench.csv, bench.json (rows + machine), REPORT.md (tables, the Pareto front of clean
WER vs tokens), and with matplotlib installed wer_vs_tokens.png and wer_vs_snr.png.
A video-only model is decoded once: audio noise does not reach it, so its clean row stands for
every SNR (marked so in the table).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import devices
from ..config import snr_value
from ..decoding import Decoder
from ..errors import MavsrError
from ..fsutil import atomic_write_json, atomic_write_text
from ..options import BenchOptions
from ..rates import Rates
from ..recipe import Recipe, write_provenance
from ..scoring import score_dir

COLUMNS = ["exp", "modality", "rates", "audio_rate", "video_rate", "snr", "wer", "cer", "tokens_per_s",
           "latency_s", "rtf", "peak_mem_mb", "utterances", "pareto"]


def parse_snrs(spec: str) -> tuple[float | None, ...]:
    """'clean,10,5,0,-5' -> (None, 10.0, 5.0, 0.0, -5.0)."""
    out = [snr_value(part, f"--snr {spec!r}") for part in spec.split(",") if part.strip()]
    if not out:
        raise MavsrError("--snr: no condition given")
    return tuple(dict.fromkeys(out))


class PeakMemory:
    """Peak memory during a block, in MB: CUDA peak allocated, or on the CPU the peak resident set
    of the process (sampled every 5 ms by a thread). Absolute, the model included: the growth over
    the level at entry read 0 when the allocator reused memory freed by an earlier row."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        self.peak_mb: float | None = None

    @staticmethod
    def _rss() -> int:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self._max = max(self._max, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss())
            self.peak_mb = self._max / 2**20
        return False


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (cost, error) points no other point beats on both (lower is better for both)."""
    out = []
    for i, (c, e) in enumerate(points):
        dominated = any((c2 <= c and e2 <= e) and (c2 < c or e2 < e) for j, (c2, e2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def measure(recipe: Recipe, exp: Path, opt: BenchOptions, log=print) -> list[dict]:
    """Decode and score every trained pair of one experiment under every condition. Under each
    condition the pairs take turns, `opt.rounds` times, and a row keeps its pair's least decode
    time: another process's burst only ever adds time, and taking turns spreads a slow stretch over
    every pair (one pass per pair on a shared machine once measured (16,5) 1.5x slower than (4,2))."""
    dec = Decoder(recipe, exp, opt.split, log, opt.device)
    modality = dec.cfg.model.modality
    _ = dec.model  # loaded once, outside the timed blocks
    rows: dict[tuple[str, float | None], dict] = {}
    for snr in opt.snrs:
        if modality == "v" and snr is not None:
            rows |= {(r.tag, snr): {**rows[r.tag, None], "snr": snr, "note": "video only: audio noise does not "
                                    "reach it"} for r in dec.trained}
            continue
        dopt = replace(dec.options(beam=opt.beam, batch_size=opt.batch_size), snr=snr, noise=opt.noise)
        if snr is not None:
            dec.store(dopt)  # the noisy features are encoded before the timed block
        for k in range(opt.rounds):
            for rates in dec.trained:
                _keep_least(rows, (rates.tag, snr), _decoded(dec, rates, dopt), f"{exp.name} {rates.tag}", k + 1)
        for rates in dec.trained:
            r = rows[rates.tag, snr]
            log(f"bench: {r['exp']} {rates.tag} {_snr_label(snr)}: WER {r['wer']:.2f}, {r['tokens_per_s']:.1f} "
                f"tokens/s, {r['latency_s'] * 1000:.1f} ms/utt, RTF {r['rtf']:.4f}")
    order = {r.tag: i for i, r in enumerate(dec.trained)}
    return [{k: v for k, v in r.items() if k != "hyps"}
            for _, r in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], opt.snrs.index(kv[0][1])))]


def _keep_least(rows: dict, key: tuple, row: dict, what: str, round_no: int) -> None:
    """rows[key] becomes the faster of it and `row` (same hypotheses, or MavsrError), with the larger
    peak memory of the two."""
    prev = rows.get(key)
    if prev is not None and prev["hyps"] != row["hyps"]:
        raise MavsrError(f"bench: {what} decoded differently in round {round_no}")
    if prev is None or row["latency_s"] < prev["latency_s"]:
        rows[key] = row
    rows[key]["peak_mem_mb"] = max(row["peak_mem_mb"], prev["peak_mem_mb"] if prev else 0.0)


def _decoded(dec: Decoder, rates: Rates, dopt) -> dict:
    """One timed decode of the split at one pair and condition, scored: a bench row (and its hypotheses)."""
    with PeakMemory(dec.device) as mem:
        d = dec.run(rates, dopt, force=True)
    res = score_dir(d, force=True)
    recs = [json.loads(x) for x in (d / "hyp.jsonl").read_text().splitlines() if x.strip()]
    speech = sum(r["duration"] for r in recs)
    spent = sum(r["time"] for r in recs)
    return {"exp": dec.exp.name, "modality": dec.cfg.model.modality, "rates": rates.tag, "audio_rate": rates.audio,
            "video_rate": rates.video, "snr": dopt.snr, "wer": round(res["wer"], 2), "cer": round(res["cer"], 2),
            "tokens_per_s": round(sum(r["tokens_in"] for r in recs) / max(1e-9, speech), 2),
            "latency_s": round(spent / max(1, len(recs)), 5), "rtf": round(spent / max(1e-9, speech), 5),
            "peak_mem_mb": round(mem.peak_mb, 1), "utterances": len(recs), "note": "",
            "hyps": [r.get("hyp") for r in recs]}


def _snr_label(snr) -> str:
    return "clean" if snr is None else f"{snr:g} dB"


def report(rows: list[dict], opt: BenchOptions) -> tuple[str, dict]:
    dev = devices.resolve(opt.device)
    env = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "device": devices.describe(dev),
           "torch": torch.__version__, "split": opt.split, "beam": opt.beam, "noise": opt.noise,
           "rounds": opt.rounds}
    lines = ["# Elastic inference report", "",
             " | ".join(f"{k}: {v}" for k, v in env.items()), "",
             "Clean condition; **bold** = on the Pareto front of WER vs LLM input tokens per second "
             "(no other configuration has both fewer tokens and a lower WER).", "",
             f"ms/utt is the decode time of a batch divided by its utterances, the least of {opt.rounds} rounds in "
             "which the pairs took turns; RTF = decode time / speech time; "
             + ("peak MB is the peak memory allocated on the GPU during the decode, the model included."
                if dev.type == "cuda" else
                "peak MB is the process's peak resident memory during the decode, the model included."), "",
             "| exp | modality | (A,V) | WER % | CER % | tokens/s | ms/utt | RTF | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["snr"] is not None:
            continue
        b = "**" if r["pareto"] else ""
        lines.append(f"| {r['exp']} | {r['modality']} | {b}{Rates.parse(r['rates']).pair}{b} | "
                     f"{b}{r['wer']:.2f}{b} | {r['cer']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_s'] * 1000:.1f} | "
                     f"{r['rtf']:.4f} | {r['peak_mem_mb']:.1f} |")
    snrs = list(dict.fromkeys(r["snr"] for r in rows))
    if len(snrs) > 1:
        lines += ["", f"WER % by {opt.noise} SNR:", "",
                  "| exp | modality | (A,V) | " + " | ".join(_snr_label(s) for s in snrs) + " |",
                  "|---|---|---|" + "---|" * len(snrs)]
        keys = list(dict.fromkeys((r["exp"], r["modality"], r["rates"]) for r in rows))
        for k in keys:
            by = {r["snr"]: r for r in rows if (r["exp"], r["modality"], r["rates"]) == k}
            mark = " (video only: clean for all)" if k[1] == "v" else ""
            lines.append(f"| {k[0]} | {k[1]}{mark} | {Rates.parse(k[2]).pair} | "
                         + " | ".join(f"{by[s]['wer']:.2f}" if s in by else "-" for s in snrs) + " |")
    return "\n".join(lines) + "\n", env


def _ylim(ax, wers: list[float]) -> None:
    """From 0 to a little above the worst WER: a one-word difference stays a small step."""
    ax.set_ylim(0, max(10.0, 1.15 * max(wers, default=0.0)))


def plots(rows: list[dict], out: Path) -> list[str]:
    """wer_vs_tokens.png and wer_vs_snr.png; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    clean = [r for r in rows if r["snr"] is None]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for (e, m) in dict.fromkeys((r["exp"], r["modality"]) for r in clean):
        pts = [r for r in clean if (r["exp"], r["modality"]) == (e, m)]
        ax.scatter([r["tokens_per_s"] for r in pts], [r["wer"] for r in pts], label=f"{e} ({m})", s=36, zorder=3)
        for r in pts:
            ax.annotate(Rates.parse(r["rates"]).pair, (r["tokens_per_s"], r["wer"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    front = sorted((r for r in clean if r["pareto"]), key=lambda r: r["tokens_per_s"])
    if front:  # a step line through the front, each point ringed (a front of one point is ringed too)
        ax.plot([r["tokens_per_s"] for r in front], [r["wer"] for r in front], "k--", lw=1, drawstyle="steps-post",
                label="Pareto front")
        ax.scatter([r["tokens_per_s"] for r in front], [r["wer"] for r in front], s=140, facecolors="none",
                   edgecolors="k", lw=1.2, zorder=4)
    _ylim(ax, [r["wer"] for r in clean])
    ax.set_title("Clean WER against the LLM's input tokens (one checkpoint per experiment)")
    ax.set_xlabel("LLM input tokens per second of speech")
    ax.set_ylabel("WER % (clean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "wer_vs_tokens.png", dpi=120)
    plt.close(fig)
    files = ["wer_vs_tokens.png"]
    snrs = [s for s in dict.fromkeys(r["snr"] for r in rows)]
    if len(snrs) > 1:
        files.append(_snr_plot(plt, rows, snrs, out))
    return files


def _snr_plot(plt, rows: list[dict], snrs: list, out: Path) -> str:
    xs = {s: (30.0 if s is None else s) for s in snrs}  # clean drawn at 30 dB, labelled
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for k in dict.fromkeys((r["exp"], r["modality"], r["rates"]) for r in rows):
        pts = sorted((r for r in rows if (r["exp"], r["modality"], r["rates"]) == k), key=lambda r: -xs[r["snr"]])
        ax.plot([xs[r["snr"]] for r in pts], [r["wer"] for r in pts], marker="o", ms=4,
                label=f"{k[0]} ({k[1]}) {Rates.parse(k[2]).pair}")
    ax.set_xticks(sorted(xs.values()))
    ax.set_xticklabels(["clean" if v == 30.0 and None in xs else f"{v:g}" for v in sorted(xs.values())])
    ax.invert_xaxis()
    _ylim(ax, [r["wer"] for r in rows])
    ax.set_title("WER as babble noise rises (left: clean)")
    ax.set_xlabel("babble SNR (dB)")
    ax.set_ylabel("WER %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(ax.lines) > 6 else 1, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "wer_vs_snr.png", dpi=120)
    plt.close(fig)
    return "wer_vs_snr.png"


def run(recipe: Recipe, exps: list[Path], opt: BenchOptions, out: Path | None = None, log=print) -> Path:
    if not exps:
        raise MavsrError("give at least one --exp")
    exps = [Path(e) if Path(e).is_absolute() else recipe.root / e for e in exps]
    out = Path(out) if out is not None else (exps[0] / "bench" if len(exps) == 1 else recipe.root / "bench")
    out = out if out.is_absolute() else recipe.root / out
    if out.exists() and not out.is_dir():  # found now, not after every decode
        raise MavsrError(f"--out {out} is a file; give a directory for the report")
    rows = []
    for exp in exps:
        rows += measure(recipe, exp, opt, log)
    flags = pareto([(r["tokens_per_s"], r["wer"]) for r in rows if r["snr"] is None])
    it = iter(flags)
    for r in rows:
        r["pareto"] = next(it) if r["snr"] is None else False
    text, env = report(rows, opt)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + ["note"], extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "snr": "clean" if r["snr"] is None else r["snr"]})
    atomic_write_text(out / "bench.csv", buf.getvalue())
    atomic_write_json(out / "bench.json", {"environment": env, "rows": rows})
    files = plots(rows, out)
    text += "\n" + ("".join(f"![{f}]({f})\n\n" for f in files) if files
                    else "(plots not drawn: install matplotlib, `pip install 'mavsr[plots]'`)\n")
    atomic_write_text(out / "REPORT.md", text)
    write_provenance(out, None)  # cmd.txt: the options are in bench.json and REPORT.md
    log(f"bench: {len(rows)} rows -> {out}/bench.csv, bench.json, REPORT.md" + "".join(f", {f}" for f in files))
    return out
