"""Talking-face test videos made from a real photograph that a registry package ships (matplotlib's
sample `grace_hopper.jpg`, 512x600), moved per frame by a known similarity transform, so a test
knows where the mouth is in every frame.

A small white disc is painted at the mouth centre of the photograph (`MOUTH`, read off the
photograph by eye). Wherever the crop lands, the disc shows where the mouth went: in a mouth ROI
centred on the mouth it sits at the ROI's centre.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

MOUTH = (269.0, 277.0)  # the mouth centre in grace_hopper.jpg (x, y pixels), read off a 4x zoom of the lips


def photo(marker: bool = True) -> np.ndarray:
    """The photograph, (600, 512, 3) uint8 RGB; with `marker`, the white disc at the mouth."""
    import matplotlib.cbook as cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = np.asarray(Image.open(f).convert("RGB")).copy()
    if marker:
        yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
        img[(xx - MOUTH[0]) ** 2 + (yy - MOUTH[1]) ** 2 <= 9] = 255
    return img


def motion(i: int, fps: float, scale: float = 0.8, amount: float = 1.0) -> tuple[float, float, float, float]:
    """(scale, angle in rad, dx, dy) of frame i: a slow sway, nod and zoom of the head (up to 4%,
    3 degrees, 16 and 8 pixels at scale 0.8)."""
    t = i / fps
    k = amount * scale / 0.8
    return (scale * (1 + 0.04 * amount * np.sin(2 * np.pi * t / 3.1)),
            np.deg2rad(3 * amount * np.sin(2 * np.pi * t / 3.7)),
            16 * k * np.sin(2 * np.pi * t / 4.3), 8 * k * np.sin(2 * np.pi * t / 2.9))


def place(img: np.ndarray, size: tuple[int, int], s: float, a: float, dx: float, dy: float,
          brightness: float = 1.0) -> tuple[np.ndarray, tuple[float, float]]:
    """The photograph scaled by s and turned by a about its mouth, which lands at the frame's
    centre plus (dx, dy); -> ((H, W, 3) uint8 frame, where the mouth is)."""
    import torch

    w, h = size
    mx, my = w / 2 + dx, h / 2 + dy
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ca, sa = np.cos(a), np.sin(a)
    u, v = (xs - mx) / s, (ys - my) / s  # frame -> photo: rotate back by a about the mouth
    px, py = ca * u + sa * v + MOUTH[0], -sa * u + ca * v + MOUTH[1]
    ih, iw = img.shape[:2]
    grid = np.stack([(px + 0.5) / iw * 2 - 1, (py + 0.5) / ih * 2 - 1], -1)[None]
    src = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    out = torch.nn.functional.grid_sample(src, torch.from_numpy(grid).float(), mode="bilinear",
                                          padding_mode="border", align_corners=False)
    frame = (out[0].permute(1, 2, 0).numpy() * brightness).clip(0, 255).astype(np.uint8)
    return frame, (mx, my)


def write_video(path: Path, frames: list[np.ndarray], fps: int, audio: np.ndarray | None = None,
                sample_rate: int = 44100) -> Path:
    """RGB frames as H.264 (yuv420p) at `fps`, with (channels, samples) float audio as AAC."""
    import av

    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=Fraction(fps))
        vs.width, vs.height, vs.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        vs.options = {"crf": "18", "preset": "veryfast"}
        st = None
        if audio is not None:
            st = c.add_stream("aac", rate=sample_rate)
            st.layout = "stereo" if audio.shape[0] == 2 else "mono"
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if st is not None:
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio.astype(np.float32)), format="fltp",
                                            layout=st.layout.name)
            fr.sample_rate = sample_rate
            for p in st.encode(fr):
                c.mux(p)
            for p in st.encode():
                c.mux(p)
    return path


def talking_face(path: Path, size=(640, 480), fps: int = 30, seconds: float = 2.0, scale: float = 0.8,
                 amount: float = 1.0, audio: bool = True, lost: tuple[int, int] | None = None,
                 second_face: bool = False) -> list[tuple[float, float]]:
    """Write a moving-face video; -> the mouth position in each written frame.

    `lost`: frames [a, b) show no face (the background only); `second_face`: a smaller, still copy
    of the face in the top left corner of every frame."""
    img = photo()
    frames, mouths = [], []
    for i in range(int(round(seconds * fps))):
        s, a, dx, dy = motion(i, fps, scale, amount)
        frame, m = place(img, size, s, a, dx, dy, brightness=1 + 0.1 * np.sin(i / 7))
        if lost and lost[0] <= i < lost[1]:
            frame[:] = 90
        if second_face:
            small, _ = place(img, (size[0] * 9 // 20, size[1] * 9 // 20), scale * 0.7, 0.0, 0.0, 0.0)
            frame[: small.shape[0], : small.shape[1]] = small
        frames.append(frame)
        mouths.append(m)
    sound = None
    if audio:
        t = np.arange(int(seconds * 44100)) / 44100
        tone = 0.1 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
        sound = np.stack([tone, 0.8 * tone])
    write_video(path, frames, fps, sound)
    return mouths


def marker_offset(roi: np.ndarray) -> float:
    """Distance in pixels from the ROI's centre to the white disc in a (H, W) mouth crop: the spot
    brightest against its surroundings (3x3 mean minus 11x11 mean), which a broad highlight of
    the skin is not."""
    import torch

    x = torch.from_numpy(roi.astype(np.float32))[None, None]
    near = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    around = torch.nn.functional.avg_pool2d(x, 11, stride=1, padding=5, count_include_pad=False)
    score = (near - around)[0, 0].numpy()
    y, xx = np.unravel_index(int(score.argmax()), score.shape)
    return float(np.hypot(xx - (roi.shape[1] - 1) / 2, y - (roi.shape[0] - 1) / 2))
