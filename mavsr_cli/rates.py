"""Compression-rate pairs and their tags: the only module that parses and prints tags.

A tag names the rates of the streams a configuration uses: `a16v5` (audio pooled by 16, video by
5), `a4` (audio only), `v5` (video only). See docs/method.md, "Rate pair notation".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .clocks import AUDIO_HZ, FPS
from .errors import MavsrError

_TAG = re.compile(r"^(?:a(\d+))?(?:v(\d+))?$")


def pooled_length(frames, rate: int):
    """Tokens a stream of `frames` frames gives at compression `rate`: a trailing partial group is
    dropped, and an utterance shorter than the rate still gives one token (docs/method.md, Pipeline 3).
    `frames` an int, or a tensor of lengths (model/compress.py pools by this)."""
    return (frames // rate).clamp(min=1) if hasattr(frames, "clamp") else max(frames // rate, 1)


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

    def tokens_per_second(self, audio_hz: float = AUDIO_HZ, video_hz: float = FPS) -> float:
        """LLM input tokens per second of speech this configuration produces."""
        t = 0.0
        if self.audio:
            t += audio_hz / self.audio
        if self.video:
            t += video_hz / self.video
        return t

    def media_tokens(self, audio_frames: int, video_frames: int) -> int:
        """LLM input tokens of one utterance's streams at these rates (pooled_length of each)."""
        return sum(pooled_length(n, r) for n, r in ((audio_frames, self.audio), (video_frames, self.video)) if r)

    def __str__(self) -> str:
        return self.tag

    @classmethod
    def parse(cls, tag: str) -> Rates:
        m = _TAG.match(tag.strip())
        if not m or not (m.group(1) or m.group(2)):
            raise MavsrError(f"bad rate tag {tag!r}: expected e.g. a16v5, a4 or v2")
        a, v = m.group(1), m.group(2)
        return cls(int(a) if a else None, int(v) if v else None)


def most_accurate_first(pairs: list[Rates]) -> list[Rates]:
    """The one order of "most accurate" (transcribe's default, --budget's fallback, serve's controller):
    most LLM input tokens per second first (docs/method.md, Table 1), then the finer audio rate, then video."""
    return sorted(pairs, key=lambda r: (-r.tokens_per_second(), r.audio or 0, r.video or 0))


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
    if r in trained:
        return
    grid_text = ", ".join(x.tag for x in trained)
    both = all(x.audio and x.video for x in trained)
    if both and not (r.audio and r.video):  # an audio-visual model given one rate
        missing = "video" if r.audio else "audio"
        raise MavsrError(f"this audio-visual model takes a rate for each stream; {r.tag} has no {missing} rate "
                         f"(--{missing}-rate; trained grid: {grid_text})")
    raise MavsrError(f"rates {r.tag} {r.pair} are not in the trained grid: {grid_text}")


def condition_name(noise: str, snr: float) -> str:
    """A noisy test condition: 'snr0' for babble (the paper's), 'white_snr5', '<file stem>_snr-5'."""
    from pathlib import Path

    kind = "" if noise == "babble" else ("white" if noise == "white" else Path(noise).stem) + "_"
    return f"{kind}snr{snr:g}"


def condition_snr(condition: str) -> float | None:
    """The SNR (dB) of a condition name; None for clean ('')."""
    return float(condition.rsplit("snr", 1)[1]) if condition else None


@dataclass(frozen=True)
class DecodeTag:
    """What a decode dir holds, and its name: `decode_<rates>[_pool<rates>]_beam<B>[_<condition>]`.

    The only place that builds or reads these names (decode writes them; score, claims and bench
    read them back)."""

    rates: Rates  # the configuration decoded (its projectors and adapters)
    beam: int  # beam width (1 = greedy)
    pool: Rates | None = None  # inference-only pooling at these rates (the paper's baseline)
    condition: str = ""  # noisy condition (condition_name), '' = clean

    @property
    def name(self) -> str:
        pool = "" if self.pool is None else f"_pool{self.pool.tag}"
        cond = f"_{self.condition}" if self.condition else ""
        return f"decode_{self.rates.tag}{pool}_beam{self.beam}{cond}"

    @classmethod
    def parse(cls, name: str) -> DecodeTag:
        """decode_a16v5_beam15_snr0 -> DecodeTag(Rates(16, 5), 15, None, 'snr0'); the dirs of
        mavsr 0.1.0 said `greedy` for beam 1."""
        parts = name.split("_")
        if len(parts) < 3 or parts[0] != "decode":
            raise MavsrError(f"{name!r} is not a decode dir name (decode_<rates>[_pool<rates>]_beam<B>[_<noise>])")
        rates, rest, pool = Rates.parse(parts[1]), parts[2:], None
        if rest[0].startswith("pool"):
            pool, rest = Rates.parse(rest[0][4:]), rest[1:]
        if rest and rest[0] == "greedy":
            beam = 1
        elif rest and rest[0].startswith("beam") and rest[0][4:].isdigit():
            beam = int(rest[0][4:])
        else:
            raise MavsrError(f"{name!r}: no beam width in the decode dir name")
        return cls(rates, beam, pool, "_".join(rest[1:]))
