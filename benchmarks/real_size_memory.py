"""Memory of a training step and a decode at Llama-3.2-1B size: frozen weights in fp32 or bf16, the
Matryoshka backward joint or per configuration (issue 22, items 3-4).

The LLM is Llama-3.2-1B's shape (2048 wide, 128,256-token vocabulary, tied embeddings) cut to each
of `--layers` layers, random weights saved in bf16 as the released checkpoint is, and loaded through
`build_model` (transformers' from_pretrained) as `mavsr train` loads it; the features have
Whisper-small's width (768) and AV-HuBERT Large's (1024). AVSR at rates {4, 16} x {2, 5}
(4 configurations), LoRA rank 64, projectors 2048 wide, batch `--batch` of `--seconds` s, 30
transcript tokens each. Each variant runs in its own process; figures are the parameters' bytes, and
resident memory (after loading, every page read, over the process before it; step and decode: the
growth of the peak, reset before).

  before       model.frozen_dtype float32, train.backward joint (5631a68's settings; since 5498b1a
               a joint MS step runs its configurations merged in one LLM pass, model/merged.py)
  bf16         frozen weights in bf16 (bf16 autocast), joint backward
  per_config   float32 weights, the backward configuration by configuration
  after        bf16 and per configuration (mavsr's default on a GPU; on CPU auto keeps float32)

Run on CPU here (no GPU lent): the code path is the GPU's, the kernels are not. The figure for all
16 layers is extrapolated from the per-layer slope between the measured depths.

    python benchmarks/real_size_memory.py [--layers 1,2] [--batch 4] [--seconds 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
VARIANTS = {"before": ("float32", "joint"), "bf16": ("bfloat16", "joint"),
            "per_config": ("float32", "per_config"), "after": ("bfloat16", "per_config")}
FULL_LAYERS = 16  # Llama-3.2-1B


def save_llm(out: Path, layers: int) -> Path:
    """A random Llama-3.2-1B-shaped LM with `layers` layers and a 128,256-word tokenizer, saved in bf16."""
    import torch

    sys.path.insert(0, str(HERE.parents[1]))
    import mavsr_cli  # noqa: F401, I001  (torchaudio guard before transformers)
    from mavsr_cli.model import llm as llm_mod
    from mavsr_cli.model.meta import LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = llm_mod.word_tokenizer([f"w{i}" for i in range(128256 - 9)] + "transcribe speech and video to text".split())
    v = tok.get_vocab()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(v), bos_token_id=v["<s>"], eos_token_id=v["</s>"], pad_token_id=v["<pad>"],
                      **dict(LLAMA["Llama-3.2-1B"], num_hidden_layers=layers))
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def worker(variant: str, llm_dir: str, batch: int, seconds: float) -> dict:
    import torch
    from _common import reset_peak, status_kb

    torch.set_num_threads(2)
    sys.path.insert(0, str(HERE.parents[1]))
    import mavsr_cli  # noqa: F401
    from mavsr_cli import config as C
    from mavsr_cli.decoding import generate
    from mavsr_cli.model.build import build_model
    from mavsr_cli.rates import Rates
    from mavsr_cli.train_loop import MatryoshkaLoss, matryoshka_backward

    dtype, backward = VARIANTS[variant]
    cfg = C.from_dict({"model": {"frozen_dtype": dtype, "lora": {"dropout": 0.0}},
                       "train": {"precision": "bf16" if dtype == "bfloat16" else "fp32", "backward": backward}})
    base = status_kb("VmRSS")
    model = build_model(cfg, 768, 1024, llm_path=llm_dir)
    for p in model.parameters():  # from_pretrained maps a bf16 file lazily: read every page before measuring
        p.sum()
    weights = status_kb("VmRSS") - base
    param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    g = torch.Generator().manual_seed(0)
    ta, tv = int(50 * seconds), int(25 * seconds)
    feats = {"audio": (torch.randn(batch, ta, 768, generator=g), torch.full((batch,), ta)),
             "video": (torch.randn(batch, tv, 1024, generator=g), torch.full((batch,), tv))}
    targets = [list(range(10, 40)) for _ in range(batch)]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext
    engine = MatryoshkaLoss(model.train(), model.grid, packed=False)
    before, t0 = reset_peak(), time.perf_counter()
    ce = matryoshka_backward(engine, feats, targets, len(model.grid), 1.0, backward == "per_config", autocast)
    step = {"peak_mb": (status_kb("VmHWM") - before) / 1024, "s": time.perf_counter() - t0}
    model.zero_grad(set_to_none=True)
    before, t0 = reset_peak(), time.perf_counter()
    with torch.inference_mode():
        hyps, n_in = generate(model.eval(), feats, Rates(16, 5), 8, beam=4)
    decode = {"peak_mb": (status_kb("VmHWM") - before) / 1024, "s": time.perf_counter() - t0}
    return {"variant": variant, "weights_mb": weights / 1024, "param_mb": param_mb, "step": step, "decode": decode,
            "loss": [float(x) for x in ce], "tokens_in": n_in}


def _run(variant: str, llm_dir: Path, a) -> dict:
    r = subprocess.run([sys.executable, "-W", "ignore", str(HERE), "--worker", variant, "--llm", str(llm_dir),
                        "--batch", str(a.batch), "--seconds", str(a.seconds)], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2"))
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _at16(res: dict, layers: list[int], v: str, key) -> float:
    """The figure at 16 layers, from the per-layer slope between the shallowest and deepest runs."""
    lo, hi = layers[0], layers[-1]
    y0, y1 = key(res[lo][v]), key(res[hi][v])
    return y1 + (y1 - y0) / (hi - lo) * (FULL_LAYERS - hi) if hi > lo else y1


def report(res: dict, layers: list[int], a) -> list[str]:
    deep = layers[-1]
    lines = [f"# Memory at Llama-3.2-1B size: frozen dtype and the Matryoshka backward ({time.strftime('%Y-%m-%d')})",
             "", f"CPU ({os.cpu_count()} cores; no GPU lent), torch {_torch_version()}. Llama-3.2-1B shape at "
             f"{', '.join(map(str, layers))} of 16 layers (random weights, bf16 on disk), features 768 (audio) and "
             f"1024 (video) wide, AVSR rates {{4, 16}} x {{2, 5}} = 4 configurations, batch {a.batch} of "
             f"{a.seconds:g} s, 30 transcript tokens each; decode: beam 4, 8 new tokens at (16, 5). MB of resident "
             "memory; each variant in its own process.", "",
             f"| variant | frozen | backward | parameters ({deep} layers) | resident after loading | step peak | "
             "step s | decode peak | decode s | parameters, 16 layers | step peak, 16 layers (est.) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, (dtype, backward) in VARIANTS.items():
        if v not in res[deep]:
            continue
        r = res[deep][v]
        lines.append(f"| {v} | {dtype} | {backward} | {r['param_mb']:.0f} | {r['weights_mb']:.0f} | "
                     f"{r['step']['peak_mb']:.0f} | {r['step']['s']:.1f} | {r['decode']['peak_mb']:.0f} | "
                     f"{r['decode']['s']:.1f} | {_at16(res, layers, v, lambda x: x['param_mb']):.0f} | "
                     f"{_at16(res, layers, v, lambda x: x['step']['peak_mb']):.0f} |")
    if set(res[deep]) != set(VARIANTS):
        return lines + ["", f"- only {', '.join(res[deep])} were run (--variants)"]
    b, f = res[deep]["before"], res[deep]["after"]
    lines += ["", f"- parameters: {f['param_mb'] / b['param_mb']:.2f}x of before; step peak: "
              f"{f['step']['peak_mb'] / b['step']['peak_mb']:.2f}x (after / before), per configuration alone "
              f"{res[deep]['per_config']['step']['peak_mb'] / b['step']['peak_mb']:.2f}x, bf16 alone "
              f"{res[deep]['bf16']['step']['peak_mb'] / b['step']['peak_mb']:.2f}x",
              f"- losses, before vs per_config (float32): {b['loss']} vs {res[deep]['per_config']['loss']}; "
              f"bf16: {f['loss']}"]
    return lines


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,2", help="comma-separated depths to measure (the last is reported)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated variants to run (the bf16 ones need a CPU with AVX-512: on AVX2 alone "
                         "PyTorch's bf16 matmuls are about 100x slower than float32's)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--llm", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.llm, a.batch, a.seconds)))
        return
    layers = sorted(int(x) for x in a.layers.split(","))
    res: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in layers:
            llm_dir = save_llm(Path(tmp) / f"llm{n}", n)
            res[n] = {v: _run(v, llm_dir, a) for v in VARIANTS if v in a.variants.split(",")}
    from _common import emit

    emit(report(res, layers, a), a.out)


if __name__ == "__main__":
    main()
