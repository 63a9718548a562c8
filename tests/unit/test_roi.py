"""Mouth ROI from landmarks: interpolation, smoothing, similarity alignment, centred crops."""

import numpy as np
import pytest

from mavsr_cli import roi
from mavsr_cli.errors import MavsrError


def _face_frame(angle_deg: float, scale: float, shift, size=224):
    """A gray frame with a dark elliptic mouth, drawn where the rotated/scaled/shifted template's
    mouth lies; returns (frame, its 68 landmarks)."""
    ref = roi.default_mean_face()
    a = np.deg2rad(angle_deg)
    r = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    c = np.array([128.0, 128.0])
    lm = (ref - c) @ r.T + c + np.asarray(shift)
    ys, xs = np.mgrid[0:size, 0:size]
    p = np.stack([xs, ys], -1).astype(float)
    back = (p - c - np.asarray(shift)) @ np.linalg.inv(r).T + c  # frame -> template coordinates
    inside = ((back[..., 0] - 128) / 30) ** 2 + ((back[..., 1] - 186) / 9) ** 2 <= 1
    frame = np.full((size, size), 170, np.uint8)
    frame[inside] = 20
    return frame, lm


def _blob(crop):
    ys, xs = np.nonzero(crop < 90)
    cov = np.cov(np.stack([xs, ys]))
    w, v = np.linalg.eigh(cov)
    major = v[:, np.argmax(w)]
    return xs.mean(), ys.mean(), abs(np.degrees(np.arctan2(major[1], major[0])))


@pytest.mark.parametrize("angle,scale,shift", [(0, 0.8, (-10, -20)), (12, 0.7, (5, -30)), (-8, 0.9, (-20, -35))])
def test_crops_are_centred_on_the_mouth_and_level(angle, scale, shift):
    frames, lms = zip(*[_face_frame(angle, scale, shift) for _ in range(5)], strict=True)
    crops = roi.mouth_rois(np.stack(frames), list(lms))
    assert crops.shape == (5, 96, 96) and crops.dtype == np.uint8
    x, y, tilt = _blob(crops[2])
    assert abs(x - 47.5) < 2 and abs(y - 47.5) < 2  # centred within a few pixels
    assert min(tilt, 180 - tilt) < 3  # rotation undone: the mouth is level


def test_missing_frames_are_interpolated_and_ends_held():
    a, b = np.zeros((68, 2)), np.full((68, 2), 10.0)
    out = roi.fill_missing([None, a, None, None, b, None])
    assert np.allclose(out[0], 0) and np.allclose(out[2], 10 / 3) and np.allclose(out[5], 10)
    with pytest.raises(MavsrError, match="no face"):
        roi.fill_missing([None, None])
    with pytest.raises(MavsrError, match="shape"):
        roi.fill_missing([np.zeros((5, 2))])


def test_smoothing_averages_a_window_and_keeps_constants():
    x = np.zeros((30, 68, 2))
    x[15] = 12.0
    s = roi.smooth(x, 12)
    assert np.allclose(s[15], 1.0) and np.allclose(s[0], 0.0)
    c = np.ones((7, 68, 2))
    assert np.allclose(roi.smooth(c, 12), 1.0)


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (10, 2))
    a = np.deg2rad(20)
    r = 1.3 * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    dst = src @ r.T + [7, -3]
    m = roi.similarity(src, dst)
    assert np.allclose(m[:, :2], r, atol=1e-9) and np.allclose(m[:, 2], [7, -3], atol=1e-7)


def test_short_landmark_lists_and_bad_mean_faces_are_errors(tmp_path):
    frame, lm = _face_frame(0, 0.8, (0, -20))
    with pytest.raises(MavsrError, match="landmark frames for"):
        roi.mouth_rois(np.stack([frame, frame]), [lm])
    bad = tmp_path / "face.txt"
    bad.write_text("1 2 3")
    with pytest.raises(MavsrError, match="68 x 2"):
        roi.load_mean_face(bad)
    good = tmp_path / "face.npy"
    np.save(good, roi.default_mean_face())
    assert np.allclose(roi.load_mean_face(good), roi.default_mean_face())
