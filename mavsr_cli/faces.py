"""Face and 68-point landmark detection for raw talking-face videos (the optional `faces` extra).

The detector is dlib's HOG frontal-face detector, which ships inside the dlib wheel (`dlib-bin`).
The landmarks come from dlib's 68-point shape predictor, shipped by the `face-recognition-models`
package. Its points follow the iBUG 300-W order, the convention `roi.py` aligns on and the one the
LRS2/LRS3 landmark pickles use. Nothing is downloaded at run time. The predictor was trained on
iBUG 300-W, whose licence excludes commercial use; README says so.

Per video, `track` returns one (68, 2) array per frame, or None where no face was found. It runs
the detector every `every` frames, on a copy scaled to at most `max_side` pixels. In between, the
shape predictor follows the face from the previous frame's points, so detection costs a fraction
of the frames. With several faces, the one nearest the previous face is kept (the largest at the
start), and such frames are counted. A face lost for less than `keep_speaker` frames is looked
for where it was: a face found elsewhere meanwhile (another person) is not taken. The gaps are
filled and smoothed by `roi.mouth_rois`, as for landmarks read from pickles.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MavsrError
from .media import resize

EXTRA_HINT = "face detection needs the faces extra: pip install 'mavsr[faces]' (make install adds it)"
PREDICTOR = "shape_predictor_68_face_landmarks.dat"


@dataclass(frozen=True)
class DetectOptions:
    every: int = 5  # run the face detector on every k-th frame; the shape predictor tracks in between
    max_side: int = 480  # the detector sees frames scaled to at most this many pixels a side
    min_mouth: float = 12.0  # pixels: a mouth narrower than this (median over frames) is too small to crop
    keep_speaker: int = 50  # frames: a face lost this recently is looked for where it was, not elsewhere


@dataclass
class Track:
    """What `FaceLandmarker.track` found in one video."""

    landmarks: list  # per frame: (68, 2) float32 in frame pixels, or None
    detections: int = 0  # frames the detector ran on
    missed: int = 0  # frames without a face
    several: int = 0  # detector frames with more than one face (the nearest to the last one kept)
    others: int = 0  # detector frames where only faces far from the lost one were seen (not taken)


def available() -> bool:
    return importlib.util.find_spec("dlib") is not None and _predictor_path() is not None


def _predictor_path() -> Path | None:
    """The 68-point model inside the face-recognition-models package, found without importing it
    (its __init__ needs pkg_resources, which new setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        p = Path(base) / "models" / PREDICTOR
        if p.is_file():
            return p
    return None


class FaceLandmarker:
    """dlib's face detector and 68-point predictor, loaded once and used on many videos."""

    def __init__(self, opt: DetectOptions = DetectOptions()) -> None:
        if opt.every < 1 or opt.max_side < 32:
            raise MavsrError(f"face detection: every must be >= 1 and max_side >= 32, got {opt.every}, {opt.max_side}")
        if not available():
            raise MavsrError(EXTRA_HINT)
        import dlib

        self.dlib = dlib
        self.opt = opt
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(_predictor_path()))

    def faces(self, frame: np.ndarray) -> list[tuple[float, float, float, float]]:
        """Face boxes (left, top, right, bottom) in frame pixels, largest first. frame: (H, W) uint8."""
        h, w = frame.shape
        scale = min(1.0, self.opt.max_side / max(h, w))
        small = frame if scale == 1.0 else resize(frame[None], (max(1, round(h * scale)), max(1, round(w * scale))))[0]
        boxes = [(r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale)
                 for r in self.detector(small, 0)]
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def points(self, frame: np.ndarray, box) -> np.ndarray:
        """The 68 landmarks inside `box`, (68, 2) float32."""
        rect = self.dlib.rectangle(*(int(round(v)) for v in box))
        shape = self.predictor(frame, rect)
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float32)

    def track(self, frames: np.ndarray) -> Track:
        """Landmarks for every frame of (T, H, W) uint8 gray video.

        A detector frame that finds the tracked face keeps following it rather than restart from
        the new box: the detector's boxes jump between the scales of its image pyramid, and the
        predictor fits some of them badly (measured on the test photograph: a box 20% larger put
        the mouth 33 px low, on the chin)."""
        out = Track([])
        prev, anchor, last, lost = None, None, None, 0
        for i, frame in enumerate(frames):
            box = None if prev is None else _follow(anchor, prev)
            if i % self.opt.every == 0 or prev is None:
                found = self.faces(frame)
                out.detections += 1
                out.several += len(found) > 1
                near = _nearest(found, prev if prev is not None else last)
                if near is None or box is None or _overlap(near, box) < 0.5:
                    if near is not None and last is not None and lost < self.opt.keep_speaker and _far(near, last):
                        near = None  # another person: the speaker turned away or left, for now
                        out.others += 1
                    box, anchor = near, None  # a new face, or none: restart from the detector's box
            if box is None:
                out.landmarks.append(None)
                out.missed += 1
                prev, lost = None, lost + 1
                continue
            prev, lost = self.points(frame, box), 0
            last = prev
            if anchor is None:  # the detector's box and the points it gave: later boxes follow the points
                anchor = (box, prev.mean(0), _spread(prev))
            out.landmarks.append(prev)
        return out


def _far(box, points: np.ndarray) -> bool:
    """The box's centre more than a face's width (about 3 spreads) from where the points were."""
    return float(np.hypot(*(_centre(box) - points.mean(0)))) > 3 * _spread(points)


def _overlap(a, b) -> float:
    """Intersection over union of two (left, top, right, bottom) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _centre(box) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])


def _spread(points: np.ndarray) -> float:
    return float(np.sqrt(((points - points.mean(0)) ** 2).sum(1).mean()))


def _nearest(boxes: list, prev: np.ndarray | None):
    """The box to keep: the largest, or the one whose centre is nearest the previous face's."""
    if not boxes:
        return None
    if prev is None:
        return boxes[0]
    c = prev.mean(0)
    return min(boxes, key=lambda b: float(np.hypot(*(_centre(b) - c))))


def _follow(anchor, prev: np.ndarray):
    """The detector box moved and scaled as the points moved since the detection."""
    (x0, y0, x1, y1), c0, s0 = anchor
    c, k = prev.mean(0), _spread(prev) / max(s0, 1e-6)
    bx, by = _centre(anchor[0]) + c - c0
    hw, hh = (x1 - x0) / 2 * k, (y1 - y0) / 2 * k
    return bx - hw, by - hh, bx + hw, by + hh


def mouth_width(landmarks: list) -> float:
    """Median distance between the mouth corners (points 48 and 54) over the frames with a face."""
    widths = [float(np.hypot(*(p[54] - p[48]))) for p in landmarks if p is not None]
    return float(np.median(widths)) if widths else 0.0


def detect(frames: np.ndarray, landmarker: FaceLandmarker | None = None,
           opt: DetectOptions = DetectOptions()) -> Track:
    """Track the face of a video and check it can be cropped: one line of error otherwise."""
    lm = landmarker or FaceLandmarker(opt)
    tr = lm.track(frames)
    if tr.missed == len(frames):
        raise MavsrError(f"no face found in any of {len(frames)} frames")
    width = mouth_width(tr.landmarks)
    if width < lm.opt.min_mouth:
        raise MavsrError(f"the face is too small to crop: its mouth is {width:.0f} px wide, at least "
                         f"{lm.opt.min_mouth:.0f} needed")
    return tr
