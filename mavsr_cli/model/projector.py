"""Per-(modality, rate) projector into the LLM's embedding space (docs/method.md, Pipeline 4)."""

from __future__ import annotations

from torch import nn


class Projector(nn.Sequential):
    """Linear(in -> hidden) -> ReLU -> Linear(hidden -> llm width) [-> LayerNorm]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layernorm: bool = False) -> None:
        layers = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)]
        if layernorm:
            layers.append(nn.LayerNorm(out_dim))
        super().__init__(*layers)


def key(modality: str, rate: int) -> str:
    """ModuleDict key: configurations sharing a rate share its projector."""
    return f"{modality}{rate}"
