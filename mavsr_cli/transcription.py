"""One media file to text with a trained experiment, its encoders run on the fly: what `mavsr transcribe`
and `mavsr serve` share, so a served transcript is the one `transcribe` prints.

Video is resampled to 25 fps by timestamps and cut to the mouth (a fixed `roi`, a mouth-crop video used
whole, or face detection with the `faces` extra), then centre-cropped and normalised by extract-features'
front end (media.encoder_video); audio is mixed to mono at 16 kHz. The model and encoders load once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from .clocks import SAMPLE_RATE, SAMPLES_PER_AUDIO_FRAME, audio_frames
from .config import STREAMS
from .decoding import Decoder, generate
from .errors import MavsrError
from .extraction import encode_grouped
from .features import pad_batch
from .media import (
    ROI_SIZE,
    MediaError,
    check_mouth_crop,
    crop_resize,
    encoder_video,
    fit_audio,
    looks_like_mouth_crop,
    read_audio,
    read_video_at,
    to_roi,
    write_av,
)
from .options import DEVICE
from .rates import Rates, most_accurate_first
from .recipe import Recipe, resolve_model


def parse_roi(spec: str | None) -> tuple[int, int, int, int] | None:
    if spec is None:
        return None
    try:
        x, y, w, h = (int(v) for v in spec.split(","))
    except ValueError:
        raise MavsrError(f"--roi must be x,y,w,h in pixels, got {spec!r}") from None
    if w < 1 or h < 1 or x < 0 or y < 0:
        raise MavsrError(f"--roi {spec}: x and y must be at least 0 and the width and height at least 1")
    return x, y, w, h


def mouth_frames(frames, media: Path, roi: str | None, mouth_crop: bool, log) -> tuple:
    """(T, H, W) frames -> ((T, 96, 96) mouth crops, how they were found)."""
    if roi is not None:
        return crop_resize(frames, parse_roi(roi), ROI_SIZE), "roi"
    if mouth_crop or looks_like_mouth_crop(frames):
        check_mouth_crop(frames, str(media), "leave out --mouth-crop to detect the face, or give --roi x,y,w,h")
        return to_roi(frames), "mouth crop"
    from . import faces
    from .roi import mouth_rois

    if not faces.available():
        raise MavsrError(f"{media}: {frames.shape[2]}x{frames.shape[1]} frames are a whole scene, not a mouth crop; "
                         f"{faces.EXTRA_HINT}, or give --roi x,y,w,h")
    try:
        track = faces.detect(frames, faces.FaceLandmarker())
    except MavsrError as e:
        raise MavsrError(f"{media}: {e}; give the mouth region (transcribe --roi x,y,w,h), or a video that is a "
                         "mouth crop") from None
    if track.missed or track.several:
        log(f"transcribe: face detection: {track.missed} of {len(frames)} frames without the face (filled in from "
            f"their neighbours; in {track.others} only another face was seen), {track.several} with several faces "
            "(the one nearest the last kept)")
    return mouth_rois(frames, track.landmarks), "detected"


@dataclasses.dataclass(eq=False)
class Clip:
    """One file's encoder features, ready to batch."""

    feats: dict[str, torch.Tensor]  # "audio" / "video" -> (T, D) float32, the modality's streams
    duration: float  # seconds of media
    mouth: str | None  # how the mouth was found (roi, mouth crop, detected); None without video

    def counts(self) -> tuple[float, int, int]:
        """(seconds, audio frames, video frames), as decoding.Budget counts a clip."""
        return (self.duration, *(len(self.feats[m]) if m in self.feats else 0 for m in ("audio", "video")))


@dataclasses.dataclass(eq=False)
class EncoderInputs:
    """One file read for the encoders: the waveform and the mouth crops the modality needs."""

    wav: np.ndarray | None  # (S,) float32 mono 16 kHz, fitted to the video's length where the config says
    frames: np.ndarray | None  # (T, 96, 96) uint8 mouth crops at the video encoder's fps
    duration: float  # seconds of media
    mouth: str | None  # how the mouth was found; None without video

    def counts(self) -> tuple[float, int, int]:
        """(seconds, audio frames, video frames) the encoders will give (Clip.counts, before encoding)."""
        return (self.duration, audio_frames(len(self.wav)) if self.wav is not None else 0,
                len(self.frames) if self.frames is not None else 0)


class Transcriber:
    """A loaded experiment with its encoders: files -> Clips -> texts at any trained rate pair."""

    def __init__(self, recipe: Recipe, exp: Path, log=lambda m: None, device: str = DEVICE) -> None:
        """`device`: where the encoders and the model run (devices.resolve)."""
        self.recipe, self.log = recipe, log
        self.dec = Decoder(recipe, exp, None, log=log, device=device)
        self.cfg = self.dec.cfg
        self.modality = self.cfg.model.modality
        self._venc = self._aenc = None

    def load(self) -> Transcriber:
        """The LLM and the encoders the modality needs, now rather than at the first file."""
        _ = self.dec.model
        if "video" in STREAMS[self.modality]:
            self._video_encoder()
        if "audio" in STREAMS[self.modality]:
            self._audio_encoder()
        return self

    def _video_encoder(self):
        if self._venc is None:
            from .model.video_encoder import load_video_encoder

            path = resolve_model(self.recipe, self.cfg.video_encoder.path)
            self._venc = load_video_encoder(path).to(self.dec.device).eval()
        return self._venc

    def _audio_encoder(self):
        if self._aenc is None:
            from .model.audio_encoder import WhisperAudioEncoder

            ac = self.cfg.audio_encoder
            self._aenc = WhisperAudioEncoder.from_config(resolve_model(self.recipe, ac.path), ac).to(self.dec.device)
        return self._aenc

    def default_rates(self) -> Rates:
        """The least compressed trained pair: the most accurate one (docs/method.md, Table 1)."""
        return most_accurate_first(self.dec.trained)[0]

    @torch.inference_mode()
    def clip(self, media: Path, roi: str | None = None, mouth_crop: bool = False,
             save_roi: Path | None = None, max_seconds: float | None = None) -> Clip:
        """Read and encode one file for this experiment's modality (longer than `max_seconds`: MediaError)."""
        return self.encode([self.read(media, roi, mouth_crop, save_roi, max_seconds)])[0]

    def read(self, media: Path, roi: str | None = None, mouth_crop: bool = False,
             save_roi: Path | None = None, max_seconds: float | None = None) -> EncoderInputs:
        """The file's audio and mouth crops, as the modality needs them (longer than `max_seconds`: MediaError)."""
        duration, wav, frames, found = 0.0, None, None, None
        vc = self.cfg.video_encoder
        if "audio" in STREAMS[self.modality]:
            wav = read_audio(media, max_seconds=max_seconds)
            if len(wav) < SAMPLES_PER_AUDIO_FRAME:
                raise MediaError(f"{media}: audio shorter than one encoder frame (20 ms)")
            duration = len(wav) / SAMPLE_RATE
        if "video" in STREAMS[self.modality]:
            frames, found = mouth_frames(read_video_at(media, vc.fps, max_seconds), media, roi, mouth_crop, self.log)
            if save_roi is not None:  # with the audio decoded beside it: a clip transcribe takes back
                write_av(Path(save_roi), frames, wav, fps=vc.fps)
            duration = max(duration, len(frames) / vc.fps)
            if wav is not None and self.cfg.audio_encoder.fit_video:
                wav = fit_audio(wav, len(frames), vc.fps)
        return EncoderInputs(wav, frames, duration, found)

    @property
    def batches(self) -> bool:
        """Whether `encode` gains from several files at once: an audio encoder whose rows do not depend
        on the rest of the batch (faithful Whisper)."""
        return "audio" in STREAMS[self.modality] and self._audio_encoder().batch_invariant

    @torch.inference_mode()
    def encode(self, items: list[EncoderInputs], isolate: bool = False, on_call=None) -> list:
        """The encoders' features of several files: the audio as extract-features encodes it
        (extraction.encode_grouped: faithful Whisper ENCODE_BATCH clips per call, the same features to
        the bit as one at a time, tested; any other encoder one clip per call), the video one clip
        at a time, so a served transcript never depends on what else was uploaded. With `isolate`
        (serve), an item whose encoding fails gets its exception in its place instead of a Clip, and
        only its own group is encoded again; `on_call(n)` is told the clips in each encoder call.
        The features come back on the CPU: a queued request holds no GPU memory, and the copy waits
        for the GPU, so the time of encoding is its own (decode moves them back)."""
        errors: list[Exception | None] = [None] * len(items)
        feats: list[dict[str, torch.Tensor]] = [{} for _ in items]
        if "video" in STREAMS[self.modality]:
            enc = self._video_encoder()  # loaded before the loop: a failure to load is no upload's
            for k, m in enumerate(items):
                try:
                    crops = encoder_video(m.frames, self.cfg.video_encoder).to(self.dec.device)
                    feats[k]["video"] = enc(crops).to("cpu", torch.float32)  # (T_v, D_v); see below
                except Exception as err:
                    if not isolate:
                        raise
                    errors[k] = err
                else:
                    if on_call is not None:
                        on_call(1)
        if "audio" in STREAMS[self.modality]:
            todo = [k for k in range(len(items)) if errors[k] is None]
            got = encode_grouped(self._audio_encoder(), [items[k].wav for k in todo], isolate, on_call)
            for k, h in zip(todo, got, strict=True):
                if isinstance(h, Exception):
                    errors[k] = h
                else:  # a copy: a row must not keep its whole batch alive in the server's queue
                    feats[k]["audio"] = h.to("cpu", torch.float32, copy=True)  # (T_a, D_a)
        return [err or Clip(f, m.duration, m.mouth) for f, m, err in zip(feats, items, errors, strict=True)]

    @torch.inference_mode()
    def decode(self, clips: list[Clip], rates: Rates, max_new_tokens: int, beam: int) -> tuple[list[str], list[int]]:
        """Texts and LLM input lengths of a batch of clips; the batched search gives each clip the
        text it would get alone."""
        feats = {m: pad_batch([c.feats[m] for c in clips]) for m in STREAMS[self.modality]}  # (B, T, D), (B,)
        return generate(self.dec.model, feats, rates, max_new_tokens, beam=beam)
