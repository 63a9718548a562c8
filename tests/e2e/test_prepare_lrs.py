"""`mavsr prepare lrs3|lrs2` on fixture trees in the official layouts (tiny face videos + landmark pickles)."""

import json
import pickle

import numpy as np
import pytest
from e2e_helpers import mavsr

from mavsr_cli.datasets.lrs_text import format_text
from mavsr_cli.media import read_video_gray, write_av
from mavsr_cli.roi import default_mean_face

SIZE = 160


def face_video(n_frames: int, seed: int, mouth_open=True):
    """Frames of a drawn face (a dark mouth ellipse that opens and closes) and its landmarks."""
    rng = np.random.default_rng(seed)
    ref = default_mean_face()
    scale, angle = rng.uniform(0.45, 0.55), np.deg2rad(rng.uniform(-8, 8))
    r = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array([SIZE / 2 - 128, SIZE / 2 - 128]) + rng.uniform(-8, 8, 2)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    p = np.stack([xs, ys], -1).astype(float)
    frames, lms = [], []
    for t in range(n_frames):
        jitter = rng.normal(0, 0.3, 2)
        lm = (ref - 128) @ r.T + 128 + shift + jitter
        back = (p - 128 - shift - jitter) @ np.linalg.inv(r).T + 128
        h = 6 + (5 * np.sin(t / 3) if mouth_open else 0)
        inside = ((back[..., 0] - 128) / 30) ** 2 + ((back[..., 1] - 186) / h) ** 2 <= 1
        f = np.full((SIZE, SIZE), 170, np.uint8)
        f[inside] = 20
        frames.append(f)
        lms.append(lm.astype(np.float32))
    return np.stack(frames), lms


def write_utt(stem, words, seed, audio=True, landmarks="full", text_ok=True):
    dur = words[-1][2] + 0.2
    n = int(round(dur * 25))
    frames, lms = face_video(n, seed)
    t = np.arange(int(dur * 16000)) / 16000
    wav = (0.1 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    write_av(stem.with_suffix(".mp4"), frames, wav if audio else None)
    text = " ".join(w for w, _, _ in words)
    stem.with_suffix(".txt").write_text(format_text(text, words) if text_ok else "garbage without header\n")
    if landmarks == "short":
        lms = lms[: n // 2]
    if landmarks:
        lms = [None if k % 7 == 3 else x for k, x in enumerate(lms)]  # some frames without a face
        with open(stem.with_suffix(".pkl"), "wb") as f:
            pickle.dump(lms, f, protocol=2)


def words_for(n, start=0.1, step=0.3):
    vocab = ["ALPHA", "BRAVO", "CHARLIE", "DELTA", "ECHO", "FOXTROT", "GOLF"]
    return [(vocab[k % len(vocab)], round(start + k * step, 2), round(start + k * step + 0.25, 2)) for k in range(n)]


@pytest.fixture(scope="module")
def lrs3_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("LRS3")
    spk = ["aBcDeFgHiJ0", "zz_-9yXwVu1"]
    for split, s, u, kw in [("trainval", spk[0], "00001", {}), ("trainval", spk[1], "00002", {}),
                            ("test", spk[1], "00001", {}), ("pretrain", spk[0], "00003", {}),
                            ("trainval", spk[0], "00004", {"text_ok": False}),
                            ("trainval", spk[1], "00005", {"audio": False}),
                            ("trainval", spk[1], "00006", {"landmarks": "short"}),
                            ("test", spk[0], "00007", {"landmarks": None})]:
        d = root / split / s
        d.mkdir(parents=True, exist_ok=True)
        write_utt(d / u, words_for(8 if split == "pretrain" else 3), seed=int(u), **kw)
    bad = root / "trainval" / spk[0] / "00008.mp4"
    bad.write_bytes(b"not a video at all")
    bad.with_suffix(".txt").write_text(format_text("HELLO", [("HELLO", 0.1, 0.3)]))
    return root


def test_lrs3_tree_prepares_into_manifests_with_reasons_for_every_skip(lrs3_tree, tmp_path):
    d = tmp_path / "recipe"
    d.mkdir()
    r = mavsr(d, "prepare", "lrs3", "--root", str(lrs3_tree), "--max-seconds", "1.0", "--nj", "1")
    train = [json.loads(x) for x in (d / "data/train/manifest.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (d / "data/test/manifest.jsonl").read_text().splitlines()]
    val = [json.loads(x)["id"] for x in (d / "data/val/manifest.jsonl").read_text().splitlines()]
    ids = [u["id"] for u in train]
    # a share of trainval is held out as val (one at least), never pretrain segments nor test
    assert len(val) == 1 and val[0] in ("aBcDeFgHiJ0-00001", "zz_-9yXwVu1-00002") and not set(val) & set(ids)
    assert {"aBcDeFgHiJ0-00001", "zz_-9yXwVu1-00002"} <= set(ids) | set(val)
    seg = sorted(i for i in ids if i.startswith("aBcDeFgHiJ0-00003_"))
    assert len(seg) >= 3  # 8 words over 2.4 s cut into segments of at most 1 s on word boundaries
    segs = [u for u in train if u["id"] in seg]
    assert all(u["duration"] <= 1.0 + 1e-6 for u in segs)
    assert " ".join(u["text"] for u in sorted(segs, key=lambda u: u["id"])) == \
        " ".join(w.lower() for w, _, _ in words_for(8))
    assert [u["id"] for u in test] == ["zz_-9yXwVu1-00001"]
    skipped = (d / "data/train/skipped.txt").read_text() + (d / "data/test/skipped.txt").read_text()
    for utt, why in (("00004", "Text:"), ("00005", "no audio"), ("00006", "landmark list has"),
                     ("00007", "no face found"), ("00008", "00008.mp4")):  # 00007: no pickle, and the
        # detector does not take the drawn face for one
        assert any(utt in line and why in line for line in skipped.splitlines()), (utt, why, skipped)
    assert "5 skipped" not in r.stdout  # reported per split
    # the crop is centred on the mouth: a dark blob around the middle of a 96x96 frame
    first = next(json.loads(x) for split in ("train", "val")
                 for x in (d / f"data/{split}/manifest.jsonl").read_text().splitlines()
                 if json.loads(x)["id"] == "aBcDeFgHiJ0-00001")
    v = read_video_gray(d / first["video"])
    assert v.shape[1:] == (96, 96)
    ys, xs = np.nonzero(v[len(v) // 2] < 90)
    assert abs(xs.mean() - 47.5) < 4 and abs(ys.mean() - 47.5) < 4
    # a second run is a no-op
    before = {p: p.stat().st_mtime_ns for p in (d / "data").rglob("*") if p.is_file()}
    r2 = mavsr(d, "prepare", "lrs3", "--root", str(lrs3_tree), "--max-seconds", "1.0", "--nj", "1")
    assert "are done" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in (d / "data").rglob("*") if p.is_file()} == before


def test_sharded_preparation_merges(lrs3_tree, tmp_path):
    d = tmp_path / "recipe"
    d.mkdir()
    for i in (1, 0):
        r = mavsr(d, "prepare", "lrs3", "--root", str(lrs3_tree), "--nj", "1", "--shard", f"{i}/2")
        assert "run without --shard" in r.stdout
    assert not (d / "data/train/.done").exists()
    mavsr(d, "prepare", "lrs3", "--root", str(lrs3_tree), "--nj", "1")
    assert (d / "data/train/.done").is_file()


def test_lrs2_lists_pick_the_splits(tmp_path):
    root = tmp_path / "LRS2"
    shows = ["5535415699068794046", "6330311066473698535"]
    for s, u in ((shows[0], "00001"), (shows[0], "00002"), (shows[1], "00001")):
        d = root / "mvlrs_v1/main" / s
        d.mkdir(parents=True, exist_ok=True)
        write_utt(d / u, words_for(3), seed=int(u))
    (root / "train.txt").write_text(f"{shows[0]}/00001\n")
    (root / "val.txt").write_text(f"{shows[0]}/00002\n")
    (root / "test.txt").write_text(f"{shows[1]}/00001 NF\n")  # a second field: ignored
    d = tmp_path / "recipe"
    d.mkdir()
    mavsr(d, "prepare", "lrs2", "--root", str(root), "--nj", "1")
    for split, want in (("train", f"{shows[0]}-00001"), ("val", f"{shows[0]}-00002"), ("test", f"{shows[1]}-00001")):
        got = [json.loads(x)["id"] for x in (d / f"data/{split}/manifest.jsonl").read_text().splitlines()]
        assert got == [want]
    r = mavsr(d, "prepare", "lrs2", "--root", str(tmp_path / "nowhere"), "--force", ok=False)
    assert r.returncode == 2 and "not a directory" in r.stderr


def test_lrs2_repeats_across_lists_and_long_pretrain_clips_without_word_timings(tmp_path):
    """An utterance in train.txt and val.txt is kept in val only, with a warning and a skip reason;
    a pretrain clip over --max-seconds without a word table is skipped, one with it is cut."""
    root = tmp_path / "LRS2"
    show = "5535415699068794046"
    (root / "mvlrs_v1/main" / show).mkdir(parents=True)
    (root / "mvlrs_v1/pretrain" / show).mkdir(parents=True)
    write_utt(root / "mvlrs_v1/main" / show / "00001", words_for(3), seed=1)
    write_utt(root / "mvlrs_v1/main" / show / "00002", words_for(3), seed=2)
    long_words = words_for(10)  # 3.1 s
    write_utt(root / "mvlrs_v1/pretrain" / show / "00003", long_words, seed=3)
    bare = root / "mvlrs_v1/pretrain" / show / "00004"
    write_utt(bare, long_words, seed=4)
    bare.with_suffix(".txt").write_text(format_text(" ".join(w for w, _, _ in long_words), []))  # no word table
    (root / "pretrain.txt").write_text(f"{show}/00003\n{show}/00004\n")
    (root / "train.txt").write_text(f"{show}/00001\n{show}/00002\n")
    (root / "val.txt").write_text(f"{show}/00001\n")
    (root / "test.txt").write_text(f"{show}/00002\n")
    d = tmp_path / "recipe"
    d.mkdir()
    r = mavsr(d, "prepare", "lrs2", "--root", str(root), "--nj", "1", "--max-seconds", "2")
    assert "warning: 2 videos listed in more than one split list" in r.stdout, r.stdout
    ids = {s: [json.loads(x)["id"] for x in (d / f"data/{s}/manifest.jsonl").read_text().splitlines()]
           for s in ("train", "val", "test")}
    assert ids["val"] == [f"{show}-00001"] and ids["test"] == [f"{show}-00002"]
    assert ids["train"] and all(i.startswith(f"{show}-00003_") for i in ids["train"])  # cut, and nothing else
    skipped = (d / "data/train/skipped.txt").read_text()
    assert f"main/{show}/00001: listed in train.txt and in val.txt; kept in val once" in skipped
    assert f"main/{show}/00002: listed in train.txt and in test.txt; kept in test once" in skipped
    assert f"pretrain/{show}/00004.mp4: 3.3 s is over --max-seconds 2 and its transcript has no word timings" in skipped


def test_the_lrs3_recipe_script_runs_its_prepare_stage(lrs3_tree, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shutil.copytree(root / "recipes/lrs3", tmp_path / "recipes/lrs3")
    shutil.copy(root / "recipes/lrs_run.sh", tmp_path / "recipes/lrs_run.sh")
    env = dict(os.environ, LRS3_ROOT=str(lrs3_tree), NJ="1", HF_HUB_OFFLINE="1", MAVSR_QUIET="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", str(tmp_path / "recipes/lrs3/run.sh"), "--stage", "0", "--stop-stage", "0"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "recipes/lrs3/data/train/.done").is_file()
    r = subprocess.run(["bash", str(tmp_path / "recipes/lrs3/run.sh"), "--bogus"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 2 and "unknown option" in r.stderr


def test_prepare_dir_takes_any_folder_of_videos_with_transcripts(tmp_path):
    root = tmp_path / "mydata"
    (root / "alice/day1").mkdir(parents=True)
    (root / "bob").mkdir()
    write_utt(root / "alice/day1/take1", words_for(3), seed=1)  # LRS text + landmarks: aligned
    frames, _ = face_video(20, seed=2)
    t = np.arange(16000 * 20 // 25) / 16000
    write_av(root / "bob/clip.mp4", frames[:, 32:128, 32:128], (0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))
    (root / "bob/clip.txt").write_text("hello there\n")  # plain text, no landmarks: used as a mouth crop
    write_av(root / "bob/orphan.mp4", frames, None)  # no transcript
    face = np.pad(frames, ((0, 0), (160, 480 - 160 - frames.shape[1]), (240, 640 - 240 - frames.shape[2])))
    write_av(root / "bob/face.mp4", face, (0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32))  # 640x480
    (root / "bob/face.txt").write_text("a whole face\n")  # no landmarks, not a mouth crop, no face the detector finds
    d = tmp_path / "recipe"
    d.mkdir()
    r = mavsr(d, "prepare", "dir", "--root", str(root), "--split", "dev", "--nj", "1")
    utts = {json.loads(x)["id"]: json.loads(x) for x in (d / "data/dev/manifest.jsonl").read_text().splitlines()}
    assert set(utts) == {"alice-day1-take1", "bob-clip"}
    assert utts["bob-clip"]["text"] == "hello there" and utts["bob-clip"]["speaker"] == "bob"
    assert read_video_gray(d / utts["bob-clip"]["video"]).shape[1:] == (96, 96)
    skipped = (d / "data/dev/skipped.txt").read_text()
    assert "orphan" in skipped and "2 skipped" in r.stdout
    assert "face.mp4: no face found in any of 20 frames" in skipped


def test_an_llm_avsr_label_list_imports_as_a_manifest(tmp_path):
    data = tmp_path / "preprocessed"
    d0 = data / "lrs3" / "lrs3_video_seg24s" / "test" / "spk0000001"
    d0.mkdir(parents=True)
    frames, _ = face_video(10, seed=3)
    write_av(d0 / "00001.mp4", frames[:, 32:128, 32:128], None)
    (d0 / "00001.wav").write_bytes(b"RIFF")  # existence is what is checked
    write_av(d0 / "00002.mp4", frames[:, 32:128, 32:128], None)  # its .wav is missing
    lst = tmp_path / "test.csv"
    lst.write_text("lrs3,lrs3_video_seg24s/test/spk0000001/00001.mp4,10,12 55 7,hello, world\n"
                   "lrs3,lrs3_video_seg24s/test/spk0000001/00002.mp4,10,3 4,bye\n"
                   "lrs3,broken line\n")
    d = tmp_path / "recipe"
    d.mkdir()
    r = mavsr(d, "prepare", "csv", "--csv", str(lst), "--root", str(data), "--split", "test")
    (u,) = [json.loads(x) for x in (d / "data/test/manifest.jsonl").read_text().splitlines()]
    assert u["id"] == "lrs3-lrs3_video_seg24s-test-spk0000001-00001" and u["text"] == "hello, world"
    assert u["num_frames"] == 10 and u["duration"] == 0.4 and u["audio"].endswith("00001.wav")
    assert u["speaker"] == "spk0000001"
    skipped = (d / "data/test/skipped.txt").read_text()
    assert "00002.wav" in skipped and "expected 5 fields" in skipped and "2 skipped" in r.stdout
    # a wrong --root skips every line: the one-line error says why, from the first line
    r = mavsr(d, "prepare", "csv", "--csv", str(lst), "--root", str(tmp_path / "elsewhere"), "--split", "x", ok=False)
    assert r.returncode == 2 and "no usable lines" in r.stderr and "line 1:" in r.stderr and "missing" in r.stderr
