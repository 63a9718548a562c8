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
The experiment's own encoders run on the fly (the same code as `extract-features`); the reading,
encoding and decoding are transcription.py's, which `mavsr serve` shares.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

from ..config import STREAMS
from ..decoding import max_new_tokens
from ..errors import MavsrError
from ..fsutil import atomic_file
from ..options import DEVICE
from ..recipe import Recipe
from ..transcription import Transcriber, parse_roi


def run(recipe: Recipe, exp: Path, media: Path, audio_rate: int | None = None, video_rate: int | None = None,
        budget: float | None = None, roi: str | None = None, modality: str | None = None, beam: int | None = None,
        max_tokens: int | None = None, log=lambda m: None, mouth_crop: bool = False,
        save_roi: Path | None = None, device: str = DEVICE) -> dict:
    """Decode one media file; beam and max_tokens default to the experiment's `decode:` config.
    `--budget` is counted for this clip's duration (decoding.Budget)."""
    media = Path(media)
    if roi is not None and mouth_crop:
        raise MavsrError("--roi cuts the mouth region out of the frame and --mouth-crop takes the whole frame: "
                         "give one of them")
    if save_roi is not None and Path(save_roi).suffix.lower() != ".mp4":
        raise MavsrError(f"--save-roi writes an mp4 (video and audio): give a .mp4 name, not {Path(save_roi).name}")
    parse_roi(roi)  # a malformed region is refused before the model loads
    if not media.is_file():
        raise MavsrError(f"media file not found: {media}")
    tr = Transcriber(recipe, exp, log=log, device=device)
    dec = tr.dec
    opts = dec.options(beam=beam, max_new_tokens=max_tokens)
    modality = modality or tr.modality
    if modality != tr.modality:
        raise MavsrError(f"{dec.exp.name} is a {tr.modality!r} model; it cannot transcribe with modality {modality!r}")
    if budget is None:  # refused before the media are read
        rates = dec.requested_rates(audio_rate, video_rate, None) or tr.default_rates()
    elif audio_rate is not None or video_rate is not None:
        dec.requested_rates(audio_rate, video_rate, budget, [])  # the one refusal of both together
    if "video" not in STREAMS[tr.modality] and (roi is not None or mouth_crop or save_roi is not None):
        raise MavsrError(f"{dec.exp.name} is an audio-only model: --roi, --mouth-crop and --save-roi act on the "
                         "video it does not read; drop them")
    if save_roi is not None and Path(save_roi).resolve() == media.resolve():
        raise MavsrError(f"--save-roi {save_roi} is the input file; give another name")
    with atomic_file(save_roi, keep_suffix=True) if save_roi is not None else nullcontext() as roi_out:
        t0 = time.perf_counter()
        clip = tr.clip(media, roi, mouth_crop, roi_out)  # the crop is kept only if the clip is transcribed
        t1 = time.perf_counter()
        if budget is not None:
            rates = dec.requested_rates(None, None, budget, [clip.counts()])
        hyps, n_in = tr.decode([clip], rates, max_new_tokens(opts, [clip.duration]), opts.beam)
        t2 = time.perf_counter()
    return {"text": hyps[0], "media": str(media), "rates": rates.tag, "pair": rates.pair, "beam": opts.beam,
            "duration": round(clip.duration, 3), "tokens_in": int(n_in[0]),
            "timings": {"encode": round(t1 - t0, 3), "decode": round(t2 - t1, 3), "total": round(t2 - t0, 3)},
            "checkpoint": dec.ckpt.name,
            **({"mouth": clip.mouth} if clip.mouth else {})}
