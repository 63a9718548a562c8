"""Assemble the AVSR model from its parts in numbered steps (design.md, "The model")."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..rates import Rates
from . import llm as llm_mod
from . import projector as proj
from .avsr import AVSRModel


def train_bf16(t, device_type: str) -> bool:
    """Whether training's matmuls run in bf16 (train.precision; auto: on a GPU)."""
    return t.precision == "bf16" or (t.precision == "auto" and device_type == "cuda")


def frozen_dtype(setting: str, bf16: bool) -> torch.dtype:
    """The dtype the frozen LLM is held in (model.frozen_dtype): auto follows the matmuls (`bf16`):
    bf16 weights are half the memory (2.5 GB instead of 5 for Llama-3.2-1B) and what bf16 autocast
    would cast them to anyway."""
    if setting == "auto":
        return torch.bfloat16 if bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def build_model(cfg: Config, audio_dim: int | None, video_dim: int | None, seed: int = 0,
                llm_path: str | None = None, rates: list[Rates] | None = None, llm=None,
                bf16: bool = False) -> AVSRModel:
    """Build the trainable AVSR model over a frozen LLM; encoder widths come from the feature cache.

    `llm_path` overrides `cfg.model.llm` where the recipe resolved it to a local directory.
    `rates` (default: the config's whole grid) are the configurations the model serves: only
    their projectors and adapters are made, so a single-pair baseline holds only its own.
    `llm`, a (model, tokenizer) pair, replaces loading (benchmarks build it on the meta device).
    `bf16`: the model's matmuls will run in bf16 (model.frozen_dtype auto then loads the LLM so).
    """
    m = cfg.model
    grid = list(rates) if rates else m.rate_grid()
    torch.manual_seed(seed)
    # 1. the frozen LLM and its tokenizer, through from_pretrained, in the dtype it is held in
    llm, tok = llm if llm is not None else llm_mod.load(llm_path or m.llm, frozen_dtype(m.frozen_dtype, bf16))
    width = llm.get_input_embeddings().weight.shape[1]
    # 2. LoRA adapters on the attention projections: MS one shared, SS one per configuration,
    #    MSS both (docs/method.md, Matryoshka training)
    names = llm_mod.all_adapters(m.lora.strategy, [r.tag for r in grid])
    llm = llm_mod.add_lora(llm, m.lora.rank, m.lora.alpha, m.lora.dropout, m.lora.targets, names)
    # 3. one projector per (modality, rate); configurations sharing a rate share it
    stack = m.compression == "stack"
    projectors = nn.ModuleDict()
    for r in grid:
        for modality, rate, dim in (("a", r.audio, audio_dim), ("v", r.video, video_dim)):
            if rate is None or proj.key(modality, rate) in projectors:
                continue
            in_dim = dim * (rate if stack else 1)
            projectors[proj.key(modality, rate)] = proj.Projector(in_dim, m.projector_hidden, width,
                                                                  m.projector_layernorm)
    # 4. the wrapper that builds the LLM input sequence and owns the modality markers
    return AVSRModel(llm, tok, projectors, m.resolved_prompt(), m.compression, grid, m.lora.strategy)
