"""Whisper on utterances shorter than 30 s: the faithful path (pad to 30 s) vs the fast path (true length).

Random-weight Whisper encoders with the shapes of whisper-tiny and whisper-small are built from
configs, saved with save_pretrained and loaded through mavsr's real loader. For each utterance
length both modes encode the same synthetic speech; we report the time per utterance, the speed-up
(measured side by side, interleaved), and how far the fast output is from the faithful one.

    python benchmarks/whisper_modes.py [--models tiny,small] [--seconds 2,5,10,20] [--reps 3] [--out FILE]
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

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli.model.audio_encoder import WhisperAudioEncoder

SHAPES = {  # (d_model, layers, heads) of the public checkpoints
    "tiny": (384, 4, 6),
    "base": (512, 6, 8),
    "small": (768, 12, 12),
}


def build(name: str, root: Path) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    d, n, h = SHAPES[name]
    torch.manual_seed(0)
    cfg = WhisperConfig(num_mel_bins=80, d_model=d, encoder_layers=n, decoder_layers=1, encoder_attention_heads=h,
                        decoder_attention_heads=h, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, vocab_size=64,
                        max_source_positions=1500, max_target_positions=64, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1)
    out = root / name
    WhisperModel(cfg).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated signal with noise: enough structure for the mel front end."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / 16000) / k for k in range(1, 12))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.1 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--seconds", default="2,5,10,20")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.models.split(","):
            path = build(name, Path(tmp))
            encs = {m: WhisperAudioEncoder.load(str(path), mode=m) for m in ("faithful", "fast")}
            for sec in [float(s) for s in args.seconds.split(",")]:
                wav = speech_like(sec)
                times = {"faithful": [], "fast": []}
                outs = {}
                for m in ("faithful", "fast"):  # warm-up
                    outs[m] = encs[m](wav)
                for _ in range(args.reps):  # interleaved, so drift hits both modes alike
                    for m in ("faithful", "fast"):
                        t0 = time.perf_counter()
                        encs[m](wav)
                        times[m].append(time.perf_counter() - t0)
                a, b = outs["faithful"], outs["fast"]
                assert a.shape == b.shape, (a.shape, b.shape)
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
                rel = ((a - b).norm() / a.norm()).item()
                tf, tq = statistics.median(times["faithful"]), statistics.median(times["fast"])
                rows.append((name, sec, a.shape[0], tf * 1000, tq * 1000, tf / tq, rel, cos.mean().item(),
                             cos.min().item()))
                print(f"{name:6s} {sec:5.1f}s  faithful {tf * 1000:8.1f} ms  fast {tq * 1000:8.1f} ms  "
                      f"x{tf / tq:5.1f}  rel.diff {rel:.3f}  cos mean {cos.mean():.3f} min {cos.min():.3f}", flush=True)
    head = ("| model (random weights) | audio | tokens | faithful ms | fast ms | speed-up | rel. L2 diff | "
            "cos mean | cos min |\n|---|---|---|---|---|---|---|---|---|\n")
    table = head + "".join(f"| whisper-{n} shape | {s:.0f} s | {t} | {f:.1f} | {q:.1f} | {x:.1f}x | {r:.3f} | "
                           f"{cm:.3f} | {cn:.3f} |\n" for n, s, t, f, q, x, r, cm, cn in rows)
    cpu = platform.processor() or platform.machine()
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
           f"median of {args.reps} interleaved runs per cell")
    print(table + "\n" + env)
    if args.out:
        args.out.write_text(table + "\n" + env + "\n")


if __name__ == "__main__":
    main()
