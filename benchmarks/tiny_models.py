"""What `mavsr tiny-models` pays per training step, and what batching saves.

Two steps, each measured both ways, interleaved in one run:
- the audio encoder's framewise pretraining step (8 utterances): the Whisper stem and layers run
  one utterance at a time and the outputs padded afterwards (mavsr 271c981), against one padded
  batch with an attention mask (`WhisperAudioEncoder.encode_mels`);
- the LLM warm-up step (32 examples): batches cut from the shuffled order, against batches of
  similar lengths (`length_batches`); the figure is per epoch, since the two cut the same
  examples into the same number of batches.
Inputs have the demo's shapes: log-mels of the synthetic corpus's utterance lengths (random
values: the cost does not depend on them), warm-up examples built from the grammar's sentences.

    python benchmarks/tiny_models.py [--reps 3] [--out FILE]
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
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.audio_encoder import WhisperAudioEncoder
from mavsr_cli.options import PROMPTS, TinyOptions
from mavsr_cli.stages.tiny_models import _padded, length_batches, warmup_sequence


def audio_steps(reps: int, n_batches: int) -> dict[str, list[float]]:
    """Seconds per utterance of one pretraining step, one-at-a-time vs batched, per repetition."""
    opt = TinyOptions()
    with tempfile.TemporaryDirectory() as tmp:
        path = WhisperAudioEncoder.tiny(Path(tmp) / "w", d_model=opt.audio_dim, layers=opt.audio_layers)
        enc = WhisperAudioEncoder.load(str(path), "fast")
    enc.encoder.requires_grad_(True).train()
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(38, 107, (n_batches * 8,), generator=g)  # video frames per utterance, as the demo's
    mels = [torch.randn(80, 4 * int(f), generator=g) for f in frames]  # 100 mel frames per second
    head = torch.nn.Linear(opt.audio_dim, 300)
    params = list(enc.encoder.parameters()) + list(head.parameters())
    sgd = torch.optim.SGD(params, lr=1e-6)

    def one_at_a_time(batch):
        outs = [enc.encode_mels([m])[0][0] for m in batch]
        return torch.nn.utils.rnn.pad_sequence(outs, batch_first=True)

    def batched(batch):
        return enc.encode_mels(batch)[0]

    ways = {"one utterance at a time": one_at_a_time, "one padded batch": batched}
    out: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(reps):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for b in range(n_batches):
                loss = head(fn(mels[8 * b:8 * b + 8])).logsumexp(-1).mean()
                sgd.zero_grad()
                loss.backward()
                sgd.step()
            out[name].append((time.perf_counter() - t0) / (8 * n_batches))
    return out


def lm_steps(reps: int, n_examples: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per epoch of warm-up steps and padded tokens per real token, random vs by length."""
    words = synth.vocabulary() + "transcribe speech and video to text .".split()
    opt = TinyOptions()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = llm_mod.load(str(llm_mod.tiny(Path(tmp) / "llm", words, hidden=opt.llm_hidden,
                                                   layers=opt.llm_layers)))
    model.requires_grad_(True).train()  # loaded frozen, as the trainer wants it; the warm-up trains it all
    rng = np.random.default_rng(0)
    texts = [synth.sentence(rng) for _ in range(n_examples)]
    examples = [warmup_sequence(tok, t, PROMPTS["av"], rng, synth.vocabulary()) for t in texts]
    g = torch.Generator().manual_seed(0)
    ways = {"shuffled order": [examples[i:i + 32] for i in range(0, len(examples), 32)],
            "similar lengths": length_batches(examples, 32, g)}
    real = sum(len(x) for x, _ in examples)
    padding = {w: sum(max(len(x) for x, _ in b) * len(b) for b in bs) / real for w, bs in ways.items()}
    sgd = torch.optim.SGD(model.parameters(), lr=1e-6)
    out: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(reps):
        for name, batches in ways.items():
            t0 = time.perf_counter()
            for batch in batches:
                ids, lab, mask = _padded(batch, tok.pad_token_id)
                loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
                sgd.zero_grad()
                loss.backward()
                sgd.step()
            out[name].append(time.perf_counter() - t0)
    return out, padding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions; each figure is their median")
    ap.add_argument("--audio-batches", type=int, default=12, help="pretraining steps of 8 utterances per repetition")
    ap.add_argument("--lm-examples", type=int, default=320, help="warm-up examples per repetition")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    audio = {k: statistics.median(v) for k, v in audio_steps(args.reps, args.audio_batches).items()}
    lm, padding = lm_steps(args.reps, args.lm_examples)
    lm = {k: statistics.median(v) for k, v in lm.items()}
    a0, a1 = audio.values()
    l0, l1 = lm.values()
    lines = [
        "# tiny-models: the cost of a pretraining step",
        "",
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; the demo's "
        f"sizes (TinyOptions); median of {args.reps} interleaved repetitions.",
        "",
        f"Audio encoder, framewise pretraining, {args.audio_batches} steps of 8 utterances (38-106 video "
        "frames each, as the demo's):",
        "",
        "| Whisper stem and layers run on | ms per utterance (forward + backward) |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v * 1000:.1f} |" for k, v in audio.items()]
    lines += [f"| speed-up | {a0 / a1:.2f}x |", "",
              f"LLM warm-up, {args.lm_examples} examples in batches of 32:", "",
              "| batches cut from | seconds | padded tokens per real token |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {padding[k]:.2f} |" for k, v in lm.items()]
    lines += [f"| speed-up | {l0 / l1:.2f}x | |"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
