"""Parameter counts per LoRA strategy for the paper-sized models, built on the meta device (no download).

The LLM is built from its published config with AutoModelForCausalLM.from_config, the Whisper
encoder from WhisperConfig, AV-HuBERT Large from mavsr's own module; projectors, LoRA adapters and
markers come from mavsr's `build_model`, exactly as `mavsr train` makes them. Nothing is allocated.

    total     everything a deployment holds: frozen encoders + LLM + every trained tensor
    trained   what `mavsr train` optimises and checkpoints (projectors, LoRA, modality markers)
    active    what one decode at one rate pair runs: encoders + LLM + one projector per modality +
              the configuration's adapters (MS: shared; SS: its own; MSS: both)
A "separate models" row is the paper's baseline: one single-pair model per configuration.

The settings are the shipped LRS3 configs, read as `mavsr train` reads them: `avsr_ms` (the authors'
code: Whisper-medium.en, projector LayerNorm) and `table1` (the paper's Table 1: Whisper-small),
and `strong`, Table 1's config with Whisper-medium and Llama-3.1-8B (the paper's strongest).

    python benchmarks/param_counts.py [--setting avsr_ms|table1|strong|all] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from _common import emit

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli import config as C
from mavsr_cli.model import llm as llm_mod
from mavsr_cli.model.meta import PUBLISHED_M as PUBLISHED
from mavsr_cli.model.meta import build_on_meta
from mavsr_cli.rates import Rates

CONF = Path(__file__).resolve().parents[1] / "recipes/lrs3/conf"
SETTINGS = {  # name: (config file, (audio encoder, LLM) replacing the config's, or None)
    "avsr_ms": (CONF / "avsr_ms.yaml", None),
    "table1": (CONF / "table1_avsr_ms.yaml", None),
    "strong": (CONF / "table1_avsr_ms.yaml", ("openai/whisper-medium", "meta-llama/Llama-3.1-8B")),
}


def config(setting: str) -> C.Config:
    path, swap = SETTINGS[setting]
    cfg = C.load(path)
    if swap:
        cfg = dataclasses.replace(cfg, audio_encoder=dataclasses.replace(cfg.audio_encoder, path=swap[0]),
                                  model=dataclasses.replace(cfg.model, llm=swap[1]))
    return cfg


def names(cfg: C.Config) -> tuple[str, str]:
    """(Whisper, LLM) as the report names them."""
    return cfg.audio_encoder.path.split("/")[-1], cfg.model.llm.split("/")[-1]


def n(params) -> int:
    return sum(p.numel() for p in params)


def build(setting: str, strategy: str, rates: list[Rates] | None = None):
    cfg = C.with_lora_strategy(config(setting), strategy)
    model, enc = build_on_meta(cfg, rates)
    return cfg, model, enc["audio"], enc["video"], model.llm


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
    for r in config(setting).model.rate_grid():
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
    ap.add_argument("--setting", default="all", choices=[*SETTINGS, "all"])
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    args = ap.parse_args()
    settings = list(SETTINGS) if args.setting == "all" else [args.setting]
    lines = []
    for s in settings:
        cfg = config(s)
        (wname, lname), mc = names(cfg), cfg.model
        _, _, _, _, llm = build(s, "ms")
        llm_total = n(p for k, p in llm.named_parameters() if "lora_" not in k)  # peft injected in place
        lines.append(f"\n### {s} ({SETTINGS[s][0].name}{' with ' + wname + ', ' + lname if SETTINGS[s][1] else ''}): "
                     f"{wname} encoder + AV-HuBERT Large + {lname}, LoRA r{mc.lora.rank} on "
                     f"{'/'.join(t[0] for t in mc.lora.targets)}, rates audio {{{','.join(map(str, mc.audio_rates))}}} "
                     f"x video {{{','.join(map(str, mc.video_rates))}}}, projector hidden {mc.projector_hidden}"
                     f"{' + LayerNorm' if mc.projector_layernorm else ''}\n")
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
