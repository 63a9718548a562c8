"""`mavsr transcribe VIDEO`: one media file through the encoders and a trained experiment.

Any container PyAV reads. Video is resampled to 25 fps by timestamps and cut to the mouth:
  --roi x,y,w,h   that fixed region, resized to 96x96;
  --mouth-crop    the whole frame, for a video that already is a mouth crop (media.check_mouth_crop);
  neither         a frame of mouth-crop size is taken as one; any other video goes through face
                  detection (the `faces` extra): 68-point landmarks tracked per frame, then the
                  aligned 96x96 mouth ROI that `prepare lrs3` cuts from landmark pickles (roi.py).
Then centre-cropped and normalised by the front end extract-features uses (media.encoder_video);
audio is mixed to mono at 16 kHz.
`--save-roi FILE` writes the mouth crop that was decoded (an mp4 at 25 fps, with the audio), to
look at or to transcribe again with --mouth-crop.
The experiment's own encoders run on the fly (the same code as `extract-features`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..clocks import SAMPLE_RATE, SAMPLES_PER_AUDIO_FRAME
from ..decoding import Decoder, generate, max_new_tokens
from ..errors import MavsrError
from ..features import pad_batch
from ..media import (
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
from ..model.audio_encoder import WhisperAudioEncoder
from ..model.video_encoder import load_video_encoder
from ..recipe import Recipe, resolve_model


def parse_roi(spec: str | None) -> tuple[int, int, int, int] | None:
    if spec is None:
        return None
    try:
        x, y, w, h = (int(v) for v in spec.split(","))
    except ValueError:
        raise MavsrError(f"--roi must be x,y,w,h in pixels, got {spec!r}") from None
    return x, y, w, h


def mouth_frames(frames, media: Path, roi: str | None, mouth_crop: bool, log) -> tuple:
    """(T, H, W) frames -> ((T, 96, 96) mouth crops, how they were found)."""
    if roi is not None:
        return crop_resize(frames, parse_roi(roi), ROI_SIZE), "roi"
    if mouth_crop or looks_like_mouth_crop(frames):
        check_mouth_crop(frames, str(media), "leave out --mouth-crop to detect the face, or give --roi x,y,w,h")
        return to_roi(frames), "mouth crop"
    from .. import faces
    from ..roi import mouth_rois

    if not faces.available():
        raise MavsrError(f"{media}: {frames.shape[2]}x{frames.shape[1]} frames are a whole scene, not a mouth crop; "
                         f"{faces.EXTRA_HINT}, or give --roi x,y,w,h")
    try:
        track = faces.detect(frames, faces.FaceLandmarker())
    except MavsrError as e:
        raise MavsrError(f"{media}: {e}; give the mouth region with --roi x,y,w,h") from None
    if track.missed or track.several:
        log(f"transcribe: face detection: {track.missed} of {len(frames)} frames without the face (filled in from "
            f"their neighbours; in {track.others} only another face was seen), {track.several} with several faces "
            "(the one nearest the last kept)")
    return mouth_rois(frames, track.landmarks), "detected"


def run(recipe: Recipe, exp: Path, media: Path, audio_rate: int | None = None, video_rate: int | None = None,
        budget: float | None = None, roi: str | None = None, modality: str | None = None, beam: int | None = None,
        max_tokens: int | None = None, log=lambda m: None, mouth_crop: bool = False,
        save_roi: Path | None = None) -> dict:
    """Decode one media file; beam and max_tokens default to the experiment's `decode:` config.
    `--budget` is counted for this clip's duration (decoding.Budget)."""
    media = Path(media)
    if not media.is_file():
        raise MavsrError(f"media file not found: {media}")
    dec = Decoder(recipe, exp, None, log=log)
    cfg, opts = dec.cfg, dec.options(beam=beam, max_new_tokens=max_tokens)
    trained_mod = cfg.model.modality
    modality = modality or trained_mod
    if modality != trained_mod:
        raise MavsrError(f"{dec.exp.name} is a {trained_mod!r} model; it cannot transcribe with modality {modality!r}")
    if budget is None:  # refused before the media are read
        rates = dec.requested_rates(audio_rate, video_rate, None)
        rates = rates or max(dec.trained, key=lambda r: r.tokens_per_second())  # default: the least compression
    elif audio_rate is not None or video_rate is not None:
        dec.requested_rates(audio_rate, video_rate, budget, 1.0)  # the one refusal of both together
    t0 = time.perf_counter()
    feats, duration, wav = {}, 0.0, None
    with torch.inference_mode():
        vc = cfg.video_encoder
        if modality in ("av", "a"):
            wav = read_audio(media)
            if len(wav) < SAMPLES_PER_AUDIO_FRAME:
                raise MediaError(f"{media}: audio shorter than one encoder frame (20 ms)")
            duration = len(wav) / SAMPLE_RATE
        if modality in ("av", "v"):
            frames, found = mouth_frames(read_video_at(media, vc.fps), media, roi, mouth_crop, log)
            if save_roi is not None:  # with the audio decoded beside it: a clip transcribe takes back
                write_av(Path(save_roi), frames, wav if modality == "av" else None, fps=vc.fps)
            duration = max(duration, len(frames) / vc.fps)
            venc = load_video_encoder(resolve_model(recipe, vc.path)).eval()
            feats["video"] = pad_batch([venc(encoder_video(frames, vc)).float()])
            if wav is not None and cfg.audio_encoder.fit_video:
                wav = fit_audio(wav, len(frames), vc.fps)
        if wav is not None:
            enc = WhisperAudioEncoder.from_config(resolve_model(recipe, cfg.audio_encoder.path), cfg.audio_encoder)
            feats["audio"] = pad_batch([enc(wav).float()])
    t1 = time.perf_counter()
    if budget is not None:
        rates = dec.requested_rates(None, None, budget, duration)
    mnt = max_new_tokens(opts, [duration])
    with torch.inference_mode():
        hyps, n_in = generate(dec.model, feats, rates, mnt, beam=opts.beam)
    t2 = time.perf_counter()
    return {"text": hyps[0], "media": str(media), "rates": rates.tag, "pair": rates.pair, "beam": opts.beam,
            "duration": round(duration, 3), "tokens_in": int(n_in[0]),
            "time": {"encode": round(t1 - t0, 3), "decode": round(t2 - t1, 3)}, "checkpoint": dec.ckpt.name,
            **({"mouth": found} if modality in ("av", "v") else {})}
