"""Assemble the AVSR model from its parts in numbered steps (design.md, "The model")."""

from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..rates import Rates
from . import llm as llm_mod
from . import projector as proj
from .avsr import AVSRModel


def build_model(cfg: Config, audio_dim: int | None, video_dim: int | None, seed: int = 0,
                llm_path: str | None = None, rates: list[Rates] | None = None, llm=None) -> AVSRModel:
    """Build the trainable AVSR model over a frozen LLM; encoder widths come from the feature cache.

    `llm_path` overrides `cfg.model.llm` where the recipe resolved it to a local directory.
    `rates` (default: the config's whole grid) are the configurations the model serves: only
    their projectors and adapters are made, so a single-pair baseline holds only its own.
    `llm`, a (model, tokenizer) pair, replaces loading (benchmarks build it on the meta device).
    """
    m = cfg.model
    grid = list(rates) if rates else m.rate_grid()
    torch.manual_seed(seed)
    # 1. the frozen LLM and its tokenizer, through from_pretrained
    llm, tok = llm if llm is not None else llm_mod.load(llm_path or m.llm)
    width = llm.get_input_embeddings().weight.shape[1]
    # 2. LoRA adapters on the attention projections: MS one shared, SS one per configuration,
    #    MSS both (paper.md, Matryoshka training)
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
