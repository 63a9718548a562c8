"""Mouth regions of interest from 68-point face landmarks (formats.md, "Pre-computed landmarks").

The common LRS2/LRS3 recipe, which the pretrained AV-HuBERT saw: fill frames without a face by
linear interpolation, smooth the landmarks over a window of 12 frames, estimate per frame a
similarity transform (rotation, uniform scale, translation) from stable points (eye corners, nose)
to a reference mean face, warp the frame with it, and cut a 96x96 patch centred on the mean of the
warped mouth points (48-67).

The reference face shipped here is our own template (`default_mean_face`): a symmetric 68-point
iBUG layout in a 256x256 frame; `--mean-face FILE` (a .npy or whitespace text of 68 x 2 numbers)
replaces it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import MavsrError

MOUTH = slice(48, 68)
STABLE = [33, 36, 39, 42, 45]  # nose tip, outer and inner eye corners: they move least with speech
REF_SIZE = 256


def default_mean_face() -> np.ndarray:
    """A symmetric frontal face in the iBUG 68-point order, in a 256x256 reference frame, (68, 2)."""
    pts = np.zeros((68, 2))
    cx = REF_SIZE / 2
    # 0-16 jaw: a half ellipse from ear to ear
    a = np.linspace(np.pi, 0, 17)
    pts[0:17] = np.c_[cx + 78 * np.cos(a), 120 + 95 * np.sin(a)]
    # 17-21, 22-26 eyebrows
    pts[17:22] = np.c_[np.linspace(cx - 66, cx - 14, 5), [92, 84, 81, 82, 86]]
    pts[22:27] = np.c_[cx + (cx - pts[17:22, 0])[::-1], [86, 82, 81, 84, 92]]
    # 27-30 nose bridge, 31-35 nostrils
    pts[27:31] = np.c_[[cx] * 4, np.linspace(104, 146, 4)]
    pts[31:36] = np.c_[np.linspace(cx - 18, cx + 18, 5), [154, 157, 159, 157, 154]]
    # 36-41 left eye, 42-47 right eye (corner, top, top, corner, bottom, bottom)
    for start, ex in ((36, cx - 40), (42, cx + 40)):
        pts[start:start + 6] = np.c_[[ex - 18, ex - 7, ex + 7, ex + 18, ex + 7, ex - 7],
                                     [108, 101, 101, 108, 113, 113]]
    # 48-59 outer lip (corner, top 5, corner, bottom 5), 60-67 inner lip
    mx, my = cx, 186
    outer_a = np.linspace(np.pi, 0, 7)
    pts[48:55] = np.c_[mx + 32 * np.cos(outer_a), my - 10 * np.sin(outer_a)]
    pts[55:60] = np.c_[mx + 32 * np.cos(np.linspace(np.pi / 6, 5 * np.pi / 6, 5)),
                       my + 12 * np.sin(np.linspace(np.pi / 6, 5 * np.pi / 6, 5))]
    inner_a = np.linspace(np.pi, 0, 5)
    pts[60:65] = np.c_[mx + 20 * np.cos(inner_a), my - 4 * np.sin(inner_a)]
    pts[65:68] = np.c_[mx + 20 * np.cos(np.linspace(np.pi / 4, 3 * np.pi / 4, 3)),
                       my + 4 * np.sin(np.linspace(np.pi / 4, 3 * np.pi / 4, 3))]
    return pts


def load_mean_face(path: str | Path | None) -> np.ndarray:
    if path is None:
        return default_mean_face()
    p = Path(path)
    try:
        arr = np.load(p) if p.suffix == ".npy" else np.loadtxt(p)
    except (OSError, ValueError) as e:
        raise MavsrError(f"cannot read mean face {p}: {e}") from None
    arr = np.asarray(arr, dtype=np.float64).reshape(-1, 2) if np.size(arr) == 136 else None
    if arr is None:
        raise MavsrError(f"mean face {p} must hold 68 x 2 numbers")
    return arr


def fill_missing(landmarks: list) -> np.ndarray:
    """Per-frame (68, 2) arrays or None -> (T, 68, 2), missing frames linearly interpolated
    (held at the ends). No face in any frame is an error."""
    t = len(landmarks)
    have = [i for i, x in enumerate(landmarks) if x is not None]
    if not have:
        raise MavsrError("no face landmarks in any frame")
    out = np.zeros((t, 68, 2))
    for i in have:
        try:
            a = np.asarray(landmarks[i], dtype=np.float64)
        except (TypeError, ValueError):
            raise MavsrError(f"landmarks of frame {i} are not numbers ({type(landmarks[i]).__name__})") from None
        if a.shape != (68, 2):
            raise MavsrError(f"landmarks of frame {i} have shape {a.shape}, expected (68, 2)")
        if not np.isfinite(a).all():
            raise MavsrError(f"landmarks of frame {i} are not finite")
        out[i] = a
    idx = np.arange(t)
    flat = out.reshape(t, -1)
    for j in range(flat.shape[1]):
        flat[:, j] = np.interp(idx, have, flat[have, j])
    return flat.reshape(t, 68, 2)


def smooth(landmarks: np.ndarray, window: int = 12) -> np.ndarray:
    """Centred moving average over `window` frames (shorter at the ends)."""
    t = len(landmarks)
    out = np.empty_like(landmarks)
    half = window // 2
    for i in range(t):
        lo, hi = max(0, i - half), min(t, i + window - half)
        out[i] = landmarks[lo:hi].mean(0)
    return out


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama) mapping src points onto dst: 2x3 matrix."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = np.trace(np.diag(sig) @ e) / max(1e-12, (s ** 2).sum() / len(src))
    m = np.zeros((2, 3))
    m[:, :2] = scale * r
    m[:, 2] = mu_d - scale * r @ mu_s
    return m


def warp_crop(frame: np.ndarray, m: np.ndarray, center: np.ndarray, size: int = 96) -> np.ndarray:
    """Sample the size x size patch centred at `center` of the frame warped by m (2x3, frame ->
    reference), bilinearly, (size, size) uint8. Outside the frame is black."""
    h, w = frame.shape
    a, t = m[:, :2], m[:, 2]
    inv = np.linalg.inv(a)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    ref = np.stack([xs + center[0] - size / 2 + 0.5, ys + center[1] - size / 2 + 0.5], -1)  # (S, S, 2)
    src = (ref - t) @ inv.T  # back into frame pixels
    grid = torch.from_numpy(np.stack([(src[..., 0] + 0.5) / w * 2 - 1, (src[..., 1] + 0.5) / h * 2 - 1], -1))
    img = torch.from_numpy(frame.astype(np.float32))[None, None]
    out = torch.nn.functional.grid_sample(img, grid[None].float(), mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def mouth_rois(frames: np.ndarray, landmarks: list, mean_face: np.ndarray | None = None, size: int = 96,
               window: int = 12) -> np.ndarray:
    """(T, H, W) gray frames + per-frame landmarks -> (T, size, size) mouth crops, aligned."""
    if len(landmarks) < len(frames):
        raise MavsrError(f"{len(landmarks)} landmark frames for {len(frames)} video frames")
    ref = default_mean_face() if mean_face is None else mean_face
    lm = smooth(fill_missing(list(landmarks[: len(frames)])), window)
    out = np.empty((len(frames), size, size), np.uint8)
    for i, frame in enumerate(frames):
        m = similarity(lm[i][STABLE], ref[STABLE])
        mouth = lm[i][MOUTH] @ m[:, :2].T + m[:, 2]
        out[i] = warp_crop(frame, m, mouth.mean(0), size)
    return out
