"""Every random stream mavsr draws, derived in one place from the user's seed and names.

A stream's seed is a function of what it is for (an utterance id, a step, an epoch), never of
the order work happens in, so shards, processes, batch sizes and resumed runs draw the same
numbers. Changing a formula here changes corpora, caches and trained weights: each one is kept
as it was first written.
"""

from __future__ import annotations

import hashlib
import zlib

_EPOCH_STREAMS = {"batches": 1000, "copies": 7919}  # multipliers of the per-epoch streams


def of(*parts) -> list[int]:
    """A numpy seed sequence from any parts (ids, kinds, numbers): crc32 of each one's text."""
    return [zlib.crc32(str(p).encode()) for p in parts]


def step(seed: int, step: int, rank: int) -> int:
    """The torch seed of one training step on one process (dropout and the like)."""
    return (seed * 1_000_003 + step) * 64 + rank


def time_mask(seed: int, step_: int, index: int) -> int:
    """The time-mask seed of the `index`-th utterance of a global batch (whatever process takes it)."""
    return step(seed, step_, 0) * 4099 + index


def epoch(seed: int, epoch_: int, stream: str) -> int:
    """Per-epoch streams: "batches" (the batch plan) and "copies" (which augmented copy is read)."""
    return seed * _EPOCH_STREAMS[stream] + epoch_


def utterance(seed: int, split: str, speaker: str, index: int) -> list[int]:
    """The synthetic corpus: one stream per utterance, independent of how many are generated."""
    h = hashlib.sha256(f"{split}/{speaker}/{index}".encode()).digest()
    return [seed, int.from_bytes(h[:4], "little")]
