"""Where a stage runs its models (`--device`): extract-features its encoders; decode, transcribe,
serve and bench the LLM and projectors, and the encoders they run on the fly.

`auto` is a GPU when torch sees one, else the CPU; `cuda` / `cuda:N` on a machine (or a torch
build) without one is refused in one line before any work, not left to fail at the first tensor.
"""

from __future__ import annotations

import re

import torch

from .errors import MavsrError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve(pref: str) -> torch.device:
    """The device `pref` names (auto: cuda when torch sees a GPU, else cpu)."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", pref)
    if m is None:  # torch.device would also take mps, xpu, meta, ... without asking whether one is here
        raise MavsrError(f"device must be {CHOICES}, got {pref!r}")
    if not torch.cuda.is_available():
        raise MavsrError(f"device {pref}: torch {torch.__version__} sees no CUDA GPU here (a CPU build, or no "
                         "driver); choose cpu or auto")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise MavsrError(f"device {pref}: torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return torch.device(pref)


def describe(dev: torch.device) -> str:
    """cpu, or the GPU's name (for reports)."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
