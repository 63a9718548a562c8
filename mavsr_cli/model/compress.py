"""Token compression by rate r along time, respecting each utterance's true length.

docs/method.md, Pipeline 3: average pooling of r consecutive tokens (or stacking them along the feature
axis); a trailing partial group is dropped. Unlike the reference code, padding never mixes into
a real token: groups are formed inside each utterance's length, and an utterance shorter than r
still yields one token (the mean of what it has).
"""

from __future__ import annotations

import torch

from ..rates import pooled_length


def compress(x: torch.Tensor, lengths: torch.Tensor, rate: int, mode: str = "avg"):
    """x (B, T, D), lengths (B,) -> (y (B, T', D or D*rate), out_lengths (B,)).

    Positions at or beyond out_lengths in y are zeros.
    """
    b, t, d = x.shape
    out_len = pooled_length(lengths, rate)  # (B,)
    groups = max(1, -(-t // rate))
    pad = groups * rate - t
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    x = x.reshape(b, groups, rate, d)  # (B, T', r, D)
    pos = torch.arange(groups * rate, device=x.device).reshape(1, groups, rate)
    real = (pos < lengths.reshape(b, 1, 1)).to(x.dtype)  # (B, T', r) frame is inside the utterance
    keep = (torch.arange(groups, device=x.device)[None] < out_len[:, None]).to(x.dtype)  # (B, T')
    if mode == "avg":
        y = (x * real[..., None]).sum(2) / real.sum(2).clamp(min=1)[..., None]
    elif mode == "stack":
        y = (x * real[..., None]).reshape(b, groups, rate * d)
    else:
        raise ValueError(f"unknown compression mode {mode!r}")
    y = y * keep[..., None]
    tmax = int(out_len.max())
    return y[:, :tmax], out_len
