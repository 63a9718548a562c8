"""Raw face video in, text out (issue 19): a 640x480, 30 fps talking-face mp4 with 44.1 kHz stereo
audio, made from a real photograph, goes through `transcribe` without --roi and through
`prepare dir` and `prepare lrs3` without landmark files; the mouth crops written are centred on
the mouth (the white disc painted on the photograph's mouth sits at the crop's centre)."""

import json
import pickle
import shutil

import numpy as np
import pytest
from e2e_helpers import mavsr
from face_videos import marker_offset, talking_face

from mavsr_cli import faces
from mavsr_cli.media import read_audio, read_video_gray


def test_transcribe_finds_the_face_and_decodes_without_a_roi(recipe, tmp_path):
    video = tmp_path / "phone.mp4"
    talking_face(video, size=(640, 480), fps=30, seconds=2.0)
    assert read_audio(video).ndim == 1  # stereo 44.1 kHz in, mono 16 kHz out
    roi = tmp_path / "roi.mp4"
    r = mavsr(recipe, "transcribe", str(video), "--exp", "exp/t", "--beam", "1", "--json", "--save-roi", str(roi))
    res = json.loads(r.stdout)
    assert res["mouth"] == "detected" and res["duration"] == pytest.approx(2.0, abs=0.05)
    crops = read_video_gray(roi)
    assert crops.shape == (50, 96, 96)  # 2 s at 25 fps
    assert max(marker_offset(c) for c in crops) < 5
    # the old ways still work: an explicit region, and a video that is a mouth crop
    r = mavsr(recipe, "transcribe", str(roi), "--exp", "exp/t", "--beam", "1", "--json", "--mouth-crop")
    assert json.loads(r.stdout)["mouth"] == "mouth crop"
    r = mavsr(recipe, "transcribe", str(video), "--exp", "exp/t", "--beam", "1", "--json", "--roi", "240,200,160,160")
    assert json.loads(r.stdout)["mouth"] == "roi"
    r = mavsr(recipe, "transcribe", str(video), "--exp", "exp/t", "--mouth-crop", ok=False)
    assert r.returncode == 2 and "640x480 frames are not a mouth crop" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # a crop is kept only for a clip transcribed: not where the budget is refused, never over the input
    r = mavsr(recipe, "transcribe", str(video), "--exp", "exp/t", "--budget", "1", "--save-roi",
              str(tmp_path / "refused.mp4"), ok=False)
    assert r.returncode == 2 and "no trained configuration fits" in r.stderr
    before = video.read_bytes()
    r = mavsr(recipe, "transcribe", str(video), "--exp", "exp/t", "--save-roi", str(video), ok=False)
    assert r.returncode == 2 and "is the input file" in r.stderr and video.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phone.mp4", "roi.mp4"]  # nothing else, no temporary


def test_prepare_dir_detects_faces_and_keeps_mouth_crops(tmp_path):
    root = tmp_path / "mine"
    (root / "ann").mkdir(parents=True)
    talking_face(root / "ann/take1.mp4", size=(640, 480), fps=30, seconds=1.6)
    (root / "ann/take1.txt").write_text("hello world\n")
    (root / "ann/blank.mp4").write_bytes(b"")
    empty = tmp_path / "empty.mp4"
    talking_face(empty, size=(320, 240), fps=25, seconds=0.8, lost=(0, 100))  # no face in any frame
    shutil.copy(empty, root / "ann/nobody.mp4")
    (root / "ann/nobody.txt").write_text("nobody here\n")
    d = tmp_path / "recipe"
    d.mkdir()
    r = mavsr(d, "prepare", "dir", "--root", str(root), "--split", "dev", "--nj", "1")
    utts = {json.loads(x)["id"]: json.loads(x) for x in (d / "data/dev/manifest.jsonl").read_text().splitlines()}
    assert set(utts) == {"ann-take1"}
    crops = read_video_gray(d / utts["ann-take1"]["video"])
    assert crops.shape == (40, 96, 96) and max(marker_offset(c) for c in crops) < 5
    assert "faces detected in 1 videos without landmarks" in r.stdout
    skipped = (d / "data/dev/skipped.txt").read_text()
    assert "nobody.mp4: no face found in any of 20 frames" in skipped
    cached = d / "corpus/dir/landmarks/ann/take1.pkl"
    with open(cached, "rb") as f:
        assert len(pickle.load(f)) == 40  # the landmarks found, for a rerun
    by = d / "corpus/dir/landmarks/DETECTED_BY.txt"  # and what found them
    assert by.read_text() == faces.describe() + "\n" and "dlib" in by.read_text() and "sha256:" in by.read_text()
    r = mavsr(d, "prepare", "dir", "--root", str(root), "--split", "dev", "--nj", "1", "--force")
    assert "another face detector" not in r.stdout
    by.write_text("mavsr 0.0.1 tracker, dlib 19.0.0 HOG frontal faces\n")  # as an older install had left it
    r = mavsr(d, "prepare", "dir", "--root", str(root), "--split", "dev", "--nj", "1", "--force")
    assert "holds landmarks found by another face detector (mavsr 0.0.1 tracker, dlib 19.0.0" in r.stdout
    assert (d / "data/dev/manifest.jsonl").read_text().count("\n") == 1  # reused as they are
    # --mouth-crops keeps the old rule: a video without landmarks must be a crop already
    shutil.copy(d / utts["ann-take1"]["video"], root / "ann/crop.mp4")
    (root / "ann/crop.txt").write_text("hello world\n")
    mavsr(d, "prepare", "dir", "--root", str(root), "--split", "crops", "--nj", "1", "--mouth-crops")
    assert [json.loads(x)["id"] for x in (d / "data/crops/manifest.jsonl").read_text().splitlines()] == ["ann-crop"]
    skipped = (d / "data/crops/skipped.txt").read_text()
    assert "take1.mp4: no landmarks: 640x480 frames are not a mouth crop" in skipped


def test_prepare_lrs3_without_pickles_matches_the_tree_with_them(tmp_path):
    """The same LRS3-shaped tree, once with the landmark pickles of the faces' known motion and
    once without any: the same manifests, and crops centred on the mouth either way."""
    from face_videos import motion

    from mavsr_cli import faces
    from mavsr_cli.datasets.lrs_text import format_text
    from mavsr_cli.media import read_video_at

    tree = tmp_path / "lrs3"
    still = faces.FaceLandmarker()
    for split, spk, n in (("trainval", "aaaaaaaaaaa", 2), ("test", "bbbbbbbbbbb", 1)):
        for k in range(n):
            stem = tree / split / spk / f"{k:05d}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            talking_face(stem.with_suffix(".mp4"), size=(640, 480), fps=25, seconds=1.2, amount=0.5 + 0.5 * k)
            stem.with_suffix(".txt").write_text(format_text("hello world", [("HELLO", 0.1, 0.5), ("WORLD", 0.6, 1.1)]))
    with_pkl = tmp_path / "with_pkl"
    shutil.copytree(tree, with_pkl)
    for mp4 in with_pkl.rglob("*.mp4"):  # landmarks from the known motion: the still photo's, moved
        frames = read_video_at(mp4, 25)
        pts0 = still.points(frames[0], still.faces(frames[0])[0])  # frame 0's face, then moved per frame
        s0, a0, dx0, dy0 = motion(0, 25, 0.8, 0.5 + 0.5 * int(mp4.stem))
        lms = []
        for i in range(len(frames)):
            s, a, dx, dy = motion(i, 25, 0.8, 0.5 + 0.5 * int(mp4.stem))
            c0 = np.array([320 + dx0, 240 + dy0])
            rot = lambda t: np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])  # noqa: E731
            p = (pts0 - c0) @ rot(-a0).T / s0  # back to the photo's frame about the mouth
            lms.append((p * s @ rot(a).T + [320 + dx, 240 + dy]).astype(np.float32))
        with open(mp4.with_suffix(".pkl"), "wb") as f:
            pickle.dump(lms, f)
    runs = {}
    for name, src in (("pickles", with_pkl), ("detected", tree)):
        d = tmp_path / f"r_{name}"
        d.mkdir()
        mavsr(d, "prepare", "lrs3", "--root", str(src), "--nj", "1")
        runs[name] = d
    for split in ("train", "val", "test"):
        a, b = ((runs[n] / f"data/{split}/manifest.jsonl").read_text().splitlines() for n in ("pickles", "detected"))
        strip = [[{k: v for k, v in json.loads(x).items() if k not in ("video", "audio")} for x in m] for m in (a, b)]
        assert strip[0] == strip[1], split
        for x in a:  # the same crop, whichever way the landmarks came: centred on the mouth
            crops = {n: read_video_gray(runs[n] / json.loads(x)["video"]) for n in runs}
            assert all(max(marker_offset(c) for c in v) < 5 for v in crops.values())
            diff = np.abs(crops["pickles"].astype(int) - crops["detected"].astype(int)).mean()
            assert diff < 12, diff  # mean absolute pixel difference of the two crops, 0-255
    assert (runs["detected"] / "corpus/lrs3/landmarks/trainval/aaaaaaaaaaa/00000.pkl").is_file()


def test_detection_runs_in_parallel_workers_and_in_shards(tmp_path):
    from mavsr_cli.datasets.lrs_text import format_text

    tree = tmp_path / "lrs3"
    for k in range(4):
        stem = tree / "trainval" / "ccccccccccc" / f"{k:05d}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        talking_face(stem.with_suffix(".mp4"), size=(320, 240), fps=25, seconds=0.8, scale=0.4, amount=k / 3)
        stem.with_suffix(".txt").write_text(format_text("hello", [("HELLO", 0.1, 0.6)]))
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    one.mkdir()
    sharded.mkdir()
    r = mavsr(one, "prepare", "lrs3", "--root", str(tree), "--nj", "2")  # two spawned workers, one detector each
    assert "faces detected in 4 videos" in r.stdout
    for i in (0, 1):
        mavsr(sharded, "prepare", "lrs3", "--root", str(tree), "--nj", "1", "--shard", f"{i}/2")
    assert len(list((sharded / "corpus/lrs3/landmarks").rglob("*.pkl"))) == 4  # each shard cached its own
    mavsr(sharded, "prepare", "lrs3", "--root", str(tree), "--nj", "1")  # the merge
    for split in ("train", "val"):
        a, b = ((d / f"data/{split}/manifest.jsonl").read_text() for d in (one, sharded))
        assert a == b, split
