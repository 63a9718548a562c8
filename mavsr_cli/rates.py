"""Compression-rate pairs and their tags: the only module that parses and prints tags.

A tag names the rates of the streams a configuration uses: `a16v5` (audio pooled by 16, video by
5), `a4` (audio only), `v5` (video only). See paper.md, "Rate pair notation".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MavsrError

_TAG = re.compile(r"^(?:a(\d+))?(?:v(\d+))?$")


@dataclass(frozen=True, order=True)
class Rates:
    """Token-compression rates of one configuration; None = that modality is not used."""

    audio: int | None = None  # audio tokens pooled per LLM token (Whisper runs at 50 Hz)
    video: int | None = None  # video tokens pooled per LLM token (AV-HuBERT runs at 25 Hz)

    def __post_init__(self) -> None:
        if self.audio is None and self.video is None:
            raise MavsrError("a rate configuration needs an audio rate, a video rate or both")
        for name, r in (("audio", self.audio), ("video", self.video)):
            if r is not None and (not isinstance(r, int) or r < 1):
                raise MavsrError(f"{name} rate must be a positive integer, got {r!r}")

    @property
    def tag(self) -> str:
        return (f"a{self.audio}" if self.audio else "") + (f"v{self.video}" if self.video else "")

    @property
    def pair(self) -> str:
        """The paper's notation, e.g. (16,5); '-' for an absent modality."""
        a = "-" if self.audio is None else str(self.audio)
        v = "-" if self.video is None else str(self.video)
        return f"({a},{v})"

    def tokens_per_second(self, audio_hz: float = 50.0, video_hz: float = 25.0) -> float:
        """LLM input tokens per second of speech this configuration produces."""
        t = 0.0
        if self.audio:
            t += audio_hz / self.audio
        if self.video:
            t += video_hz / self.video
        return t

    def __str__(self) -> str:
        return self.tag

    @classmethod
    def parse(cls, tag: str) -> Rates:
        m = _TAG.match(tag.strip())
        if not m or not (m.group(1) or m.group(2)):
            raise MavsrError(f"bad rate tag {tag!r}: expected e.g. a16v5, a4 or v2")
        a, v = m.group(1), m.group(2)
        return cls(int(a) if a else None, int(v) if v else None)


def grid(audio_rates: list[int] | None, video_rates: list[int] | None) -> list[Rates]:
    """The cross product of the rate lists (the paper's Matryoshka grid), in a stable order."""
    if audio_rates and video_rates:
        return [Rates(a, v) for a in audio_rates for v in video_rates]
    if audio_rates:
        return [Rates(a, None) for a in audio_rates]
    if video_rates:
        return [Rates(None, v) for v in video_rates]
    raise MavsrError("the rate grid is empty: give audio_rates, video_rates or both")


def select(spec: str, trained: list[Rates]) -> list[Rates]:
    """Resolve `--rates all` or `a4v2,a16v5` against a grid; unknown tags are an error."""
    if spec.strip() == "all":
        return list(trained)
    chosen = [Rates.parse(t) for t in spec.split(",") if t.strip()]
    if not chosen:
        raise MavsrError("--rates is empty")
    for r in chosen:
        require(r, trained)
    return chosen


def require(r: Rates, trained: list[Rates]) -> None:
    if r not in trained:
        raise MavsrError(
            f"rates {r.tag} {r.pair} are not in the trained grid: {', '.join(x.tag for x in trained)}"
        )
