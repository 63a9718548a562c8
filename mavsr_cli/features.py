"""The feature cache: native-rate encoder outputs (audio 50 Hz, video 25 Hz), before compression.

dump/<encoders-tag>/<split>/
    shard-NNNNN.safetensors   tensors "<id>/audio" (Ta, Da) and "<id>/video" (Tv, Dv), fp16;
                              metadata "ids" (JSON list) so a rerun can verify and reuse a shard
                              train split with augment.noisy_copies K: also "<id>/audio#k", "<id>/video#k"
                              (k < K), the features of the k-th seeded augmented copy
    index.jsonl               {"id", "shard", "audio_len", "video_len"[, "copies": [{"snr": dB|null}, ...]]}
    provenance.json           encoders, their config and weights hashes, dims
One cache serves every rate configuration: compression happens at load time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MavsrError
from .fsutil import verify_checksum


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
                raise MavsrError(f"unreadable feature shard {path} ({err}): re-run `mavsr extract-features --force`") from None
        name = f"{uid}/{modality}" if copy is None else f"{uid}/{modality}#{copy}"
        return h.get_tensor(name).float()


def pad_batch(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """list of (T_i, D) -> (B, T, D) zero-padded, lengths (B,)."""
    lengths = torch.tensor([t.shape[0] for t in tensors])
    out = torch.zeros(len(tensors), int(lengths.max()), tensors[0].shape[1])
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t
    return out, lengths
