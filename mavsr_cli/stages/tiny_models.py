"""Stage `tiny-models` (synthetic recipe only): small encoders and LLM, built from configs.

No pretrained encoders or LLM exist for the synthetic corpus, so this stage builds them and saves
each in its real on-disk format, to be loaded later through the same code as real models:
    writes models/whisper/   Whisper (WhisperConfig -> save_pretrained), frozen afterwards
           models/video/     the small lip encoder (config.json + model.safetensors)
           models/llm/       a small Llama + word-level tokenizer (save_pretrained), given a short
                             language-model warm-up on the training transcripts (design.md allows
                             it: a real Llama arrives knowing the language; ours has to learn it)
    reads  data/train/manifest.jsonl (the warm-up text)
The Matryoshka training afterwards keeps this LLM frozen and trains projectors + LoRA only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .. import manifest as mf
from ..datasets import synth
from ..model import llm as llm_mod
from ..model.audio_encoder import WhisperAudioEncoder
from ..model.video_encoder import SmallVideoEncoder
from ..progress import progress
from ..recipe import Recipe, is_done, staged_dir, write_provenance


@dataclass(frozen=True)
class TinyOptions:
    audio_dim: int = 128  # Whisper d_model
    audio_layers: int = 2  # Whisper encoder layers
    video_dim: int = 128  # lip encoder width
    video_layers: int = 2  # lip encoder transformer layers
    llm_hidden: int = 192  # Llama hidden size
    llm_layers: int = 2  # Llama layers
    lm_epochs: int = 8  # language-model warm-up epochs over the training transcripts
    prompt: str = "Transcribe speech and video to text. Transcribe speech to text. Transcribe video to text."
    seed: int = 0


def lm_warmup(path: Path, texts: list[str], prompts: list[str], epochs: int, seed: int, log=print) -> float:
    """Train the whole small LLM as a language model on `[BOS] prompt text [EOS]`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    seqs = [[tok.bos_token_id] + tok(p + " " + t, add_special_tokens=False).input_ids + [tok.eos_token_id]
            for t in texts for p in prompts[:1]]
    bs = 32
    steps = epochs * math.ceil(len(seqs) / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss_v = float("nan")
    for _ in progress(range(epochs), "LM warm-up"):
        order = torch.randperm(len(seqs), generator=g).tolist()
        for i in range(0, len(order), bs):
            batch = [seqs[j] for j in order[i:i + bs]]
            n = max(len(s) for s in batch)
            ids = torch.full((len(batch), n), tok.pad_token_id)
            lab = torch.full((len(batch), n), -100)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for k, s in enumerate(batch):
                ids[k, : len(s)] = torch.tensor(s)
                lab[k, : len(s)] = torch.tensor(s)
                mask[k, : len(s)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_v = loss.item()
    model.save_pretrained(path)
    log(f"tiny-models: LM warm-up done, final loss {loss_v:.3f}")
    return loss_v


def run(recipe: Recipe, opt: TinyOptions, force: bool = False, log=print) -> Path:
    out = recipe.root / "models"
    if is_done(out) and not force:
        log(f"tiny-models: {out} is done (use --force to rebuild)")
        return out
    texts = [u.text for u in mf.read(recipe.require_manifest("train"))]
    words = synth.vocabulary() + sorted({w for t in texts for w in t.split()}) + opt.prompt.lower().replace(".", " .").split()
    with staged_dir(out) as tmp:
        WhisperAudioEncoder.tiny(tmp / "whisper", d_model=opt.audio_dim, layers=opt.audio_layers, seed=opt.seed)
        SmallVideoEncoder.tiny(tmp / "video", seed=opt.seed + 1, dim=opt.video_dim, layers=opt.video_layers)
        llm_mod.tiny(tmp / "llm", words, hidden=opt.llm_hidden, layers=opt.llm_layers, seed=opt.seed + 2)
        if opt.lm_epochs > 0:
            prompts = [p.strip() + "." for p in opt.prompt.split(".") if p.strip()]
            lm_warmup(tmp / "llm", texts, prompts, opt.lm_epochs, opt.seed, log=log)
        write_provenance(tmp, yaml.safe_dump(opt.__dict__, sort_keys=False))
    log(f"tiny-models: wrote {out}")
    return out
