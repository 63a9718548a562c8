"""The feature cache: native-rate encoder outputs (audio 50 Hz, video 25 Hz), before compression.

dump/<encoders-tag>/<split>/
    shard-NNNNN.safetensors   tensors "<id>/audio" (Ta, Da) and "<id>/video" (Tv, Dv), fp16;
                              metadata "ids" (JSON list) so a rerun can verify and reuse a shard
                              train split with augment.noisy_copies K: also "<id>/audio#k", "<id>/video#k"
                              (k < K), the features of the k-th seeded augmented copy
    index.jsonl               {"id", "shard", "audio_len", "video_len"[, "copies": [{"snr": dB|null}, ...]]}
    provenance.json           encoders, their config and weights hashes, dims
One cache serves every rate configuration: compression happens at load time. The cache's names
(`<encoders-tag>`, the split dir of augmented and noisy copies) are made here and nowhere else;
a noisy condition's own name comes from rates.condition_name, which decode dirs share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from .config import STREAMS, Config
from .errors import MavsrError
from .fsutil import verify_checksum
from .recipe import Recipe, resolve_model


def file_digest(path: Path, limit: int = 64 << 20) -> str:
    """sha256 of a file (of its first and last `limit` bytes for very large files, plus its size)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * limit:
            h.update(f.read())
        else:
            h.update(f.read(limit))
            f.seek(size - limit)
            h.update(f.read(limit))
    return h.hexdigest()


def model_digest(path: str) -> str:
    """A hash of a model dir's config and weight files, or of the reference itself for hub ids."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin", ".pt"):
                h.update(f.name.encode())
                h.update(file_digest(f).encode())
    elif p.is_file():
        h.update(file_digest(p).encode())
    else:
        h.update(path.encode())
    return h.hexdigest()


class FeatureStore:
    """Read access to one split of the cache."""

    def __init__(self, d: Path) -> None:
        self.dir = Path(d)
        idx = self.dir / "index.jsonl"
        if not (self.dir / ".done").is_file() or not idx.is_file():
            raise MavsrError(f"no finished feature cache at {self.dir}: run `mavsr extract-features` first")
        self.entries = {}
        for line in idx.read_text().splitlines():
            e = json.loads(line)
            self.entries[e["id"]] = e
        self.provenance = json.loads((self.dir / "provenance.json").read_text())
        self._handles: dict[str, object] = {}

    def ids(self) -> list[str]:
        return sorted(self.entries)

    def copies(self, uid: str) -> int:
        """How many augmented copies the cache holds for this utterance (0: the clean one only)."""
        return len(self.entries[uid].get("copies", []))

    def frames(self, uid: str) -> int:
        """Length in video frames (25 per second), from the index: for frame-capped batches."""
        e = self.entries[uid]
        return int(e["video_len"]) if "video_len" in e else (int(e["audio_len"]) + 1) // 2

    def lengths(self, uid: str) -> tuple[int, int]:
        """(audio frames at 50 Hz, video frames at 25 Hz) of an utterance, 0 for a stream not cached."""
        e = self.entries[uid]
        return int(e.get("audio_len", 0)), int(e.get("video_len", 0))

    def get(self, uid: str, modality: str, copy: int | None = None) -> torch.Tensor:
        """Features (T, D) of an utterance; `copy` k picks its k-th augmented copy."""
        e = self.entries[uid]
        h = self._handles.get(e["shard"])
        if h is None:
            path = self.dir / e["shard"]
            if not path.is_file():
                raise MavsrError(f"feature shard {path} is missing: re-run `mavsr extract-features --force`")
            verify_checksum(path, self.provenance.get("shards", {}).get(e["shard"]), "feature shard")
            try:
                h = self._handles[e["shard"]] = safe_open(str(path), framework="pt")
            except Exception as err:
                raise MavsrError(f"unreadable feature shard {path} ({err}): "
                                 "re-run `mavsr extract-features --force`") from None
        name = f"{uid}/{modality}" if copy is None else f"{uid}/{modality}#{copy}"
        return h.get_tensor(name).float()


def pad_batch(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """list of (T_i, D) -> (B, T, D) zero-padded (float32, on the first tensor's device), lengths (B,)."""
    lengths = torch.tensor([t.shape[0] for t in tensors])
    out = torch.zeros(len(tensors), int(lengths.max()), tensors[0].shape[1], device=tensors[0].device)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out, lengths


def batch_features(store: FeatureStore, ids: list[str], modality: str, copies: list[int | None] | None = None) -> dict:
    """The padded features of a batch: {"audio": ((B, T, D), (B,)), "video": ...} for the modality's streams."""
    feats = {}
    copies = copies or [None] * len(ids)
    for m in STREAMS[modality]:
        feats[m] = pad_batch([store.get(i, m, c) for i, c in zip(ids, copies, strict=True)])  # (B, T, D), (B,)
    return feats


def provenance(recipe: Recipe, cfg: Config) -> dict:
    """Everything that shapes the features: each encoder used, its settings and a hash of its weights."""
    a, v = cfg.audio_encoder, cfg.video_encoder
    use_a = cfg.model.modality in ("av", "a")
    use_v = cfg.model.modality in ("av", "v")
    audio = video = None
    if use_a:
        audio = {"path": a.path, "mode": a.mode, "digest": model_digest(resolve_model(recipe, a.path))}
        if a.normalize:  # named only when on, so caches made before the option keep their tags
            audio["normalize"] = True
        if a.fit_video and use_v:
            audio["fit_video"] = True
    if use_v:
        video = {"path": v.path, "crop": v.crop, "mean": v.mean, "std": v.std,
                 "digest": model_digest(resolve_model(recipe, v.path))}
    return {"audio": audio, "video": video}


def encoders_tag(prov: dict) -> str:
    """dump/<tag>: readable names plus a short hash of everything that shapes the features."""
    names = [os.path.basename(str(prov[m]["path"]).rstrip("/")) for m in ("audio", "video") if prov[m]]
    h = hashlib.sha256(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:8]
    return "_".join(names + [h])


def cache_split(cfg: Config, split: str, condition: str = "") -> str:
    """The dump subdir of a split: the train split with augmented copies gets its own, named by a
    hash of the augment settings (train-aug<hash>); a noisy condition (rates.condition_name) gets
    <split>-<condition> (e.g. test-snr0), so clean, augmented and noisy caches coexist."""
    if condition:
        return f"{split}-{condition}"
    if split != "train" or not cfg.augment.noisy_copies:
        return split
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg.augment), sort_keys=True).encode()).hexdigest()[:8]
    return f"train-aug{h}"
