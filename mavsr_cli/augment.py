"""Training-time augmentation (docs/method.md, "Training recipe"), made to work with a feature cache.

Noise: babble (a mix of several training utterances of other speakers) or a user's noise file,
added at an SNR drawn from a set that includes "clean". Because the encoders are frozen and their
outputs cached, noisy audio has to be encoded at extract time: `extract-features` stores K seeded
augmented copies of every training utterance, and training draws one copy per utterance per epoch.
Time masking (audio up to 0.4 s in every second, video up to 10 of every 25 frames, as the
reference code does on the waveform and the frames) is applied to the cached features per step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from . import seeds
from .config import Config, snr_values
from .errors import MavsrError
from .media import normalise, random_crop, read_audio, video_crop
from .recipe import Recipe, resolve_model


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
    pool = sorted(u for u, spk in speakers.items() if spk != speakers[target])
    pool = pool or sorted(u for u in speakers if u != target)
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


class NoiseSource:
    """Noise for one utterance: babble of other speakers' training utterances, white noise, or a
    random segment of a noise file. Babble never uses the utterance itself or its speaker, and
    only the train split (test data never leaks into the noise)."""

    def __init__(self, recipe: Recipe, kind: str, babble_utts: int = 6) -> None:
        from functools import lru_cache

        self.kind, self.k = kind, babble_utts
        self.file = None
        if kind not in ("babble", "white"):
            path = Path(resolve_model(recipe, kind))
            if not path.is_file():
                raise MavsrError(f"noise file not found: {path} (--noise takes babble, white or a file)")
            self.file = read_audio(path)
        self.speakers: dict[str, str] = {}
        if kind == "babble":
            train = recipe.utterances("train")
            self.speakers = {u.id: u.speaker for u in train}
            by_id = {u.id: u for u in train}
            self.wav = lru_cache(maxsize=512)(lambda uid: read_audio(recipe.resolve_media(by_id[uid].audio)))

    def __call__(self, uid: str, speaker: str, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "white":
            return rng.standard_normal(n).astype(np.float32)
        if self.file is not None:
            return fit_length(self.file, n, int(rng.integers(0, max(1, len(self.file)))))
        pool = {u: s for u, s in self.speakers.items() if u != uid}
        pool[uid] = speaker
        srcs = pick_babble_sources(pool, uid, self.k, rng)
        if not srcs:
            raise MavsrError("babble noise needs other utterances in data/train")
        return babble([self.wav(x) for x in srcs], n, rng)

    def add(self, wav: np.ndarray, uid: str, speaker: str, snr: float) -> np.ndarray:
        """A noisy test condition: this utterance's noise, seeded by its id, at `snr` dB."""
        rng = np.random.default_rng(seeds.of("noise", uid, self.kind, snr))
        return mix_at_snr(wav, self(uid, speaker, len(wav), rng), snr)


class Augmenter:
    """The K seeded augmented copies of one training utterance (augment.* in the config):
    babble of other training speakers (or a noise file) at a drawn SNR, and a random mouth crop."""

    def __init__(self, recipe: Recipe, cfg: Config) -> None:
        self.cfg = cfg
        self.snrs = snr_values(cfg.augment)
        self.noise = NoiseSource(recipe, cfg.augment.noise_file or "babble", cfg.augment.babble_utts)

    def settings(self) -> dict:
        """The augment settings as JSON sees them (as written in provenance.json)."""
        return json.loads(json.dumps(dataclasses.asdict(self.cfg.augment)))

    def copy(self, u, k: int, wav: np.ndarray | None, frames: np.ndarray | None):
        """Copy k of utterance u: (snr drawn, noisy waveform or None, normalised crop or None)."""
        a = self.cfg.augment
        rng = np.random.default_rng(seeds.of(a.seed, u.id, k))
        snr = self.snrs[int(rng.integers(0, len(self.snrs)))]
        noisy = wav
        if wav is not None and snr is not None:
            noisy = mix_at_snr(wav, self.noise(u.id, u.speaker, len(wav), rng), snr)
        crop = None
        if frames is not None:
            vc = self.cfg.video_encoder
            crop = random_crop(frames, vc.crop, rng) if a.random_crop else video_crop(frames, vc.crop)
            crop = normalise(crop, vc.mean, vc.std)
        return snr, noisy, crop
