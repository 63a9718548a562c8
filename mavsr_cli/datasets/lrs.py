"""LRS3 and LRS2 official trees (formats.md) -> mouth-ROI media and utterance records.

Listing:
  LRS3  <root>/{pretrain,trainval,test}/<speaker>/<utt>.mp4 + .txt
  LRS2  <root>/mvlrs_v1/{main,pretrain}/<show>/<utt>.mp4 + .txt, split lists <root>/{train,val,test,pretrain}.txt
Processing one utterance: read the transcript (and word table), the video at 25 fps, the audio at
16 kHz mono, the landmark pickle at the same relative path (`.pkl`, under --landmarks or beside the
video); align and crop the mouth (roi.py); cut long utterances into segments of at most
`max_seconds` on word boundaries (pretrain); write `<out>/<split>/<speaker>/<utt>[_NN].mp4` (96x96
gray H.264 + AAC) and `.wav`. Anything wrong becomes a one-line skip reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..clocks import FPS, SAMPLE_RATE
from ..errors import MavsrError
from ..fsutil import atomic_write_pickle, atomic_write_text, inside
from ..media import check_mouth_crop, looks_like_mouth_crop, read_audio, read_video_at, to_roi, write_av, write_wav
from .lrs_text import clean_transcript, parse_text

LRS3_SPLITS = ("pretrain", "trainval", "test")
LRS2_LISTS = ("pretrain", "train", "val", "test")
_LIST_LINE = re.compile(r"^\s*(\S+)")


@dataclass(frozen=True)
class Item:
    split: str  # the corpus's own split name (pretrain, trainval, test; main list names for LRS2)
    speaker: str  # LRS3 speaker id / LRS2 show id
    utt: str  # 5-digit utterance number
    video: Path  # the mp4
    rel: Path  # path relative to the corpus root, without suffix (for the landmark lookup)
    uid: str = ""  # utterance id (default: <speaker>-<utt>)


def list_lrs3(root: Path, splits: tuple[str, ...] = LRS3_SPLITS) -> list[Item]:
    items = []
    for split in splits:
        d = root / split
        if not d.is_dir():
            continue
        for mp4 in sorted(d.glob("*/*.mp4")):
            items.append(Item(split, mp4.parent.name, mp4.stem, mp4, mp4.relative_to(root).with_suffix("")))
    if not items:
        raise MavsrError(f"no LRS3 videos under {root} (expected {'/'.join(splits)}/<speaker>/<utt>.mp4)")
    return items


def list_lrs2(root: Path, lists: tuple[str, ...] = LRS2_LISTS) -> list[Item]:
    items = []
    for name in lists:
        lst = root / f"{name}.txt"
        if not lst.is_file():
            continue
        sub = "pretrain" if name == "pretrain" else "main"
        try:
            lines = lst.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise MavsrError(f"{lst}: unreadable split list ({e})") from None
        for n, line in enumerate(lines, 1):
            m = _LIST_LINE.match(line)
            if not m:
                continue
            key = m.group(1)  # <show_id>/<utt>; test.txt may carry a second field
            show, _, utt = key.partition("/")
            mp4 = root / "mvlrs_v1" / sub / show / f"{utt}.mp4"
            if not inside(mp4, root / "mvlrs_v1" / sub):
                raise MavsrError(f"{lst}:{n}: entry {key!r} escapes the corpus root")
            items.append(Item(name, show, utt, mp4, mp4.relative_to(root).with_suffix("")))
    if not items:
        raise MavsrError(f"no LRS2 split lists ({', '.join(n + '.txt' for n in lists)}) under {root}")
    return items


KEEP_FIRST = ("test", "val", "train", "pretrain")  # the list that keeps a video listed in several: held-out data first


def drop_repeats(items: list[Item]) -> tuple[list[Item], list[tuple[str, str]]]:
    """A video listed in several split lists (LRS2's train.txt and val.txt) is kept in one: the
    first of KEEP_FIRST, so no held-out utterance is also trained on. -> (items, [(list it was
    dropped from, reason)])."""
    lists: dict[Path, list[str]] = {}
    for it in items:
        lists.setdefault(it.video, []).append(it.split)
    keep = {v: min(names, key=KEEP_FIRST.index) for v, names in lists.items()}
    kept, dropped, seen = [], [], set()
    for it in items:
        if it.split == keep[it.video] and it.video not in seen:
            seen.add(it.video)
            kept.append(it)
        else:
            where = "twice" if it.split == keep[it.video] else f"and in {keep[it.video]}.txt"
            dropped.append((it.split, f"{it.rel}: listed in {it.split}.txt {where}; kept in {keep[it.video]} once"))
    return kept, dropped


VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".mpg", ".mpeg")


def list_dir(root: Path, split: str) -> list[Item]:
    """Any folder of videos with a transcript `.txt` beside each: one item per video (recursive).
    Ids are the relative paths with '/' replaced by '-'; the speaker is the parent folder's name."""
    items = []
    for v in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
        rel = v.relative_to(root).with_suffix("")
        spk = v.parent.name if v.parent != root else "unknown"
        items.append(Item(split, spk, v.stem, v, rel, uid=rel.as_posix().replace("/", "-")))
    if not items:
        raise MavsrError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {root}")
    return items


def read_transcript(path: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """An LRS `Text:` file, or a plain transcript (the whole file) for custom data."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MavsrError(f"no transcript {Path(path).name}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MavsrError(f"{Path(path).name}: unreadable transcript ({e})") from None
    if raw.startswith("Text:"):
        return parse_text(path)
    text = clean_transcript(raw)
    if not text:
        raise MavsrError(f"{Path(path).name}: empty transcript")
    return text, []


def segments(text: str, words: list[tuple[str, float, float]], duration: float, max_seconds: float):
    """[(start s, end s, text)]: the whole utterance if it is short enough (or has no word table:
    `process` skips such a pretrain clip, `prepare dir` keeps it whole), else consecutive word
    groups each spanning at most max_seconds."""
    if duration <= max_seconds or not words:
        return [(0.0, duration, text)]
    out, cur = [], []
    for w in words:
        if cur and w[2] - cur[0][1] > max_seconds:
            out.append(cur)
            cur = []
        cur.append(w)
    if cur:
        out.append(cur)
    return [(g[0][1], g[-1][2], " ".join(x[0] for x in g)) for g in out]


def landmark_path(item: Item, landmarks_dir: Path | None) -> Path:
    base = landmarks_dir if landmarks_dir is not None else None
    return (base / item.rel).with_suffix(".pkl") if base is not None else item.video.with_suffix(".pkl")


def process(item: Item, root: Path, out_dir: Path, landmarks_dir: Path | None, mean_face: np.ndarray | None,
            max_seconds: float, custom: bool = False, mouth_crops: bool = False) -> list[dict] | str:
    """One utterance -> records {id, video, audio, text, num_frames, duration, speaker} of its
    written segments, or the reason it is skipped (a string).

    Landmarks come from the pickle at the video's relative path (under --landmarks DIR or beside
    the video), else from face detection (the `faces` extra), cached as a pickle under
    <out_dir>/landmarks/ so a rerun does not detect again. `custom` (prepare dir): plain-text
    transcripts are accepted, and a video without landmarks whose frames are mouth-crop sized is
    taken as a mouth crop (resized to 96x96); `mouth_crops` takes every such video as one, as
    before face detection existed."""
    from ..roi import mouth_rois

    rel = item.video.relative_to(root) if item.video.is_relative_to(root) else item.video
    found = None
    try:
        text, words = (read_transcript if custom else parse_text)(item.video.with_suffix(".txt"))
        frames = read_video_at(item.video, FPS)
        audio = read_audio(item.video)
        lms, found = _landmarks(item, frames, landmarks_dir, out_dir, custom, mouth_crops)
        rois = to_roi(frames) if lms is None else mouth_rois(frames, list(lms), mean_face)
    except MavsrError as e:
        return f"{rel}: {e}"
    duration = max(len(frames) / FPS, len(audio) / SAMPLE_RATE)
    if duration > max_seconds and not words and not custom:  # a pretrain clip kept whole would be over the cap
        return (f"{rel}: {duration:.1f} s is over --max-seconds {max_seconds:g} and its transcript has no word "
                "timings to cut it at")
    recs = []
    segs = segments(text, words, duration, max_seconds)
    for k, (s, e, seg_text) in enumerate(segs):
        f0 = int(round(s * FPS))
        f1 = min(len(rois), max(f0 + 1, int(round(e * FPS))))  # audio may run a little past the video
        a0, a1 = int(round(s * SAMPLE_RATE)), int(round(e * SAMPLE_RATE))
        if f1 <= f0 or not seg_text.strip():
            continue
        name = item.utt if len(segs) == 1 else f"{item.utt}_{k:02d}"
        stem = out_dir / item.split / item.speaker / name
        if not (stem.with_suffix(".mp4").is_file() and stem.with_suffix(".wav").is_file()):
            clip = audio[a0:a1] if len(segs) > 1 else audio
            write_wav(stem.with_suffix(".wav"), clip)
            write_av(stem.with_suffix(".mp4"), rois[f0:f1] if len(segs) > 1 else rois, clip)
        base = item.uid or f"{item.speaker}-{item.utt}"
        recs.append({"id": base if len(segs) == 1 else f"{base}_{k:02d}", "stem": stem, "text": seg_text.lower(),
                     "num_frames": (f1 - f0) if len(segs) > 1 else len(rois),
                     "duration": round((e - s) if len(segs) > 1 else duration, 3), "speaker": item.speaker,
                     **({"faces": found} if found and not recs else {})})
    if not recs:
        return f"{rel}: no segment left to write"
    return recs


DETECTED_BY = "DETECTED_BY.txt"  # beside the cached landmarks: one line per detector that wrote some (faces.describe)


def cache_detectors(out_dir: Path) -> list[str]:
    """The detectors whose landmarks the cache under <out_dir>/landmarks/ holds."""
    p = out_dir / "landmarks" / DETECTED_BY
    return p.read_text().splitlines() if p.is_file() else []


def record_detector(out_dir: Path, line: str) -> None:
    have = cache_detectors(out_dir)
    if line not in have:
        atomic_write_text(out_dir / "landmarks" / DETECTED_BY, "".join(x + "\n" for x in have + [line]))


def detected_path(out_dir: Path, item: Item) -> Path:
    """Where face detection caches a video's landmarks: the pickle layout of --landmarks DIR."""
    return out_dir / "landmarks" / item.rel.parent / f"{item.rel.name}.pkl"  # rel has no suffix: keep its dots


def _landmarks(item: Item, frames: np.ndarray, landmarks_dir: Path | None, out_dir: Path, custom: bool,
               mouth_crops: bool) -> tuple[list | None, dict | None]:
    """(per-frame landmarks, or None for a video taken as a mouth crop; what detection found, or
    None when it did not run)."""
    from ..safe_pickle import load_numpy_pickle

    lp = landmark_path(item, landmarks_dir)
    cached = detected_path(out_dir, item)
    if not lp.is_file() and cached.is_file() and not mouth_crops:  # found by an earlier run's detection
        lp = cached
    if lp.is_file():
        lms = load_numpy_pickle(lp)
        if not isinstance(lms, (list, tuple)):
            raise MavsrError(f"{lp.name} does not hold a per-frame list")
        if len(lms) < len(frames):
            raise MavsrError(f"landmark list has {len(lms)} frames, the video {len(frames)}")
        return list(lms), None
    if custom and (mouth_crops or looks_like_mouth_crop(frames)):
        check_mouth_crop(frames, "no landmarks", "give them (a .pkl beside the video, or --landmarks DIR), "
                         "or leave out --mouth-crops to detect the face")
        return None, None
    from .. import faces

    if not faces.available():
        raise MavsrError(f"no landmarks ({lp.name} not found; give --landmarks DIR, or {faces.EXTRA_HINT})")
    track = faces.detect(frames, _landmarker())
    atomic_write_pickle(cached, [None if p is None else p.astype(np.float32) for p in track.landmarks])
    return track.landmarks, {"frames": len(frames), "missed": track.missed, "several": track.several}


_LANDMARKER = None


def _landmarker():
    """One detector per process: loading the 68-point model takes about a second."""
    global _LANDMARKER
    if _LANDMARKER is None:
        from ..faces import FaceLandmarker

        _LANDMARKER = FaceLandmarker()
    return _LANDMARKER

