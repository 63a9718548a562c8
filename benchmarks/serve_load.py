"""Offered load against `mavsr serve`: throughput, p50/p95 latency and the WER of what was served, for
fixed (4,2), fixed (16,5) and the elastic controller (issue 23).

For each mode a server is started on a free loopback port (the real process, `mavsr serve`), and for
each offered load (requests per second) `--requests` uploads of the test split's videos (cycled) are
sent at seeded Poisson arrival times, each on its own thread with its own connection; latency is the
client's, upload sent to response read. Bounded: each load stops sending after `--requests` or
`--max-seconds`, whichever comes first. Loopback only.

    python benchmarks/serve_load.py --dir recipes/synth --exp exp/synth_ms_all \
        [--loads 1,2,4,8] [--requests 40] [--slo-ms 800] [--out benchmarks/serve_load.md] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
from benchmarks._common import emit  # noqa: E402

MODES = ("a4v2", "a16v5", "auto")


def start(d: Path, exp: str, mode: str, a) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mavsr_cli", "serve", "--exp", exp, "--dir", str(d), "--port", "0",
           "--rates", mode, "--slo-ms", str(a.slo_ms), "--max-batch", str(a.max_batch), "--max-queue", "1000"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    url = None
    for line in p.stderr:
        m = re.search(r"listening on (http://\S+)", line)
        url = url or (m.group(1) if m else None)
        if "serve: ready" in line:
            break
    if url is None or p.poll() is not None:
        raise SystemExit(f"mavsr serve did not start ({mode})")
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    for _ in range(100):
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return p, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"mavsr serve is not answering ({mode})")


def offer(url: str, clips: list[tuple[str, bytes, str]], rate: float, a) -> list[dict]:
    """Send at Poisson times; -> one record per request (latency s, status, rates, text, ref)."""
    rng, out, threads = random.Random(a.seed), [], []
    t0, t_next = time.perf_counter(), 0.0

    def one(k: int) -> None:
        uid, body, ref = clips[k % len(clips)]
        s = time.perf_counter()
        try:
            r = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("clip.mp4", body)}, timeout=600)
            j = r.json() if r.status_code == 200 else {}
            out.append({"latency": time.perf_counter() - s, "status": r.status_code, "rates": j.get("rates"),
                        "text": j.get("text", ""), "ref": ref, "end": time.perf_counter() - t0,
                        "batch": j.get("batch", 0)})
        except httpx.TransportError as e:
            out.append({"latency": time.perf_counter() - s, "status": type(e).__name__, "rates": None, "text": "",
                        "ref": ref, "end": time.perf_counter() - t0, "batch": 0})

    for k in range(a.requests):
        if t_next > a.max_seconds:
            break
        time.sleep(max(0.0, t0 + t_next - time.perf_counter()))
        th = threading.Thread(target=one, args=(k,))
        th.start()
        threads.append(th)
        t_next += rng.expovariate(rate)
    for th in threads:
        th.join()
    return out


def summary(recs: list[dict], rate: float, slo: float) -> dict:
    from mavsr_cli.scoring import score

    ok = [r for r in recs if r["status"] == 200]
    lat = sorted(r["latency"] for r in ok)

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    span = max((r["end"] for r in ok), default=1.0)
    pairs = {}
    for r in ok:
        pairs[r["rates"]] = pairs.get(r["rates"], 0) + 1
    wer = score([r["ref"] for r in ok], [r["text"] for r in ok])["wer"] if ok else float("nan")
    return {"offered": rate, "sent": len(recs), "ok": len(ok), "throughput": len(ok) / span, "p50": q(0.5),
            "p95": q(0.95), "within_slo": sum(x <= slo for x in lat) / max(len(lat), 1), "wer": wer,
            "pairs": pairs, "mean_batch": sum(r["batch"] for r in ok) / max(len(ok), 1)}


def clips_of(d: Path, n: int) -> list[tuple[str, bytes, str]]:
    recs = [json.loads(x) for x in (d / "data/test/manifest.jsonl").read_text().splitlines()][:n]
    return [(r["id"], (d / r["video"]).read_bytes(), r["text"]) for r in recs]


def report(res: dict, a) -> list[str]:
    lines = [f"# `mavsr serve` under offered load ({time.strftime('%Y-%m-%d')})", "",
             f"{a.exp} in {a.dir}; {a.requests} requests per load (at most {a.max_seconds:g} s of arrivals), Poisson, "
             f"seed {a.seed}; test-split videos cycled ({a.clips}); --max-batch {a.max_batch}, p95 target "
             f"{a.slo_ms:g} ms for auto; the experiment's beam; client and server on this machine "
             f"({_machine()}). Latency: upload sent to response read.", "",
             "| mode | offered req/s | served | throughput req/s | p50 ms | p95 ms | within target | mean batch "
             "| WER % | pairs used |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, rows in res.items():
        for s in rows:
            pairs = ", ".join(f"{k} {v}" for k, v in sorted(s["pairs"].items()))
            lines.append(f"| {mode} | {s['offered']:g} | {s['ok']}/{s['sent']} | {s['throughput']:.2f} | "
                         f"{1000 * s['p50']:.0f} | {1000 * s['p95']:.0f} | {100 * s['within_slo']:.0f}% | "
                         f"{s['mean_batch']:.1f} | {s['wer']:.1f} | {pairs} |")
    return lines


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def plot(res: dict, slo_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for mode, rows in res.items():
        x = [s["offered"] for s in rows]
        ax[0].plot(x, [1000 * s["p95"] for s in rows], marker="o", label=mode)
        ax[1].plot(x, [s["wer"] for s in rows], marker="o", label=mode)
    ax[0].axhline(slo_ms, color="gray", linestyle="--", label="p95 target")
    ax[0].set(xlabel="offered load, requests/s", ylabel="p95 latency, ms", yscale="log")
    ax[1].set(xlabel="offered load, requests/s", ylabel="WER of what was served, %")
    for x in ax:
        x.legend()
        x.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("recipes/synth"))
    ap.add_argument("--exp", default="exp/synth_ms_all")
    ap.add_argument("--loads", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--slo-ms", type=float, default=800.0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    clips, res = clips_of(a.dir, a.clips), {}
    for mode in a.modes.split(","):
        p, url = start(a.dir, a.exp, mode, a)
        try:
            res[mode] = []
            for rate in (float(x) for x in a.loads.split(",")):
                res[mode].append(summary(offer(url, clips, rate, a), rate, a.slo_ms / 1000))
                print(json.dumps({"mode": mode, **res[mode][-1]}), file=sys.stderr, flush=True)
        finally:
            p.terminate()
            p.wait(timeout=120)
    emit(report(res, a), a.out)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    if a.plot:
        plot(res, a.slo_ms, a.plot)


if __name__ == "__main__":
    main()
