"""Face detection + mouth alignment (the `faces` extra): frames per second and where the crop lands.

The videos are the tests' talking faces (tests/face_videos.py): a real photograph moved per frame
by a known motion, with a white disc painted on the mouth. For each frame size and detector
interval, the same 2 s video is read at 25 fps, then timed from the frames to the 96x96 mouth
crops (detection, tracking, landmark smoothing, alignment, warp). The crop error is the distance
from the crop's centre to the disc, in crop pixels (the mouth is about 64 of the 96 wide).

    python benchmarks/faces.py [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit

import mavsr_cli  # noqa: F401  (torchaudio guard before transformers)
from mavsr_cli import faces
from mavsr_cli.media import read_video_at
from mavsr_cli.roi import mouth_rois

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from face_videos import marker_offset, talking_face  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="repetitions; each time is their median")
    ap.add_argument("--every", default="1,5", help="detector intervals to compare, comma-separated")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    # (label, frame size, photo scale): the face grows with the frame, except in the last, where a
    # face 116 px wide (the box around its points) in a 1080p frame is found only by the finer looks
    cases = [("224x224", (224, 224), 0.8 * 224 / 480), ("640x480", (640, 480), 0.8),
             ("1920x1080, small face", (1920, 1080), 0.6)]
    sizes = [label for label, _, _ in cases]
    intervals = [int(k) for k in args.every.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        videos = {}
        for label, size, scale in cases:
            path = Path(tmp) / f"{size[0]}x{size[1]}.mp4"
            talking_face(path, size=size, fps=25, seconds=2.0, scale=scale, audio=False)
            videos[label] = read_video_at(path, 25)
        marks = {k: faces.FaceLandmarker(faces.DetectOptions(every=k)) for k in intervals}
        times = {(s, k): [] for s in sizes for k in intervals}
        errors = {}
        for _ in range(args.reps):
            for s in sizes:
                for k in intervals:  # interleaved: the machine's drift hits every cell alike
                    frames = videos[s]
                    t0 = time.perf_counter()
                    track = faces.detect(frames, marks[k])
                    rois = mouth_rois(frames, track.landmarks)
                    times[s, k].append((time.perf_counter() - t0) / len(frames))
                    errors[s, k] = [marker_offset(r) for r in rois]
        for s in sizes:
            for k in intervals:
                per = statistics.median(times[s, k])
                e = errors[s, k]
                rows.append(f"| {s} | {k} | {1 / per:.1f} | {per * 1000:.1f} | {np.mean(e):.2f} | {max(e):.2f} |")
    lines = [
        "# Face detection and mouth alignment",
        "",
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, dlib "
        f"{__import__('dlib').__version__}; a 2 s video at 25 fps per size (50 frames); median of {args.reps} "
        "interleaved repetitions. Detector on frames scaled to at most "
        f"{faces.DetectOptions.max_side} px a side, then, where it finds no face, twice as large up to the "
        f"frame's own size, and a frame of at most {faces.UPSAMPLED_SIDE // 2} px a side at twice its size.",
        "",
        "| frames | detector every k frames | frames/s | ms/frame | crop error, mean px | max px |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
