"""Training-time augmentation (paper.md, "Training recipe"), made to work with a feature cache.

Noise: babble (a mix of several training utterances of other speakers) or a user's noise file,
added at an SNR drawn from a set that includes "clean". Because the encoders are frozen and their
outputs cached, noisy audio has to be encoded at extract time: `extract-features` stores K seeded
augmented copies of every training utterance, and training draws one copy per utterance per epoch.
Time masking (audio up to 0.4 s in every second, video up to 10 of every 25 frames, as the
reference code does on the waveform and the frames) is applied to the cached features per step.
"""

from __future__ import annotations

import numpy as np
import torch


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """speech + noise scaled so that 10 log10(P_speech / P_noise) = snr_db; noise cut/tiled to length."""
    noise = fit_length(noise, len(speech))
    ps = float(np.mean(speech.astype(np.float64) ** 2))
    pn = float(np.mean(noise.astype(np.float64) ** 2))
    if ps == 0.0 or pn == 0.0:
        return speech.copy()
    scale = np.sqrt(ps / (pn * 10 ** (snr_db / 10)))
    return (speech + scale * noise).astype(np.float32)


def fit_length(x: np.ndarray, n: int, offset: int = 0) -> np.ndarray:
    """x tiled and cut to n samples, starting at `offset` (mod len(x))."""
    if len(x) == 0:
        return np.zeros(n, np.float32)
    reps = (offset + n) // len(x) + 1
    return np.tile(x, reps)[offset:offset + n]


def babble(sources: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of several utterances, each at a random offset and normalised to unit power."""
    out = np.zeros(n, np.float64)
    for s in sources:
        x = fit_length(s, n, int(rng.integers(0, max(1, len(s)))))
        p = np.sqrt(np.mean(x.astype(np.float64) ** 2)) or 1.0
        out += x / p
    return (out / max(1, len(sources))).astype(np.float32)


def pick_babble_sources(speakers: dict[str, str], target: str, k: int, rng: np.random.Generator) -> list[str]:
    """k utterance ids of speakers other than the target's (all utterances if only one speaker)."""
    pool = sorted(u for u, spk in speakers.items() if spk != speakers[target]) or sorted(u for u in speakers if u != target)
    if not pool:
        return []
    return [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def time_mask(x: torch.Tensor, lengths: torch.Tensor, window: int, stride: int, seeds: list[int]) -> torch.Tensor:
    """Zero random spans in each utterance: one span of up to `window` frames per `stride` frames of
    its true length (padding untouched). x (B, T, D) -> a masked copy. Row i draws from seeds[i]
    alone, so an utterance's mask does not depend on which batch or process it lands in."""
    x = x.clone()
    for i, n in enumerate(lengths.tolist()):
        g = torch.Generator().manual_seed(seeds[i])
        for _ in range(n // stride):
            w = int(torch.randint(0, window, (1,), generator=g))
            if w == 0 or n - w <= 0:
                continue
            t0 = int(torch.randint(0, n - w, (1,), generator=g))
            x[i, t0:t0 + w] = 0.0
    return x


def mask_features(feats: dict, seeds: list[int]) -> dict:
    """Time masking of a batch from the cache: audio (50 Hz) 0.4 s per second, video (25 Hz) 10 of 25 frames."""
    out = {}
    for m, (x, lens) in feats.items():
        window, stride = (20, 50) if m == "audio" else (10, 25)
        out[m] = (time_mask(x, lens, window, stride, [s * 2 + (m == "video") for s in seeds]), lens)
    return out
