"""The options of the stages that have their own (a frozen dataclass each), and the choices they take.

The one place their defaults are written: the CLI's defaults and `--help` read them here (as
openai/whisper's DecodingOptions do), the stages take them as they are. Nothing heavy is imported,
so `mavsr --help` stays fast. What a config file sets (extract-features, train, and decode's
defaults, `config.DecodeConfig`) is config.py's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .config import PROMPTS, DecodeConfig
from .sharding import Shard


class CtcUnits(str, Enum):
    """Targets of the small encoders' pretraining (`tiny-models`)."""

    char = "char"  # CTC over the transcript's characters
    word = "word"  # CTC over its words
    align = "align"  # the word under each frame, from the `Text:` files' word timings


class Normaliser(str, Enum):
    """Text normalisation before scoring, the same for reference and hypothesis (scoring.py)."""

    default = "default"  # lower-case, no punctuation but apostrophes, whitespace collapsed
    none = "none"  # whitespace collapsed only


# What mavsr takes as a mouth crop and as landmarks (media.check_mouth_crop, roi.py; stated in --help)
MOUTH_CROP = "a small, square cut around the lips, as LRS-style preprocessing writes (96x96)"
MOUTH_CROP_MAX_SIDE = 160  # larger frames (LRS3's 224x224 face crops), or far from square, are faces or scenes
LANDMARKS = ("a pickle of a per-frame list, each a 68 x 2 array of (x, y) points in the dlib/iBUG order "
             "(None for a frame without a face)")


DEVICE = "auto"  # where a stage runs its models (--device): a GPU when torch sees one (devices.resolve)
DEVICE_ENV = "MAVSR_DEVICE"  # the environment variable --device falls back on (e.g. cpu on a GPU machine)
SHARD_SIZE = 256  # utterances per feature shard file (extract-features --shard-size)


def default_jobs() -> int:
    """Worker processes by default: the cores, at most 4."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class SynthOptions:
    num_utts: int = 400  # utterances in the train split (the test split gets test_utts)
    test_utts: int = 60  # utterances in the test split
    speakers: int = 4  # number of synthetic speakers (voices + faces)
    heldout_speakers: int = 0  # speakers kept out of train and used only in test
    seed: int = 0  # everything is a function of this seed
    words_per_slot: int = 0  # > 0: each grammar slot draws from its first that many words only
    nj: int = 2  # worker processes for synthesis and media checks (the CLI: default_jobs())
    val_share: float = 0.05  # share of the generated train utterances held out as data/val (as lrs3's trainval)


@dataclass(frozen=True)
class LrsOptions:
    root: Path  # the corpus as distributed (formats.md)
    landmarks: Path | None = None  # landmark pickles at the videos' relative paths (default: beside the videos)
    mean_face: Path | None = None  # reference face for the alignment (default: mavsr's template)
    max_seconds: float = 16.0  # pretrain utterances are cut into segments of at most this many seconds
    nj: int = 2  # worker processes
    shard: Shard | None = None  # (i, N): process only every N-th utterance; rerun without to merge
    split: str = "train"  # prepare dir: the manifest split the folder becomes
    val_share: float = 0.04  # lrs3: share of trainval held out as data/val (about 1,200 utterances, as usual)
    mouth_crops: bool = False  # prepare dir: videos without landmarks are mouth crops, never face-detected


@dataclass(frozen=True)
class TinyOptions:
    audio_dim: int = 128  # Whisper d_model
    audio_layers: int = 2  # Whisper encoder layers
    video_dim: int = 128  # lip encoder width
    video_layers: int = 2  # lip encoder transformer layers
    llm_hidden: int = 192  # Llama hidden size
    llm_layers: int = 2  # Llama layers
    lm_epochs: int = 8  # language-model warm-up epochs over the training transcripts
    encoder_epochs: int = 6  # pretraining epochs of the audio encoder (0 = keep random)
    video_epochs: int = -1  # pretraining epochs of the lip encoder (-1: encoder_epochs)
    prompt: str = PROMPTS["av"]  # the prompt the warm-up puts before the text
    seed: int = 0  # initial weights and pretraining order
    ctc_units: str = CtcUnits.char.value  # encoder targets (CtcUnits)

    @property
    def lip_epochs(self) -> int:
        return self.encoder_epochs if self.video_epochs < 0 else self.video_epochs


@dataclass(frozen=True)
class BenchOptions:
    split: str = "test"  # the split decoded
    snrs: tuple[float | None, ...] = (None, 10.0, 5.0, 0.0, -5.0)  # conditions: None = clean, else SNR dB
    noise: str = DecodeConfig.noise  # babble, white or a noise file
    beam: int = DecodeConfig.beam  # beam width of every decode (claims reads it back from bench.json)
    batch_size: int | None = None  # utterances decoded together (None: each experiment's config)
    rounds: int = 3  # timed decodes of each pair per condition, taking turns; a row keeps the least time
    device: str = DEVICE  # where the models run (devices.resolve)


@dataclass(frozen=True)
class Bounds:
    margin: float = 1.5  # claim 1: Matryoshka WER at most this many points above the per-rate baseline
    target_best: float = 10.0  # clean WER bound at the least compressed pair, e.g. (4,2)
    target_worst: float = 20.0  # clean WER bound at the most compressed pair, e.g. (16,5)
    gentle: float = 10.0  # claim 2: WER rise from least to most compressed pair at most this
    collapse: float = 10.0  # claim 2: pooled rate-1 model at least this many points worse at the most compressed pair
    video_max: float = 80.0  # claim 3: video-only WER below this
    noisy_snrs: tuple[float, ...] = (0.0, -5.0)  # claim 3: AV must beat audio-only at these SNRs
    av_slack: float = 0.0  # claim 3: ... by more than -av_slack points (0: AV strictly lower)
    linear_tol: float = 0.1  # claim 4: media tokens within this fraction of the rate-proportional count


SERVE_MAX_BEAM = 64  # the widest beam a served request (or serve's --beam) may ask for


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # loopback only by default; another address without an API key is warned about
    port: int = 8000  # 0: any free port (the start-up line says which)
    rates: str = "auto"  # auto: the elastic controller picks per batch; a tag (a4v2): every batch at that pair
    slo_ms: float = 1000.0  # auto: the p95 latency target, request received to response
    max_batch: int = 8  # utterances decoded together at most
    batch_wait_ms: float = 5.0  # how long a request waits for others to join its batch
    max_queue: int = 64  # requests admitted at once; more are answered 503 with Retry-After
    max_upload_mb: float = 50.0  # larger uploads are answered 413
    max_seconds: float = 120.0  # longer media are answered 413, found while decoding (before it is all in memory)
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' on /v1 and /metrics (or MAVSR_API_KEY)
    warmup_seconds: float = 3.0  # random-feature clip of the start-up decodes, when the recipe has no val/test media
    device: str = DEVICE  # where the models run (devices.resolve)
    beam: int | None = None  # requests that name none, and the start-up cost measurements (None: the config's)
