"""Peak memory of one training step at Llama-3.2-1B width: logits everywhere vs only where the loss is.

A Llama of Llama-3.2-1B's width and vocabulary (2048 wide, 128,256 tokens, tied embeddings) cut to
`--layers` layers (the logits do not depend on the depth), random weights built from the config;
Whisper-small-wide audio features of `--seconds` s per utterance, ASR Matryoshka at rates {4, 16},
batch `--batch`, 30 transcript tokens each. Each variant runs in a fresh process; the figure is the
growth of the process's peak resident memory (VmHWM, reset before the step) over one forward +
backward, the weights already loaded.

  full   the output layer over every position, as mavsr computed the loss before (B, L, V) per configuration
  kept   the output layer only at the transcript and EOS positions (N, V), what `mavsr train` does now

    python benchmarks/logits_memory.py [--layers 1] [--batch 4] [--seconds 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _full_logits_ce(self, emb, mask, lab):
    """The loss as mavsr computed it before: logits at every position."""
    import torch

    logits = self.llm(inputs_embeds=emb, attention_mask=mask).logits[:, :-1]  # (B, L-1, V)
    gold = lab[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), gold.reshape(-1),
                                             ignore_index=-100, reduction="none").view(gold.shape)


def worker(variant: str, layers: int, batch: int, seconds: float) -> dict:
    import torch
    from _common import reset_peak, status_kb

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE.parents[1]))
    import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
    from mavsr_cli import config as C
    from mavsr_cli.model import avsr
    from mavsr_cli.model import llm as llm_mod
    from mavsr_cli.model.build import build_model
    from mavsr_cli.model.meta import LLAMA

    if variant == "full":
        avsr.AVSRModel._token_ce = _full_logits_ce
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(LLAMA["Llama-3.2-1B"], num_hidden_layers=layers)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=128256, **shape)).eval().requires_grad_(False)
    tok = llm_mod.word_tokenizer("transcribe speech to text .".split() + [f"w{i}" for i in range(100)])
    cfg = C.from_dict({"model": {"modality": "a", "audio_rates": [4, 16], "lora": {"dropout": 0.0}}})
    model = build_model(cfg, 768, None, llm=(lm, tok))
    model.train()
    t = int(50 * seconds)
    feats = {"audio": (torch.randn(batch, t, 768), torch.full((batch,), t))}
    targets = [list(range(10, 40)) for _ in range(batch)]
    before = reset_peak()
    t0 = time.perf_counter()
    ce = model.ce_sums(feats, cfg.model.rate_grid(), targets)
    torch.stack(ce).sum().backward()
    peak = status_kb("VmHWM")
    return {"variant": variant, "step_peak_mb": (peak - before) / 1024, "seconds": time.perf_counter() - t0,
            "loss": [float(x) for x in ce]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.layers, a.batch, a.seconds)))
        return
    res = {}
    for v in ("full", "kept"):
        r = subprocess.run([sys.executable, "-W", "ignore", str(HERE), "--worker", v, "--layers", str(a.layers),
                            "--batch", str(a.batch), "--seconds", str(a.seconds)], capture_output=True, text=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2"))
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        res[v] = json.loads(r.stdout.strip().splitlines()[-1])
    f, k = res["full"], res["kept"]
    same = all(abs(x - y) < 1e-3 * max(1, abs(x)) for x, y in zip(f["loss"], k["loss"], strict=True))
    positions = a.batch * (int(50 * a.seconds) // 4 + int(50 * a.seconds) // 16 + 2 * 40)
    lines = [f"# Training-step memory at Llama-3.2-1B width ({time.strftime('%Y-%m-%d')})", "",
             f"CPU, {a.layers} of 16 layers, vocabulary 128,256, batch {a.batch}, {a.seconds:g} s of audio, rates "
             "{4, 16} (2 configurations), 30 transcript tokens + EOS each; peak resident memory growth over one "
             "forward + backward, each variant in its own process.", "",
             "| variant | step peak (MB) | step time (s) |", "|---|---|---|",
             f"| full logits | {f['step_peak_mb']:.0f} | {f['seconds']:.1f} |",
             f"| logits only where the loss is | {k['step_peak_mb']:.0f} | {k['seconds']:.1f} |", "",
             f"- saved: {f['step_peak_mb'] - k['step_peak_mb']:.0f} MB "
             f"({(f['step_peak_mb'] - k['step_peak_mb']) / f['step_peak_mb']:.0%} of the step's peak)",
             f"- the logits of about {positions} positions x 128,256 x 4 bytes = "
             f"{positions * 128256 * 4 / 2**20:.0f} MB per copy (logits, their log-softmax and gradient) "
             f"become {a.batch * 31 * 2} rows",
             f"- losses equal: {same} ({f['loss']} vs {k['loss']})"]
    from _common import emit

    emit(lines, a.out)


if __name__ == "__main__":
    main()
