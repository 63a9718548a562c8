"""Media I/O through PyAV: mouth-ROI video and 16 kHz mono audio, and the video front end's last
steps (centre or random crop of the mouth ROI, pixel normalisation) that every stage shares.

Read errors of any kind (missing file, truncated container, no stream of the wanted type) become
one `MediaError` with the file name, so callers can count and skip bad utterances.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from .clocks import FPS, SAMPLE_RATE
from .errors import MavsrError
from .fsutil import atomic_file
from .options import MOUTH_CROP, MOUTH_CROP_MAX_SIDE

if TYPE_CHECKING:  # torch is imported where it is used: reading media needs none of it
    import torch


class MediaError(MavsrError):
    pass


def _open(path: Path):
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"media file not found: {path}")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise MediaError(f"cannot open {path}: {why} (truncated, empty or not a media file?)") from None


def streams(path: Path) -> set[str]:
    """The kinds of stream a file holds: a subset of {"audio", "video"} (MediaError when unreadable)."""
    with _open(path) as c:
        return {k for k, s in (("audio", c.streams.audio), ("video", c.streams.video)) if s}


def _gray():
    """frame -> (H, W) uint8 gray, through one swscale context for all the frames of a video
    (`to_ndarray(format="gray")` makes one per frame: 4-5x slower on 96x96 video, same pixels)."""
    r = VideoReformatter()
    return lambda frame: r.reformat(frame, format="gray").to_ndarray()


def read_video_gray(path: Path) -> np.ndarray:
    """All frames as grayscale uint8, (T, H, W)."""
    frames, gray = [], _gray()
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"{path} has no video stream")
        try:
            for frame in c.decode(video=0):
                frames.append(gray(frame))
        except (av.error.FFmpegError, ValueError) as e:
            raise MediaError(f"corrupt video in {path}: {e}") from None
    if not frames:
        raise MediaError(f"{path} has no video frames")
    return np.stack(frames)


def read_video_at(path: Path, fps: int = FPS, max_seconds: float | None = None) -> np.ndarray:
    """Grayscale frames resampled to `fps` by presentation time (nearest earlier frame), (T, H, W) uint8.

    Any container and frame rate PyAV reads; variable frame rate is handled by the timestamps. A video
    whose timestamps run past `max_seconds` is a MediaError (before the resampled frames exist)."""
    frames, times, gray = [], [], _gray()
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"{path} has no video stream")
        st = c.streams.video[0]
        try:
            for k, frame in enumerate(c.decode(video=0)):
                t = float(frame.pts * st.time_base) if frame.pts is not None else k / float(st.average_rate or FPS)
                if max_seconds is not None and times and t - times[0] > max_seconds:
                    raise _too_long(path, max_seconds)
                frames.append(gray(frame))
                times.append(t)
        except (av.error.FFmpegError, ValueError) as e:
            raise MediaError(f"corrupt video in {path}: {e}") from None
    if not frames:
        raise MediaError(f"{path} has no video frames")
    t0 = times[0]
    times = np.asarray(times) - t0
    duration = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 1.0 / fps)
    n = max(1, int(round(duration * fps)))
    idx = np.searchsorted(times, np.arange(n) / fps + 1e-6, side="right") - 1
    return np.stack([frames[i] for i in np.clip(idx, 0, len(frames) - 1)])


def looks_like_mouth_crop(frames: np.ndarray) -> bool:
    """At most MOUTH_CROP_MAX_SIDE a side and roughly square: what a mouth crop can be."""
    h, w = frames.shape[1:3]
    return max(h, w) <= MOUTH_CROP_MAX_SIDE and 0.75 <= w / h <= 4 / 3


def check_mouth_crop(frames: np.ndarray, what: str, remedy: str) -> None:
    """Refuse in one line a video that cannot be a mouth crop (a full face squashed to 96x96 would
    decode as nonsense, without a word)."""
    h, w = frames.shape[1:3]
    if not looks_like_mouth_crop(frames):
        raise MediaError(f"{what}: {w}x{h} frames are not a mouth crop ({MOUTH_CROP}); {remedy}")


def crop_resize(frames: np.ndarray, roi: tuple[int, int, int, int] | None, size: int = 96) -> np.ndarray:
    """Cut the (x, y, w, h) region (the whole frame if None) and resize it to size x size (area-
    averaging when shrinking), (T, size, size) uint8."""

    t, h, w = frames.shape
    if roi is not None:
        x, y, rw, rh = roi
        if rw <= 0 or rh <= 0 or x < 0 or y < 0 or x + rw > w or y + rh > h:
            raise MediaError(f"--roi {x},{y},{rw},{rh} is outside the {w}x{h} video")
        frames = frames[:, y:y + rh, x:x + rw]
    return resize(frames, (size, size))


def resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W) uint8 -> (T, height, width) uint8, bilinear with area-averaging when shrinking."""
    import torch

    v = torch.from_numpy(np.ascontiguousarray(frames)).float()[:, None]
    v = torch.nn.functional.interpolate(v, size=size, mode="bilinear", antialias=True, align_corners=False)
    return v[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def fit_audio(wav: np.ndarray, n_frames: int, fps: int = FPS) -> np.ndarray:
    """The audio cut or zero-padded to exactly the video's length (640 samples per frame at 25 fps)."""
    n = n_frames * SAMPLE_RATE // fps
    return wav[:n] if len(wav) >= n else np.pad(wav, (0, n - len(wav)))


class TooLong(MediaError):
    pass


def _too_long(path: Path, max_seconds: float) -> MediaError:
    return TooLong(f"{path} is longer than {max_seconds:g} s")


def read_audio(path: Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """The first audio stream, mixed to mono and resampled, as float32 in [-1, 1], (T,); longer than
    `max_seconds` is a MediaError, raised as soon as that much is decoded."""
    chunks, limit, n = [], None if max_seconds is None else max_seconds * sample_rate, 0
    with _open(path) as c:
        if not c.streams.audio:
            raise MediaError(f"{path} has no audio stream")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        try:
            for frame in c.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    n += len(chunks[-1])
                if limit is not None and n > limit:
                    raise _too_long(path, max_seconds)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except (av.error.FFmpegError, ValueError) as e:
            raise MediaError(f"corrupt audio in {path}: {e}") from None
    if not chunks:
        raise MediaError(f"{path} has no audio samples")
    return np.concatenate(chunks).astype(np.float32)


_GRAY_TO_Y = np.round(16 + np.arange(256) * 219 / 255).astype(np.uint8)  # full-range gray -> limited-range luma


def _yuv420p_frames(frames: np.ndarray):
    """Grayscale (T, H, W) uint8 as yuv420p frames: luma by the same table swscale applies
    (tested equal), chroma neutral. Built directly, it costs a third of swscale's conversion."""
    t, h, w = frames.shape
    if h % 2 or w % 2:
        for f in frames:
            yield av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="gray").reformat(format="yuv420p")
        return
    buf = np.full((h * 3 // 2, w), 128, np.uint8)
    for f in frames:
        buf[:h] = _GRAY_TO_Y[f]
        yield av.VideoFrame.from_ndarray(buf, format="yuv420p")


def write_av(path: Path, frames: np.ndarray, audio: np.ndarray | None, fps: int = FPS,
             sample_rate: int = SAMPLE_RATE, crf: int = 18) -> None:
    """Write grayscale frames (T, H, W) uint8 as H.264 and optional mono float audio as AAC.

    Written to a temporary name and renamed, so a crash never leaves a half file behind.
    """
    t, h, w = frames.shape
    with atomic_file(path, keep_suffix=True) as tmp:
        with av.open(str(tmp), "w", format="mp4") as c:
            vs = c.add_stream("libx264", rate=fps)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.options = {"crf": str(crf), "preset": "ultrafast"}
            vs.codec_context.time_base = Fraction(1, fps)
            ast = None
            if audio is not None:
                ast = c.add_stream("aac", rate=sample_rate, layout="mono")
            for i, vf in enumerate(_yuv420p_frames(frames)):
                vf.pts = i
                for pkt in vs.encode(vf):
                    c.mux(pkt)
            for pkt in vs.encode(None):
                c.mux(pkt)
            if ast is not None:
                pcm = np.clip(audio, -1, 1).astype(np.float32)
                step = 1024
                for start in range(0, len(pcm), step):
                    chunk = pcm[start:start + step]
                    af = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
                    af.sample_rate = sample_rate
                    af.pts = start
                    for pkt in ast.encode(af):
                        c.mux(pkt)
                for pkt in ast.encode(None):
                    c.mux(pkt)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """16-bit PCM WAV, written atomically."""
    import wave

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with atomic_file(path, keep_suffix=True) as tmp, wave.open(str(tmp), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


# ---- the video front end: media -> mouth ROI (T, 96, 96) uint8 -> encoder input ----------------
# One path for every stage (extract-features, the augmented copies, transcribe, tiny-models): the
# clip read at 25 fps by timestamps, the mouth ROI resized to ROI_SIZE, centre- (or randomly)
# cropped, normalised. A model is trained on exactly what transcribe gives it.
ROI_SIZE = 96  # side of the mouth ROI (LRS-style preprocessing's), before the encoder's crop
FRAME_SLACK = 1  # frames a clip may differ from its manifest's num_frames (timestamps rounded to 25 fps)


def to_roi(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) frames of a mouth crop -> (T, ROI_SIZE, ROI_SIZE), resized unless already that size."""
    return frames if frames.shape[1:] == (ROI_SIZE, ROI_SIZE) else crop_resize(frames, None, ROI_SIZE)


def read_mouth_roi(path: Path, fps: int = FPS, expect_frames: int | None = None, what: str = "") -> np.ndarray:
    """A mouth-crop video (a manifest's `video`) -> (T, ROI_SIZE, ROI_SIZE) uint8 at `fps`. With
    `expect_frames` (the manifest's num_frames), a clip that is not that long (more than one frame
    apart: timestamp rounding) is refused in one line: the manifest and the media disagree."""
    frames = read_video_at(path, fps)
    if expect_frames is not None and abs(len(frames) - expect_frames) > FRAME_SLACK:
        raise MediaError(f"{what or path}: the video has {len(frames)} frames at {fps} fps, the manifest says "
                         f"num_frames {expect_frames}; fix the manifest or the media ({path})")
    return to_roi(frames)


def encoder_video(roi: np.ndarray, vc) -> torch.Tensor:
    """(T, ROI_SIZE, ROI_SIZE) uint8 mouth ROI -> the video encoder's input (T, crop, crop) float32:
    the centre crop, normalised (config.VideoEncoderConfig's crop, mean, std)."""
    return normalise(video_crop(roi, vc.crop), vc.mean, vc.std)


def video_crop(frames: np.ndarray, crop: int) -> torch.Tensor:
    """(T, H, W) uint8 mouth ROI -> its centre crop (T, crop, crop), uint8 (test-time crop)."""
    h, w = _roi_size(frames, crop)
    return _window(frames, crop, (h - crop) // 2, (w - crop) // 2)


def random_crop(frames: np.ndarray, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """(T, H, W) -> one random (crop, crop) window for the whole clip (train-time crop)."""
    h, w = _roi_size(frames, crop)
    return _window(frames, crop, int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1)))


def _roi_size(frames: np.ndarray, crop: int) -> tuple[int, int]:
    t, h, w = frames.shape
    if h < crop or w < crop:
        raise MavsrError(f"mouth ROI of {h}x{w} is smaller than the {crop}x{crop} crop")
    return h, w


def _window(frames: np.ndarray, crop: int, y0: int, x0: int) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames[:, y0:y0 + crop, x0:x0 + crop]))


def normalise(crop: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels -> [0, 1] -> (x - mean) / std, float32 (docs/method.md, Pipeline 2)."""
    return (crop.float() / 255.0 - mean) / std
