"""Parameter counts per LoRA strategy for the paper-sized models, built on the meta device (no download).

The LLM is built from its published config with AutoModelForCausalLM.from_config, the Whisper
encoder from WhisperConfig, AV-HuBERT Large from mavsr's own module; projectors, LoRA adapters and
markers come from mavsr's `build_model`, exactly as `mavsr train` makes them. Nothing is allocated.

    total     everything a deployment holds: frozen encoders + LLM + every trained tensor
    trained   what `mavsr train` optimises and checkpoints (projectors, LoRA, modality markers)
    active    what one decode at one rate pair runs: encoders + LLM + one projector per modality +
              the configuration's adapters (MS: shared; SS: its own; MSS: both)
A "separate models" row is the paper's baseline: one single-pair model per configuration.

    python benchmarks/param_counts.py [--setting lrs3|strong|all] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from _common import emit

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli import config as C
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.avhubert import AVHubertConfig, AVHubertVideoEncoder
from mavsr_cli.model.build import build_model
from mavsr_cli.rates import Rates

# published shapes (model cards / config.json of the hub checkpoints)
LLAMA = {
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, tie_word_embeddings=False),
}
WHISPER = {"whisper-small": (768, 12, 12), "whisper-medium": (1024, 24, 16)}
# published totals, to check the meta-device builds against (millions)
PUBLISHED = {"Llama-3.2-1B": 1235.8, "Llama-3.2-3B": 3212.7, "Llama-3.1-8B": 8030.3}
SETTINGS = {  # name: (whisper, llm, LoRA rank); the paper's ASR/AVSR setting and its strongest one
    "lrs3": ("whisper-small", "Llama-3.2-1B", 64),
    "strong": ("whisper-medium", "Llama-3.1-8B", 64),
}


def n(params) -> int:
    return sum(p.numel() for p in params)


def build(setting: str, strategy: str, rates: list[Rates] | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel

    wname, lname, rank = SETTINGS[setting]
    d, layers, heads = WHISPER[wname]
    cfg = C.Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, llm=lname, lora=dataclasses.replace(cfg.model.lora, strategy=strategy, rank=rank)))
    tok = llm_mod.word_tokenizer(cfg.model.resolved_prompt().lower().replace(".", " .").split())
    with torch.device("meta"):
        llm = LlamaForCausalLM(LlamaConfig(vocab_size=128256, **LLAMA[lname])).eval().requires_grad_(False)
        whisper = WhisperModel(WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                                             encoder_ffn_dim=4 * d, decoder_layers=1, decoder_attention_heads=heads,
                                             num_mel_bins=80)).encoder
        video = AVHubertVideoEncoder(AVHubertConfig())
        model = build_model(cfg, d, video.dim, rates=rates, llm=(llm, tok))
    return cfg, model, n(whisper.parameters()), n(video.parameters()), llm


def counts(setting: str, strategy: str) -> dict:
    cfg, model, n_audio, n_video, _ = build(setting, strategy)
    named = dict(model.named_parameters())
    trained = {k: p for k, p in named.items() if p.requires_grad}
    frozen = n(p for p in named.values() if not p.requires_grad)
    r = Rates(16, 5)
    adapters = llm_mod.adapters_for(strategy, r.tag)
    active_trained = n(p for k, p in trained.items()
                       if (k.startswith("projectors.") and k.split(".")[1] in (f"a{r.audio}", f"v{r.video}"))
                       or k == "markers"
                       or ("lora_" in k and any(f".{a}." in k for a in adapters)))
    lora = n(p for k, p in trained.items() if "lora_" in k)
    proj = n(p for k, p in trained.items() if k.startswith("projectors."))
    enc = n_audio + n_video
    return {"setting": setting, "strategy": strategy, "encoders": enc, "llm": frozen, "lora": lora,
            "projectors": proj, "trained": n(trained.values()), "total": enc + frozen + n(trained.values()),
            "active": enc + frozen + active_trained, "configurations": len(model.grid)}


def separate(setting: str) -> dict:
    """The baseline: one MS model per configuration, each with its own projectors and LoRA."""
    rows = []
    for r in C.Config().model.rate_grid():
        cfg, model, n_audio, n_video, _ = build(setting, "ms", rates=[r])
        named = dict(model.named_parameters())
        rows.append((n_audio + n_video, n(p for p in named.values() if not p.requires_grad),
                     n(p for p in named.values() if p.requires_grad)))
    enc, frozen, _ = rows[0]
    trained = sum(t for _, _, t in rows)
    return {"setting": setting, "strategy": "separate models", "encoders": enc, "llm": frozen,
            "lora": None, "projectors": None, "trained": trained, "total": enc + frozen + trained,
            "active": enc + frozen + rows[-1][2], "configurations": len(rows)}


def m(x) -> str:
    return "-" if x is None else f"{x / 1e6:,.1f}M"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="all", choices=["lrs3", "strong", "all"])
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args()
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    lines = []
    for s in settings:
        wname, lname, rank = SETTINGS[s]
        _, _, _, _, llm = build(s, "ms")
        llm_total = n(p for k, p in llm.named_parameters() if "lora_" not in k)  # peft injected in place
        lines.append(f"\n### {s}: {wname} encoder + AV-HuBERT Large + {lname}, LoRA r{rank} on q/v, "
                     f"rates audio {{4,16}} x video {{2,5}}, projector hidden 2048\n")
        lines.append(f"Meta-device check: {lname} base {llm_total / 1e6:,.1f}M parameters "
                     f"(published {PUBLISHED[lname]:,.1f}M).\n")
        _, _, n_audio, n_video, _ = build(s, "ms")
        lines.append(f"Encoders: {wname} encoder {n_audio / 1e6:,.1f}M, AV-HuBERT Large video encoder "
                     f"{n_video / 1e6:,.1f}M.\n")
        lines.append("| strategy | configs | encoders | LLM (frozen) | LoRA | projectors | trained | total | "
                     "active at (16,5) | active / single-pair model |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        rows = [counts(s, st) for st in ("ms", "ss", "mss")] + [separate(s)]
        single = rows[-1]["active"]
        for r in rows:
            lines.append(f"| {r['strategy']} | {r['configurations']} | {m(r['encoders'])} | {m(r['llm'])} | "
                         f"{m(r['lora'])} | {m(r['projectors'])} | {m(r['trained'])} | {m(r['total'])} | "
                         f"{m(r['active'])} | {r['active'] / single:.4f} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
