"""A corpus of bad inputs, each built here and fed through the code a user runs.

Every fault must end as a counted skip with a specific reason (preparation goes on with the rest),
or as a one-line `MavsrError` naming the problem; nothing half-written is left behind.
The README's fault table lists the same cases.
"""

import json
import pickle
from fractions import Fraction

import av
import numpy as np
import pytest
import yaml

from mavsr_cli import config as C
from mavsr_cli import manifest as mf
from mavsr_cli.errors import MavsrError
from mavsr_cli.media import read_audio, read_video_at
from mavsr_cli.recipe import Recipe
from mavsr_cli.stages.prepare import LrsOptions, run_csv, run_lrs

SR = 16000


def make_media(path, frames=20, fps=25, video=True, audio_rate=16000, channels=1, seconds=0.8, vfr=False):
    """An mp4 written with PyAV: gray H.264 and/or AAC audio at any rate and channel count."""
    with av.open(str(path), "w", format="mp4") as c:
        vs = ast = None
        if video:
            vs = c.add_stream("libx264", rate=fps)
            vs.width = vs.height = 64
            vs.pix_fmt = "yuv420p"
            vs.codec_context.time_base = Fraction(1, 1000 if vfr else fps)
        if audio_rate:
            ast = c.add_stream("aac", rate=audio_rate, layout="stereo" if channels == 2 else "mono")
        if vs is not None:
            t = 0
            for i in range(frames):
                img = np.full((64, 64), 40 + 8 * (i % 20), np.uint8)
                f = av.VideoFrame.from_ndarray(img, format="gray").reformat(format="yuv420p")
                f.pts = t if vfr else i
                t += 20 if i % 2 == 0 else 60  # 50 and 16.7 fps alternating: 25 fps on average
                for p in vs.encode(f):
                    c.mux(p)
            for p in vs.encode(None):
                c.mux(p)
        if ast is not None:
            n = int(seconds * audio_rate)
            x = (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / audio_rate)).astype(np.float32)
            x = np.stack([x, 0.5 * x]) if channels == 2 else x[None]
            pts = 0
            for s in range(0, n, 1024):
                chunk = np.ascontiguousarray(x[:, s:s + 1024])
                f = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo" if channels == 2 else "mono")
                f.sample_rate, f.pts = audio_rate, pts
                pts += chunk.shape[1]
                for p in ast.encode(f):
                    c.mux(p)
            for p in ast.encode(None):
                c.mux(p)


def landmarks(n, shape=(68, 2)):
    from mavsr_cli.roi import default_mean_face

    ref = default_mean_face() * 64 / 256
    return [ref.copy() if shape == (68, 2) else np.zeros(shape) for _ in range(n)]


# name -> (builder(dir, stem), expected: "ok" or a phrase of the skip reason)
def _good(d, s):
    make_media(d / f"{s}.mp4")
    (d / f"{s}.txt").write_text("a good clip\n")


def _truncated(d, s):
    _good(d, s)
    raw = (d / f"{s}.mp4").read_bytes()
    (d / f"{s}.mp4").write_bytes(raw[: len(raw) // 3])


def _zero(d, s):
    (d / f"{s}.mp4").write_bytes(b"")
    (d / f"{s}.txt").write_text("zero bytes\n")


def _no_audio(d, s):
    make_media(d / f"{s}.mp4", audio_rate=0)
    (d / f"{s}.txt").write_text("silent film\n")


def _no_video(d, s):
    make_media(d / f"{s}.mp4", video=False)
    (d / f"{s}.txt").write_text("radio show\n")


def _zero_frames(d, s):
    make_media(d / f"{s}.mp4", frames=0)
    (d / f"{s}.txt").write_text("no pictures\n")


def _text(content: bytes):
    def build(d, s):
        make_media(d / f"{s}.mp4")
        (d / f"{s}.txt").write_bytes(content)
    return build


def _landmarks(obj):
    def build(d, s):
        _good(d, s)
        with open(d / f"{s}.pkl", "wb") as f:
            pickle.dump(obj, f)
    return build


FAULTS = {
    "truncated_mp4": (_truncated, "cannot open"),
    "zero_byte_mp4": (_zero, "cannot open"),
    "video_without_audio": (_no_audio, "has no audio stream"),
    "audio_without_video": (_no_video, "has no video stream"),
    "zero_frame_video": (_zero_frames, "has no video"),
    "empty_transcript": (_text(b"  \n\n"), "empty transcript"),
    "non_utf8_transcript": (_text("caf\u00e9".encode("latin-1")), "unreadable transcript"),
    "wrong_shape_landmarks": (_landmarks(landmarks(20, (5, 2))), "have shape (5, 2), expected (68, 2)"),
    "non_numeric_landmarks": (_landmarks([{"face": 1}] * 20), "landmarks of frame 0 are not numbers"),
    "landmarks_not_a_list": (_landmarks({"frames": 20}), "does not hold a per-frame list"),
    "too_few_landmark_frames": (_landmarks(landmarks(3)), "landmark list has 3 frames, the video 20"),
}


def test_each_bad_input_is_a_counted_skip_with_its_reason(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    _good(root, "good")
    for name, (build, _) in FAULTS.items():
        build(root, name)
    r = Recipe(tmp_path / "recipe")
    r.root.mkdir()
    summary = run_lrs(r, "dir", LrsOptions(root, split="train", nj=1), log=lambda m: None)
    assert summary == {"train": (1, len(FAULTS))}
    assert [u.id for u in mf.read(r.manifest("train"))] == ["good"]
    skipped = (r.data("train") / "skipped.txt").read_text().splitlines()
    assert len(skipped) == len(FAULTS)
    for name, (_, reason) in FAULTS.items():
        line = next(s for s in skipped if s.startswith(f"{name}.mp4:"))
        assert reason in line, (name, line)
        assert "\n" not in line
    # nothing of the skipped ones was written
    written = {p.stem for p in (r.root / "corpus" / "dir").rglob("*.mp4")}
    assert written == {"good"}
    assert not [p for p in r.root.rglob(".*tmp*")]


@pytest.mark.parametrize("rate,channels", [(8000, 1), (44100, 1), (48000, 2), (16000, 2)])
def test_any_sample_rate_and_stereo_become_16k_mono(tmp_path, rate, channels):
    make_media(tmp_path / "a.mp4", audio_rate=rate, channels=channels, seconds=1.0)
    x = read_audio(tmp_path / "a.mp4")
    assert x.ndim == 1 and abs(len(x) - SR) < 0.05 * SR
    spec = np.abs(np.fft.rfft(x[2000:14000]))
    assert abs(np.argmax(spec) * SR / 12000 - 220) < 5  # the tone survives the resampling


def test_variable_frame_rate_and_one_frame_videos(tmp_path):
    make_media(tmp_path / "vfr.mp4", frames=40, vfr=True)
    v = read_video_at(tmp_path / "vfr.mp4")
    # 40 frames over 1.6 s of timestamps -> 40 frames at 25 fps, each the latest one shown
    assert abs(len(v) - 40) <= 1
    make_media(tmp_path / "one.mp4", frames=1)
    assert read_video_at(tmp_path / "one.mp4").shape[0] == 1
    root = tmp_path / "c"
    root.mkdir()
    make_media(root / "one.mp4", frames=1)
    (root / "one.txt").write_text("one frame\n")
    make_media(root / "vfr.mp4", frames=40, vfr=True, seconds=1.6)
    (root / "vfr.txt").write_text("variable rate\n")
    r = Recipe(tmp_path / "r")
    r.root.mkdir()
    assert run_lrs(r, "dir", LrsOptions(root, split="dev", nj=1), log=lambda m: None) == {"dev": (2, 0)}
    frames = {u.id: u.num_frames for u in mf.read(r.manifest("dev"))}
    assert frames["one"] == 1 and abs(frames["vfr"] - 40) <= 1


def test_unknown_characters_are_cleaned_not_fatal(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    make_media(root / "x.mp4")
    (root / "x.txt").write_text("Caf\u0065\u0301 \u200bna\u00efve\x07 \u2603 \u4f60\u597d\n", encoding="utf-8")
    r = Recipe(tmp_path / "r")
    r.root.mkdir()
    run_lrs(r, "dir", LrsOptions(root, split="dev", nj=1), log=lambda m: None)
    (u,) = mf.read(r.manifest("dev"))
    assert u.text == "caf\u00e9 na\u00efve \u2603 \u4f60\u597d"  # NFC, no zero-width space or bell


def _manifest_line(**kw):
    rec = {"id": "u1", "video": "v.mp4", "audio": "v.wav", "text": "hi", "num_frames": 10, "duration": 0.4,
           "speaker": "s"}
    rec.update(kw)
    return json.dumps({k: v for k, v in rec.items() if v is not None})


@pytest.mark.parametrize("content,phrase", [
    (_manifest_line() + "\n" + _manifest_line() + "\n", "duplicate utterance id 'u1'"),
    (_manifest_line(text=None) + "\n", "missing field(s) text"),
    (_manifest_line(num_frames="ten") + "\n", "wrong type: num_frames"),
    ("{not json\n", "not valid JSON"),
    (None, "not UTF-8"),
    (_manifest_line(video="../../../etc/passwd") + "\n", "escapes the roots"),
    (_manifest_line(audio="/etc/shadow") + "\n", "escapes the roots"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, content, phrase):
    r = Recipe(tmp_path)
    r.data("train").mkdir(parents=True)
    if content is None:
        r.manifest("train").write_bytes(b'{"id": "caf\xe9"}\n')
    else:
        r.manifest("train").write_text(content)
    with pytest.raises(MavsrError) as e:
        r.utterances("train")
    assert phrase in str(e.value) and "\n" not in str(e.value)


def test_in_place_media_under_the_recorded_data_root_are_allowed(tmp_path):
    data = tmp_path / "data_root"
    r = Recipe(tmp_path / "r")
    r.data("train").mkdir(parents=True)
    r.manifest("train").write_text(_manifest_line(video=str(data / "lrs3/x.mp4"), audio=str(data / "lrs3/x.wav")))
    with pytest.raises(MavsrError, match="escapes"):
        r.utterances("train")
    (r.data("train") / "config.yaml").write_text(yaml.safe_dump({"corpus": "csv", "data_root": str(data)}))
    assert [u.id for u in r.utterances("train")] == ["u1"]


def test_label_list_paths_cannot_escape_the_data_root(tmp_path):
    data = tmp_path / "data"
    (data / "lrs3" / "a").mkdir(parents=True)
    make_media(data / "lrs3" / "a" / "1.mp4")
    (data / "lrs3" / "a" / "1.wav").write_bytes(b"RIFF")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.mp4").write_bytes(b"")
    (tmp_path / "secret" / "x.wav").write_bytes(b"")
    csv = tmp_path / "labels.csv"
    csv.write_text("lrs3,a/1,20,1 2,hello there\nlrs3,../secret/x,20,1,stolen\n..,secret/x,20,1,stolen too\n")
    r = Recipe(tmp_path / "r")
    r.root.mkdir()
    assert run_csv(r, csv, data, "train", log=lambda m: None) == {"train": (1, 2)}
    skipped = (r.data("train") / "skipped.txt").read_text()
    assert skipped.count("escapes the data root") == 2
    lrs2 = tmp_path / "lrs2"
    lrs2.mkdir()
    (lrs2 / "train.txt").write_text("5535/00001\n../../../../tmp/00002\n")
    with pytest.raises(MavsrError, match=r"train.txt:2: entry .* escapes the corpus root"):
        run_lrs(Recipe(tmp_path / "r2"), "lrs2", LrsOptions(lrs2), log=lambda m: None)


def test_unknown_yaml_key_names_the_nearest_valid_one(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epohcs: 3\n")
    with pytest.raises(MavsrError, match="epohcs.*epochs"):
        C.load(p)


@pytest.mark.parametrize("text, phrase", [
    ("train:\n  lr: fast\n", "'train.lr' must be a number, got 'fast'"),
    ("train:\n  epochs: twenty\n", "'train.epochs' must be a whole number"),
    ("train:\n  epochs: 0\n", "'train.epochs' must be at least 1"),
    ("train:\n  lr: -0.1\n", "'train.lr' must be above 0"),
    ("train:\n  tensorboard: maybe\n", "'train.tensorboard' must be true or false"),
    ("model:\n  audio_rates: 4\n", "'model.audio_rates' must be a list of whole numbers"),
    ("train:\n  betas: [0.9]\n", "'train.betas' must be a list of 2"),
    ("model:\n  lora:\n    dropout: 1.5\n", "'model.lora.dropout' must be in [0, 1)"),
])
def test_config_values_are_checked_when_loaded(tmp_path, text, phrase):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(MavsrError) as e:
        C.load(p)
    assert phrase in str(e.value) and "\n" not in str(e.value)


def test_a_bad_config_value_stops_train_before_it_writes_anything(tmp_path):
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text("train:\n  lr: fast\n")
    r = subprocess.run([sys.executable, "-m", "mavsr_cli", "train", "--config", "c.yaml", "--dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "train.lr" in r.stderr, r.stderr
    assert not (tmp_path / "exp").exists()


def test_numbers_for_floats_and_snr_lists_stay_as_written(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1\naugment:\n  snrs: [-5, '0', clean]\n")
    cfg = C.load(p)
    assert cfg.train.lr == 1 and cfg.augment.snrs == (-5, "0", "clean")  # checked, never converted


@pytest.mark.parametrize("share", [1.0, 1.5, -0.1])
def test_a_val_share_outside_0_to_1_is_refused_before_any_write(tmp_path, share):
    """All of train held out (or a negative share) would leave no train split: refused, not run."""
    from mavsr_cli.options import SynthOptions
    from mavsr_cli.stages.prepare import run_synth

    for run in (lambda r: run_synth(r, SynthOptions(num_utts=4, test_utts=2, speakers=1, val_share=share)),
                lambda r: run_lrs(r, "lrs3", LrsOptions(tmp_path / "tree", val_share=share))):
        with pytest.raises(MavsrError, match="--val-share must be at least 0 and below 1"):
            run(Recipe(tmp_path / "recipe"))
    assert not (tmp_path / "recipe").exists()
