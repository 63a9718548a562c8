"""A CPU beam step's products: torch.mm (MKL, what F.linear calls) against oneDNN's (issue 21).

The products of `model/step.py`'s beam step on the CPU, at Llama-3.2-1B's shapes (q/o 2048 x 2048,
k/v 512 x 2048, gate/up 8192 x 2048, down 2048 x 8192, the output layer 128,256 x 2048) and at the
tiny shapes of `vs_authors.py` (256 wide, MLP 680, 2,052 words), with a beam's rows: 120 (beam 15 x 8
utterances) and 15 (one utterance, what `transcribe` decodes). Each shape's two products alternate
in `--rounds` rounds of `--reps` calls; the report gives the medians, their ratio, and each
product's largest error relative to the float64 product's largest value.

    python benchmarks/cpu_products.py [--rounds 5] [--reps 5] [--shapes tiny] [--out benchmarks/cpu_products.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

SHAPES = {  # name: (out, in) of nn.Linear's weight
    "Llama-3.2-1B": [("q, o", 2048, 2048), ("k, v", 512, 2048), ("gate, up", 8192, 2048),
                     ("down", 2048, 8192), ("output layer", 128256, 2048)],
    "tiny": [("q, o", 256, 256), ("k, v", 128, 256), ("gate, up", 680, 256), ("down", 256, 680),
             ("output layer", 2052, 256)],
}
ROWS = (120, 15)


def _median_ms(fn, x, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def _error(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def measure(out: int, inp: int, rows: int, rounds: int, reps: int) -> dict:
    import torch

    from mavsr_cli.model.step import _product

    g = torch.Generator().manual_seed(out + rows)
    w, x = torch.randn(out, inp, generator=g) * inp ** -0.5, torch.randn(rows, inp, generator=g)
    mkl, dnn = _product(w, None), _product(w, None, rounding=True)
    if not getattr(dnn, "onednn", False):
        raise SystemExit("oneDNN's product is not taken on this machine (x86-64 CPUs only)")
    mkl(x), dnn(x)  # warm-up
    t = {"mm": [], "onednn": []}
    for k in range(rounds):
        for name, fn in ((("mm", mkl), ("onednn", dnn)) if k % 2 == 0 else (("onednn", dnn), ("mm", mkl))):
            t[name].append(_median_ms(fn, x, reps))
    ref = x.double() @ w.double().t()
    return {"mm": statistics.median(t["mm"]), "onednn": statistics.median(t["onednn"]),
            "err_mm": _error(mkl(x), ref), "err_onednn": _error(dnn(x), ref)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", choices=["all", *SHAPES], default="all", help="one model's shapes only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch
    from _common import emit

    import mavsr_cli  # noqa: F401  (torchaudio guard)

    torch.set_num_threads(args.threads)
    lines = ["# A CPU beam step's products: torch.mm (MKL) against oneDNN's", "",
             f"{time.strftime('%Y-%m-%d')}, {_cpu()} ({platform.machine()}), {args.threads} threads, "
             f"torch {torch.__version__}; medians of {args.rounds} interleaved rounds of {args.reps} calls; "
             "error: largest difference from the float64 product over its largest value", ""]
    with torch.no_grad():
        for model, shapes in SHAPES.items():
            if args.shapes not in ("all", model):
                continue
            lines += [f"## {model}", "", "| product (out x in) | rows | torch.mm ms | oneDNN ms | mm / oneDNN | "
                      "error mm | error oneDNN |", "|---|---|---|---|---|---|---|"]
            for rows in ROWS:
                for name, out, inp in shapes:
                    r = measure(out, inp, rows, args.rounds, args.reps)
                    lines.append(f"| {name} ({out} x {inp}) | {rows} | {r['mm']:.3f} | {r['onednn']:.3f} | "
                                 f"{r['mm'] / r['onednn']:.2f}x | {r['err_mm']:.1e} | {r['err_onednn']:.1e} |")
                    print(lines[-1], file=sys.stderr, flush=True)
            lines.append("")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
