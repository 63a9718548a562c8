"""Configuration: frozen dataclasses (one comment per field), loaded from and dumped to YAML.

A recipe's `conf/*.yaml` overrides the defaults below and holds only what differs from them; a
`base: other.yaml` key (relative to the file) takes that file first, so a variant states only its
difference. Unknown keys are an error that names the nearest valid key. The resolved config is
written beside every output (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml

from .errors import MavsrError
from .rates import Rates, grid


class Modality(str, Enum):
    """The streams a model reads."""

    av = "av"  # audio-visual (AVSR)
    a = "a"  # audio only (ASR)
    v = "v"  # video only (VSR)


STREAMS = {"av": ("audio", "video"), "a": ("audio",), "v": ("video",)}  # the feature streams each modality reads


class Strategy(str, Enum):
    """LoRA over the frozen LLM (docs/method.md, Matryoshka training)."""

    ms = "ms"  # one shared LoRA for every configuration
    ss = "ss"  # one LoRA per configuration
    mss = "mss"  # shared + one per configuration


PROMPTS = {  # the paper's instruction after the media tokens, per modality
    "av": "Transcribe speech and video to text.",
    "a": "Transcribe speech to text.",
    "v": "Transcribe video to text.",
}


@dataclass(frozen=True)
class AudioEncoderConfig:
    path: str = "openai/whisper-small"  # Whisper model: hub id or local dir (from_pretrained)
    # faithful: pad to 30 s as Whisper was trained; fast: encoder layers on the true length only
    # (benchmarks/whisper_modes.md)
    mode: str = "faithful"
    # zero-mean, unit-variance waveform before the log-mel (reference code, train and test); False: raw
    normalize: bool = False
    # audio-visual models: the audio cut or zero-padded to 640 samples per video frame before it is
    # encoded, as the reference code's AV data are; False: the clip as it is
    fit_video: bool = False


@dataclass(frozen=True)
class VideoEncoderConfig:
    path: str = "large_vox_iter5.pt"  # video encoder: mavsr dir (config.json + safetensors)
    fps: int = 25  # video frame rate the encoder expects
    crop: int = 88  # centre crop (pixels) taken from the 96x96 mouth ROI (docs/method.md, Pipeline 2)
    mean: float = 0.421  # pixel normalisation mean (reference code)
    std: float = 0.165  # pixel normalisation std (reference code)


@dataclass(frozen=True)
class LoraConfig:
    strategy: str = "ms"  # ms: one shared LoRA; ss: one per configuration; mss: shared + per configuration
    rank: int = 64  # LoRA bottleneck (64 for Llama 3.2-1B in the reference code)
    alpha: float = 8  # LoRA scaling numerator (scale = alpha / rank)
    dropout: float = 0.05  # dropout on the LoRA input
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # attention projections adapted (docs/method.md, LLM)


@dataclass(frozen=True)
class ModelConfig:
    llm: str = "meta-llama/Llama-3.2-1B"  # causal LM: hub id or local dir (from_pretrained)
    modality: str = "av"  # av: audio-visual, a: audio only (ASR), v: video only (VSR)
    audio_rates: tuple[int, ...] = (4, 16)  # Matryoshka audio rates (50 Hz / r tokens per second)
    video_rates: tuple[int, ...] = (2, 5)  # Matryoshka video rates (25 Hz / r tokens per second)
    compression: str = "avg"  # avg: average pooling of r tokens; stack: concatenate r tokens
    projector_hidden: int = 2048  # hidden width of each per-rate projector MLP
    projector_layernorm: bool = False  # LayerNorm after the projector
    prompt: str = ""  # instruction after the media tokens; empty = the paper's prompt for the modality
    # dtype the frozen LLM is loaded and held in: auto = bfloat16 where its matmuls run in bf16 (training
    # on a GPU, train.precision auto/bf16), float32 elsewhere; or float32 / bfloat16. Trained tensors: float32
    frozen_dtype: str = "auto"
    lora: LoraConfig = field(default_factory=LoraConfig)

    def rate_grid(self) -> list[Rates]:
        """Every configuration trained together (audio rates x video rates for AVSR)."""
        a = list(self.audio_rates) if self.modality in ("av", "a") else None
        v = list(self.video_rates) if self.modality in ("av", "v") else None
        return grid(a, v)

    def resolved_prompt(self) -> str:
        return self.prompt or PROMPTS[self.modality]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # passes over the training split
    batch_size: int = 8  # utterances per step
    lr: float = 1e-3  # peak learning rate (paper: 1e-3 ASR/AVSR)
    weight_decay: float = 0.1  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    warmup_steps: int = 0  # linear warm-up steps before cosine decay (paper: none)
    grad_clip: float = 10.0  # max gradient norm
    seed: int = 0  # seed for initialisation and data order
    log_every: int = 10  # steps between log lines in train.log
    keep_checkpoints: int = 2  # how many step checkpoints to keep
    # MS: a joint backward, whose configurations share one LLM pass, their rows merged (model/merged.py; apart under
    # FSDP or grad_checkpointing); train.backward joint does the same
    pack_rates: bool = False
    # per_config: each configuration's forward and backward in turn, gradients accumulating, so a step's
    # activations peak at one configuration's; joint: one backward over all of them at once. pack_rates and FSDP
    # run joint whatever this says (meta.json's `backward` records what ran)
    backward: str = "per_config"
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation; same gradient as one batch)
    max_frames: int = 0  # >0: dynamic batches of at most this many video frames (25 per s) instead of batch_size
    # what max_frames caps: step = one global step, the same batches on any number of GPUs (mavsr);
    # gpu = each process's micro-batch, so a step holds max_frames x processes x accum_steps (reference code)
    max_frames_per: str = "step"
    save_every: int = 0  # steps between checkpoints (0 = at the end of every epoch)
    average_last: int = 0  # >1: the final checkpoint averages N checkpoints, the last or the best (`select`)
    select: str = "best"  # best: lowest validation loss (epoch checkpoints; the last without a val split), or last
    val_split: str = "val"  # validation loss per epoch on this split when it is prepared ("" = none)
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or fp32 / bf16
    grad_checkpointing: bool = False  # recompute the LLM's activations in backward (less memory, slower)
    device: str = "auto"  # auto: cuda if available (LOCAL_RANK's GPU under torchrun), else cpu
    distributed: str = "ddp"  # under torchrun: ddp (replicated) or fsdp (shards the LLM and adapters)
    tensorboard: bool = False  # also write TensorBoard events to exp/<tag>/tb (if tensorboard is installed)
    time_mask: bool = True  # mask feature frames at random in training (audio up to 0.4 s per s, video 10 of 25 frames)


@dataclass(frozen=True)
class AugmentConfig:
    # augmented copies of each train utterance cached at extract time; each epoch reads one of them or the original
    noisy_copies: int = 0
    snrs: tuple[str, ...] = ("-5", "0", "5", "10", "15", "20", "clean")  # babble SNRs (dB) a copy draws from
    babble_utts: int = 6  # training utterances of other speakers mixed into one babble (test data never used)
    noise_file: str = ""  # use this audio file as the noise instead of babble (a random segment per copy)
    random_crop: bool = True  # copies take a random crop of the mouth ROI instead of the centre crop
    seed: int = 0  # the copies are a function of this seed


@dataclass(frozen=True)
class DecodeConfig:
    """How a split is decoded; `mavsr decode` options override each field for one call."""

    beam: int = 15  # beam width (1 = greedy); never sampling, so every run gives the same hypotheses
    batch_size: int = 16  # utterances decoded together (the hypotheses do not depend on it)
    max_new_tokens: int = 0  # longest transcript; 0 = auto: 8 per second of the longest utterance, at least 32
    snr: float | None = None  # noisy condition: noise added to the audio at this SNR in dB (None = clean)
    noise: str = "babble"  # noise of the condition: babble (other training speakers), white, or an audio file
    pool: str = ""  # inference-only pooling at these rates (a tag, e.g. a16v5) through the decoded pair's projectors


@dataclass(frozen=True)
class Config:
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    video_encoder: VideoEncoderConfig = field(default_factory=VideoEncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


# keys of earlier releases that no longer mean anything: read (an old experiment's config.yaml
# still loads) and dropped
_RETIRED = {"audio_encoder.sample_rate"}


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise MavsrError(f"config section {where or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if where + key in _RETIRED:
            continue
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (valid: {', '.join(names)})"
            raise MavsrError(f"unknown config key {where + key!r}{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, f"{where}{key}.")
            continue
        if not _fits(value, typ):
            raise MavsrError(f"config key {where + key!r} must be {_describe(typ)}, got {value!r}")
        kwargs[key] = tuple(value) if typing.get_origin(typ) is tuple else value
    return cls(**kwargs)


def _fits(value, typ) -> bool:
    """Whether a YAML value can stand for a field of type `typ` (checked, never converted: an int
    for a float field stays an int, so the dumped config is what the user wrote)."""
    args = typing.get_args(typ)
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is str:
        return isinstance(value, str)
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            # SNR lists are written as numbers or quoted numbers alike (snr_value reads both)
            return all(_fits(v, args[0]) or (args[0] is str and _fits(v, float)) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    if type(None) in args:  # X | None
        return value is None or any(_fits(value, a) for a in args if a is not type(None))
    return True


def _describe(typ) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    if typ in names:
        return names[typ]
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ')}s"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return " or ".join("null" if a is type(None) else _describe(a) for a in args)


def from_dict(data: dict) -> Config:
    return _build(Config, _upgrade(data or {}), "")


def _upgrade(data: dict) -> dict:
    """A config.yaml that mavsr 0.1.0 wrote (it names audio_encoder.sample_rate) decodes as it did
    then: its decode.max_new_tokens was never read, decoding was always automatic."""
    audio, decode = data.get("audio_encoder"), data.get("decode")
    if isinstance(audio, dict) and "sample_rate" in audio and isinstance(decode, dict):
        data = {**data, "decode": {k: v for k, v in decode.items() if k != "max_new_tokens"}}
    return data


def load(path: str | Path | None) -> Config:
    """Load a YAML config (and its `base:` chain) over the defaults; None gives the defaults."""
    if path is None:
        return Config()
    cfg = from_dict(_read_chain(Path(path), []))
    validate(cfg)
    return cfg


def _read_chain(p: Path, seen: list[Path]) -> dict:
    """The file's mapping merged over its `base:` file's, section by section."""
    if not p.is_file():
        raise MavsrError(f"config file not found: {p}" + (f" (the base of {seen[-1]})" if seen else ""))
    if p.resolve() in seen:
        raise MavsrError(f"config {p}: its `base:` chain comes back to itself")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MavsrError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MavsrError(f"config file {p} must hold a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    return _merge(_read_chain(p.parent / str(base), seen + [p.resolve()]), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if v is None and isinstance(out.get(k), dict):
            continue  # a section left empty (or all comments) changes nothing of its base
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_lora_strategy(cfg: Config, strategy: str) -> Config:
    """The same config with another LoRA strategy (e.g. from `mavsr train --lora`)."""
    lora = dataclasses.replace(cfg.model.lora, strategy=strategy)
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))
    validate(out)
    return out


def with_modality(cfg: Config, modality: str) -> Config:
    """The same config for another modality (e.g. from `mavsr train --modality a`)."""
    out = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, modality=modality))
    validate(out)
    return out


def with_epochs(cfg: Config, epochs: int) -> Config:
    """The same config trained for another number of epochs (`mavsr train --epochs`)."""
    if epochs < 1:
        raise MavsrError(f"--epochs must be at least 1, got {epochs}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))


def snr_value(x, what: str) -> float | None:
    """One SNR condition: a number of dB, or None for 'clean'."""
    if str(x).strip().lower() == "clean":
        return None
    try:
        return float(x)
    except ValueError:
        raise MavsrError(f"{what}: {str(x).strip()!r} is neither 'clean' nor a number of dB") from None


def snr_values(aug: AugmentConfig) -> list[float | None]:
    """The SNR set as numbers; None = clean."""
    return [snr_value(x, "augment.snrs") for x in aug.snrs]


def check_decode(d: DecodeConfig) -> DecodeConfig:
    """The decode options, checked (a config's section, or one call's options); pool as a clean tag."""
    for name, low in (("beam", 1), ("batch_size", 1), ("max_new_tokens", 0)):
        if getattr(d, name) < low:
            raise MavsrError(f"the decode {name.replace('_', ' ')} must be at least {low}, got {getattr(d, name)} "
                             f"(--{name.replace('_', '-')} or decode.{name})")
    return dataclasses.replace(d, pool=Rates.parse(d.pool).tag) if d.pool else d


_RANGES = {  # key -> (bound, strict): the values a run can start with
    "train.epochs": (1, False), "train.batch_size": (1, False), "train.accum_steps": (1, False),
    "train.lr": (0, True), "train.weight_decay": (0, False), "train.warmup_steps": (0, False),
    "train.grad_clip": (0, True), "train.log_every": (1, False), "train.keep_checkpoints": (0, False),
    "train.max_frames": (0, False), "train.save_every": (0, False), "train.average_last": (0, False),
    "augment.noisy_copies": (0, False), "augment.babble_utts": (1, False),
    "video_encoder.fps": (1, False), "video_encoder.crop": (1, False), "video_encoder.std": (0, True),
    "model.projector_hidden": (1, False),
}


def _values(choices: type[Enum]) -> set[str]:
    return {c.value for c in choices}


def validate(cfg: Config) -> None:
    m = cfg.model
    if m.modality not in _values(Modality):
        raise MavsrError(f"model.modality must be av, a or v, got {m.modality!r}")
    if m.compression not in ("avg", "stack"):
        raise MavsrError(f"model.compression must be avg or stack, got {m.compression!r}")
    if m.lora.strategy not in _values(Strategy):
        raise MavsrError(f"model.lora.strategy must be ms, ss or mss, got {m.lora.strategy!r}")
    if cfg.train.pack_rates and m.lora.strategy != "ms":
        raise MavsrError("train.pack_rates needs model.lora.strategy ms "
                         "(SS/MSS use different adapters per configuration)")
    t = cfg.train
    if t.precision not in ("auto", "fp32", "bf16"):
        raise MavsrError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if t.max_frames_per not in ("step", "gpu"):
        raise MavsrError(f"train.max_frames_per must be step or gpu, got {t.max_frames_per!r}")
    if t.select not in ("best", "last"):
        raise MavsrError(f"train.select must be best or last, got {t.select!r}")
    if cfg.model.frozen_dtype not in ("auto", "float32", "bfloat16"):
        raise MavsrError(f"model.frozen_dtype must be auto, float32 or bfloat16, got {cfg.model.frozen_dtype!r}")
    if cfg.model.frozen_dtype == "bfloat16" and t.precision == "fp32":
        raise MavsrError("model.frozen_dtype bfloat16 needs bf16 matmuls: set train.precision auto or bf16")
    if t.backward not in ("per_config", "joint"):
        raise MavsrError(f"train.backward must be per_config or joint, got {t.backward!r}")
    if t.distributed not in ("ddp", "fsdp"):
        raise MavsrError(f"train.distributed must be ddp or fsdp, got {t.distributed!r}")
    for key, (low, strict) in _RANGES.items():
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v < low or (strict and v == low):
            raise MavsrError(f"config key {key!r} must be {'above' if strict else 'at least'} {low:g}, got {v!r}")
    if m.lora.rank < 1:
        raise MavsrError(f"config key 'model.lora.rank' must be at least 1, got {m.lora.rank!r}")
    if not 0 <= m.lora.dropout < 1:
        raise MavsrError(f"config key 'model.lora.dropout' must be in [0, 1), got {m.lora.dropout!r}")
    snr_values(cfg.augment)
    check_decode(cfg.decode)
    if cfg.audio_encoder.mode not in ("fast", "faithful"):
        raise MavsrError(f"audio_encoder.mode must be fast or faithful, got {cfg.audio_encoder.mode!r}")
    m.rate_grid()
