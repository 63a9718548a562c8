"""Utterance records and JSONL manifests (`data/<split>/manifest.jsonl`).

One line per utterance: {"id", "video", "audio", "text", "num_frames", "duration", "speaker"},
sorted by id. Media paths are absolute or relative to the recipe dir.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import MavsrError
from .fsutil import atomic_write_text


@dataclass(frozen=True)
class Utterance:
    id: str  # stable, unique, sortable
    video: str  # mp4 with the mouth ROI (and usually the audio)
    audio: str  # file holding the 16 kHz audio ('' for video-only data)
    text: str  # transcript
    num_frames: int  # video frames at 25 fps
    duration: float  # seconds
    speaker: str  # speaker id


_FIELDS = [f.name for f in fields(Utterance)]
_TYPES = {"id": str, "video": str, "audio": str, "text": str, "num_frames": int, "duration": (int, float),
          "speaker": str}


def write(path: Path, utts: list[Utterance]) -> None:
    ids = [u.id for u in utts]
    if len(set(ids)) != len(ids):
        raise MavsrError(f"duplicate utterance ids while writing {path}")
    lines = [json.dumps(asdict(u), ensure_ascii=False) for u in sorted(utts, key=lambda u: u.id)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read(path: Path) -> list[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise MavsrError(f"manifest not found: {path}")
    out, seen = [], set()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MavsrError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MavsrError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        missing = [k for k in _FIELDS if k not in rec]
        if missing:
            raise MavsrError(f"{path}:{n}: missing field(s) {', '.join(missing)}")
        bad = [k for k, t in _TYPES.items() if not isinstance(rec[k], t) or isinstance(rec[k], bool)]
        if bad:
            raise MavsrError(f"{path}:{n}: field(s) of the wrong type: {', '.join(bad)}")
        if not rec["id"]:
            raise MavsrError(f"{path}:{n}: empty utterance id")
        u = Utterance(**{k: rec[k] for k in _FIELDS})
        if u.id in seen:
            raise MavsrError(f"{path}:{n}: duplicate utterance id {u.id!r}")
        seen.add(u.id)
        out.append(u)
    return out
