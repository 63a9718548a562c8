"""Where `mavsr prepare synth` spends its time, per utterance and per step of the generator.

The steps one synthesis worker runs for each utterance, timed one by one on the same sentences:
espeak-ng (in its forked child), the rest of `synthesize` (resampling, lip track, mouth
rendering), `face_video` (the drawn face, its motion, the warp), and `write_av` (H.264 + AAC).
The steps are interleaved per utterance and each figure is the median over the repetitions.
`prepare` also runs the `prepare lrs3` code on the result (decode, align, crop, write the
ROI); that is not in this table.

    python benchmarks/prepare_synth.py [--utts 12] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli.datasets import synth
from mavsr_cli.media import write_av
from mavsr_cli.tts import Espeak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utts", type=int, default=12, help="sentences per repetition")
    ap.add_argument("--reps", type=int, default=3, help="repetitions; each figure is their median")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as in prepare's workers
    rng0 = np.random.default_rng(1)
    texts = [synth.sentence(rng0) for _ in range(args.utts)]
    speakers = [synth.make_speaker(0, i) for i in range(4)]
    steps = ("espeak-ng", "synthesize (rest)", "face_video", "write_av")
    per_rep: dict[str, list[float]] = {s: [] for s in steps}
    frames_total = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            t = dict.fromkeys(steps, 0.0)
            for i, text in enumerate(texts):
                spk = speakers[i % len(speakers)]
                t0 = time.perf_counter()
                Espeak.get().say_isolated(text, voice=spk.voice, rate=spk.rate, pitch=spk.pitch,
                                          pitch_range=spk.pitch_range)
                t1 = time.perf_counter()
                u = synth.synthesize(text, spk, np.random.default_rng([rep, i]))  # espeak again inside
                t2 = time.perf_counter()
                frames, _ = synth.face_video(u.frames, spk, np.random.default_rng([rep, i]))
                t3 = time.perf_counter()
                write_av(Path(tmp) / f"{i}.mp4", frames, u.audio)
                t4 = time.perf_counter()
                t["espeak-ng"] += t1 - t0
                t["synthesize (rest)"] += max((t2 - t1) - (t1 - t0), 0.0)
                t["face_video"] += t3 - t2
                t["write_av"] += t4 - t3
                if rep == 0:
                    frames_total += len(frames)
            for s in steps:
                per_rep[s].append(t[s] / len(texts))
    med = {s: statistics.median(v) for s, v in per_rep.items()}
    total = sum(med.values())
    lines = [
        "# prepare synth: time per utterance by step",
        "",
        f"{platform.machine()}, {torch.get_num_threads()} torch thread (as a prepare worker), "
        f"torch {torch.__version__}; "
        f"{args.utts} sentences of 4 speakers, {frames_total / args.utts:.0f} frames each on average; "
        f"median of {args.reps} repetitions.",
        "",
        "| step | ms per utterance | share |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {med[s] * 1000:.1f} | {med[s] / total:.0%} |" for s in steps]
    lines += [f"| total (one worker) | {total * 1000:.1f} | |"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
