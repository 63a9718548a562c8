"""`--shard i/N`: one worker's share of a job that N workers split (prepare, extract-features, decode).

Each stage takes every N-th unit of its work (utterances, shard files, batches) starting at i, so
N processes on N machines fill one output dir; a run without --shard then merges what they wrote.
"""

from __future__ import annotations

from .errors import MavsrError

Shard = tuple[int, int]  # (i, N): worker i of N


def parse_shard(spec: str | None) -> Shard | None:
    """'i/N' -> (i, N) with 0 <= i < N; None stays None."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise MavsrError(f"--shard must look like i/N (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise MavsrError(f"--shard {spec}: need 0 <= i < N")
    return i, n
