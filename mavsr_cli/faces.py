"""Face and 68-point landmark detection for raw talking-face videos (the optional `faces` extra).

The detector is dlib's HOG frontal-face detector, which ships inside the dlib wheel (`dlib-bin`).
The landmarks come from dlib's 68-point shape predictor, shipped by the `face-recognition-models`
package. Its points follow the iBUG 300-W order, the convention `roi.py` aligns on and the one the
LRS2/LRS3 landmark pickles use. Nothing is downloaded at run time. The predictor was trained on
iBUG 300-W, whose licence excludes commercial use; README says so.

Per video, `track` returns one (68, 2) array per frame, or None where no face was found. It runs the
detector every `every` frames, on a copy scaled to at most `max_side` pixels; where that finds no
face, on copies twice as large, up to the frame's own size (dlib's HOG detector finds faces from
about 70 px wide, so a 1080p frame scaled to 480 px alone would hide every face under about 300 px,
such as a person seen from the waist up); and, where none of those finds a face, a frame of at most
UPSAMPLED_SIDE / 2 px a side at twice its size, taking boxes from SMALLEST_FACE px in the frame. A
finer look takes a new face only from FINER_FACE px wide in its pixels, unless it is near the
speaker: the detector's boxes near its smallest size are loose, and points fitted from them can put
the mouth half a crop off. While no face is tracked the detector runs on every frame, its finer
looks only every `every` frames. In between, the shape predictor follows the face from the previous
frame's points, so detection costs a fraction of the frames. With several faces, the one nearest the
previous face is kept (the largest at the start), and such frames are counted. A face lost for less
than `keep_speaker` frames is looked for where it was: a face found elsewhere meanwhile (another
person) is not taken. The gaps are filled and smoothed by `roi.mouth_rois`, as for landmarks read
from pickles.
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
# The square box the detector would draw around 68 points, in units of their spread (RMS distance
# from their mean): side, and the centre's shift from the mean. Medians over detections of two
# photographs at 9 sizes each (matplotlib's grace_hopper.jpg: 2.84-2.95, x 0.00-0.05, y -0.04 to
# -0.06; scikit-image's astronaut.png: 2.57, x -0.06, y -0.04).
BOX_SIDE, BOX_SHIFT = 2.8, (0.0, -0.04)
# pixels of the look: the narrowest box a finer look (beyond `max_side`) takes a new face from. In the
# tests' videos of one photograph, points fitted from the detector's boxes of 72 and 87 px (near its
# smallest size) put the mouth 40-65 px off in the 96 px crop; from boxes of 96 px and more, mostly within 5.
FINER_FACE = 96
# pixels a side: a frame of at most half this is also looked at twice as large, where the looks at
# its own size find no face (a face of 56-70 px, which they miss or see only in loose boxes)
UPSAMPLED_SIDE = 1280
# pixels of the frame: the narrowest face taken from the look at twice the frame's size. The detector's
# boxes come in steps (87, 105, 125, 151 px there): a 105 px box held faces of 42-52 px, whose points,
# fitted in the frame, put the mouth 40-65 px off in the crop; from 125 px boxes (about 58 px) within 5
SMALLEST_FACE = 56


@dataclass(frozen=True)
class DetectOptions:
    every: int = 5  # run the face detector on every k-th frame; the shape predictor tracks in between
    max_side: int = 480  # the detector first sees frames scaled to at most this many pixels a side
    min_mouth: float = 12.0  # pixels: a mouth narrower than this (median over frames) is too small to crop
    keep_speaker: int = 50  # frames: a face lost this recently is looked for where it was, not elsewhere


@dataclass
class Track:
    """What `FaceLandmarker.track` found in one video."""

    landmarks: list  # per frame: (68, 2) float32 in frame pixels, or None
    detections: int = 0  # frames the detector ran on
    missed: int = 0  # frames without a face
    several: int = 0  # detector frames with more than one face at the look that found them (the nearest kept)
    others: int = 0  # detector frames where only faces far from the lost one were seen (not taken)


_DESCRIBED: dict = {}


def describe(opt: DetectOptions = DetectOptions()) -> str:
    """One line naming what detects the landmarks: mavsr's tracker version, dlib's version, the
    predictor file's digest and the options (the cache of detected landmarks records it, so landmarks
    reused from an earlier run can be told apart from those this run would find)."""
    if opt not in _DESCRIBED:
        import hashlib

        import dlib

        from . import __version__

        digest = hashlib.sha256(_predictor_path().read_bytes()).hexdigest()[:16]
        _DESCRIBED[opt] = (f"mavsr {__version__} tracker, dlib {dlib.__version__} HOG frontal faces, {PREDICTOR} "
                           f"sha256:{digest}, every {opt.every} frames, max side {opt.max_side} px, "
                           f"frames up to {UPSAMPLED_SIDE // 2} px also at twice the size, "
                           f"boxes from {SMALLEST_FACE} px")
    return _DESCRIBED[opt]


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

    def faces(self, frame: np.ndarray, speaker: np.ndarray | None = None,
              looks: int | None = None) -> list[tuple[float, float, float, float]]:
        """Face boxes (left, top, right, bottom) in frame pixels, largest first, from the coarsest of
        the first `looks` of `scales` that shows a face; given the `speaker`'s last (68, 2) points,
        the coarsest that shows one near them (not `_far`), else the coarsest that shows any.
        Beyond the first look, a box under FINER_FACE px in the look's pixels counts only near the
        speaker, and a face under SMALLEST_FACE px in the frame's not at all. frame: (H, W) uint8."""
        h, w = frame.shape
        first: list = []
        for k, scale in enumerate(scales(h, w, self.opt.max_side)[:looks]):
            boxes = [b for b, side in self._boxes(frame, scale) if side >= SMALLEST_FACE * scale
                     and (k == 0 or side >= FINER_FACE or (speaker is not None and not _far(b, speaker)))]
            boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
            if boxes and (speaker is None or any(not _far(b, speaker) for b in boxes)):
                return boxes
            first = first or boxes
        return first

    def _boxes(self, frame: np.ndarray, scale: float) -> list:
        """[(box in frame pixels, its side in the look's pixels)] of one look at `scale`."""
        return [((r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), r.width())
                for r in self.detector(_scaled(frame, scale), 0)]

    def points(self, frame: np.ndarray, box) -> np.ndarray:
        """The 68 landmarks inside `box`, (68, 2) float32."""
        rect = self.dlib.rectangle(*(int(round(v)) for v in box))
        shape = self.predictor(frame, rect)
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(68)], np.float32)

    def track(self, frames: np.ndarray) -> Track:
        """Landmarks for every frame of (T, H, W) uint8 gray video.

        The predictor is fitted in a box drawn around the previous frame's points (`box_around`),
        and a face the detector gives anew is fitted once in its box, then again in the box around
        those points. The detector's own boxes jump between the scales of its image pyramid, and
        the predictor fits some of them badly (on the test photograph: a box 20% larger put the
        mouth 33 px low, on the chin; at 1080p a face whose full-size box is 125 px got a 144 px box
        at half size, and a tracker that kept that box's proportions slid to the chin within a second)."""
        out = Track([])
        prev, last, lost = None, None, 0
        for i, frame in enumerate(frames):
            box, fresh = (None if prev is None else box_around(prev)), False
            if i % self.opt.every == 0 or prev is None:  # lost: every frame, the finer looks every `every`
                looks = None if i % self.opt.every == 0 else 1
                box, fresh = self._detect(frame, box, prev, last, lost, looks, out)
            if box is None:
                out.landmarks.append(None)
                out.missed += 1
                prev, lost = None, lost + 1
                continue
            prev, lost = self.points(frame, box), 0
            if fresh:  # fitted again in the box its points imply, not the detector's
                prev = self.points(frame, box_around(prev))
            last = prev
            out.landmarks.append(prev)
        return out


    def _detect(self, frame, box, prev, last, lost: int, looks: int | None, out: Track):
        """A detector frame: (the box to fit the points in, whether it is the detector's). The tracked
        `box` while the detector sees the face there; else the detector's box of the face nearest
        the speaker's last points, or none while only another person's face is in view (for up to
        `keep_speaker` frames after the speaker was lost)."""
        speaker = prev if prev is not None else last if lost < self.opt.keep_speaker else None
        found = self.faces(frame, speaker, looks)
        out.detections += 1
        out.several += len(found) > 1
        near = _nearest(found, prev if prev is not None else last)
        if near is not None and box is not None and _overlap(near, box) >= 0.5:
            return box, False
        if near is not None and last is not None and lost < self.opt.keep_speaker and _far(near, last):
            near = None  # another person: the speaker turned away or left, for now
            out.others += 1
        return near, near is not None  # a new face, or none: restart from the detector's box


def scales(h: int, w: int, max_side: int) -> list[float]:
    """The sizes the detector looks at a (H, W) frame at, coarse to fine: scaled to at most
    `max_side` a side, then twice that, up to the frame's own size (a last step under 1.25x is
    merged into the one before: it would find little the finer look does not); and a frame of at
    most UPSAMPLED_SIDE / 2 a side at twice its size, last."""
    out = [min(1.0, max_side / max(h, w))]
    while out[-1] < 1.0:
        nxt = min(1.0, out[-1] * 2)
        out.append(1.0 if 1.0 / nxt < 1.25 else nxt)
    return out + [2.0] if 2 * max(h, w) <= UPSAMPLED_SIDE else out


def box_around(points: np.ndarray) -> tuple[float, float, float, float]:
    """The square box (left, top, right, bottom) the detector would draw around these (68, 2) points."""
    spread = max(_spread(points), 1.0)  # points collapsed onto one: a box of a few pixels, lost at the next look
    cx, cy = points.mean(0) + np.array(BOX_SHIFT) * spread
    half = BOX_SIDE * spread / 2
    return cx - half, cy - half, cx + half, cy + half


def _scaled(frame: np.ndarray, scale: float) -> np.ndarray:
    h, w = frame.shape
    return frame if scale == 1.0 else resize(frame[None], (max(1, round(h * scale)), max(1, round(w * scale))))[0]


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
