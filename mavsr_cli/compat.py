"""Optional torchaudio, imported defensively.

The torchaudio wheel on PyPI is a CUDA build: beside a CPU-only torch its compiled extension does
not load, and depending on the release the failure shows up at `import torchaudio` or later. An
installed-but-broken torchaudio also breaks `import transformers`, which probes for it. So this
module tries torchaudio once, in a guarded way; when it fails, it records why and blocks the name
in `sys.modules`, so every later `import torchaudio` (transformers' included) sees a clean
"not installed" instead of a crash. mavsr itself only uses torchaudio's pure-Python functions and
carries a fallback for each.

Import this module before transformers (mavsr_cli/__init__.py does).
"""

from __future__ import annotations

import math
import os
import sys

import torch

TORCHAUDIO = None  # the torchaudio.functional module, when usable
TORCHAUDIO_ERROR = ""  # why torchaudio is not used, when it is not


def _probe() -> None:
    global TORCHAUDIO, TORCHAUDIO_ERROR
    if os.environ.get("MAVSR_NO_TORCHAUDIO"):
        TORCHAUDIO_ERROR = "disabled by MAVSR_NO_TORCHAUDIO"
    else:
        try:
            import torchaudio.functional as F

            # exercise the one function we use, so a half-working install is caught here
            F.resample(torch.zeros(1, 320), 32000, 16000)
            TORCHAUDIO = F
            return
        except Exception as e:  # ImportError, OSError (undefined symbol), RuntimeError, ...
            TORCHAUDIO_ERROR = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
        del sys.modules[name]
    sys.modules["torchaudio"] = None  # makes `import torchaudio` raise ImportError cleanly


_probe()


def _sinc_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling (windowed sinc, Hann window), used when torchaudio is unusable."""
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    cutoff = min(orig, new) * 0.99
    width = 6  # zero crossings on each side
    half = math.ceil(width * orig / cutoff)
    idx = torch.arange(-half, orig + half, dtype=torch.float64)[None, :] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + idx  # (new, K)
    t = t * cutoff
    t = t.clamp(-width, width)
    window = torch.cos(t * math.pi / width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (cutoff / orig)
    kernel = kernel.to(x.dtype)  # (new, K)
    length = x.shape[-1]
    flat = torch.nn.functional.pad(x.reshape(-1, length), (half, half + orig))
    # A strided window view times the kernel: the same sums as conv1d(stride=orig), but without the
    # oneDNN primitive that conv1d caches per input length (about 1.5 MB each, measured: a
    # synthesis worker grew by that much per utterance).
    windows = flat.unfold(-1, kernel.shape[1], orig)  # (N, frames, K)
    y = (windows @ kernel.T).reshape(flat.shape[0], -1)  # (N, frames * new)
    out_len = math.ceil(new * length / orig)
    return y[:, :out_len].reshape(*x.shape[:-1], out_len)


def resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Resample the last axis from `orig` Hz to `new` Hz."""
    if orig == new:
        return x
    if TORCHAUDIO is not None:
        return TORCHAUDIO.resample(x, orig, new)
    return _sinc_resample(x, orig, new)
