"""Tiny models set as if trained, for the model and fast-path tests."""

import torch


def as_trained(m, seed: int = 1):
    """LoRA B drawn at random: it starts at zero, which would hide every difference an adapter makes."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def input_dependent(m):
    """Projectors and markers scaled up, so that hypotheses depend on the input, as a trained model's do."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("projectors.") or n == "markers":
                p.mul_(20.0)
    return m
