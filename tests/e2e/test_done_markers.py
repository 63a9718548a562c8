"""A finished output knows what it was made from (issue 18, items 1-2).

A rerun that asks for something else is refused in one line naming each difference (never the old
result reported as the new one), decoding an unfinished training says so, and an interrupted
`tiny-models` keeps the parts it finished.
"""

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import yaml
from e2e_helpers import MAVSR, mavsr, refused

TINY = ["tiny-models", "--audio-dim", "32", "--video-dim", "32", "--llm-hidden", "64", "--audio-layers", "1",
        "--video-layers", "1", "--encoder-epochs", "1", "--lm-epochs", "1"]  # as the shared fixture
PREPARE = ["prepare", "synth", "--num-utts", "16", "--test-utts", "4", "--speakers", "2", "--nj", "1"]


def copy(src: Path, dst: Path, without=()) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*without))
    return dst


def changed(args: list[str], **values) -> list[str]:
    args = list(args)
    for flag, v in values.items():
        args[args.index(flag) + 1] = v
    return args


def test_prepare_with_other_options_names_the_difference(recipe, tmp_path):
    d = copy(recipe, tmp_path / "r", without=("exp", "dump", "models"))
    line = refused(d, *changed(PREPARE, **{"--num-utts": "20", "--speakers": "3"}))
    assert "num_utts 16 != 20" in line and "speakers 2 != 3" in line and "--force" in line
    # the same options are done, as before
    r = mavsr(d, *PREPARE)
    assert "are done" in r.stdout + r.stderr


def test_tiny_models_with_another_width_names_it(recipe, tmp_path):
    d = copy(recipe, tmp_path / "r", without=("exp", "dump"))
    assert "audio_dim 32 != 64" in refused(d, *changed(TINY, **{"--audio-dim": "64"}))


def test_more_epochs_for_a_finished_training_say_how_to_go_on(recipe, tmp_path):
    d = copy(recipe, tmp_path / "r")
    conf = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    conf["train"]["epochs"] += 1
    (d / "conf/tiny.yaml").write_text(yaml.safe_dump(conf))
    line = refused(d, "train", "--config", "conf/tiny.yaml", "--rates", "all", "--tag", "t")
    assert f"epochs {conf['train']['epochs'] - 1} != {conf['train']['epochs']}" in line
    assert "from the start" in line and "another --tag" in line


def test_features_of_another_manifest_are_refused(recipe, tmp_path):
    d = copy(recipe, tmp_path / "r", without=("exp",))
    m = d / "data/test/manifest.jsonl"
    m.write_text("".join(m.read_text().splitlines(keepends=True)[1:]))  # the split changed since
    line = refused(d, "extract-features", "--config", "conf/tiny.yaml")
    assert "dump/" in line and "test" in line and "manifest" in line and "!=" in line


def test_decoding_an_unfinished_training_warns_and_a_later_checkpoint_is_not_reused(recipe, tmp_path):
    d = copy(recipe, tmp_path / "r", without=("exp",))
    conf = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    conf["train"].update(save_every=1, select="last")  # the final checkpoint is the last, not step 2
    (d / "conf/tiny.yaml").write_text(yaml.safe_dump(conf))
    train = ["train", "--config", "conf/tiny.yaml", "--rates", "all", "--tag", "t"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1", MAVSR_FAULT_KILL_AT_STEP="2")
    subprocess.run(MAVSR + train + ["--dir", str(d)], cwd=d, env=env, capture_output=True, timeout=600)
    assert not (d / "exp/t/.done").exists() and (d / "exp/t/ckpt/step-000002").is_dir()
    decode = ["decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2"]
    r = mavsr(d, *decode)
    assert "has not finished" in r.stdout + r.stderr and "step-000002" in r.stdout + r.stderr
    mavsr(d, *train)  # resumes and finishes
    line = refused(d, *decode)
    assert "checkpoint step-000002 != " in line
    r = mavsr(d, *decode, "--force")
    assert "has not finished" not in r.stdout + r.stderr
    assert "step-000002" not in (d / "exp/t/decode_a4v2_beam15/test/config.yaml").read_text()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_tiny_models_interrupted_keeps_the_finished_encoder(recipe, tmp_path):
    d = copy(recipe, tmp_path / "r", without=("exp", "dump", "models"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1")
    p = subprocess.Popen(MAVSR + TINY + ["--dir", str(d)], cwd=d, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ((d / "models/whisper/.done").is_file() and list((d / "models").glob(".video.tmp-*"))):
        assert p.poll() is None, p.stderr.read()[-2000:]
        assert time.time() - t0 < 300
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    kept = sha(d / "models/whisper/model.safetensors")
    assert not (d / "models/.done").exists() and not (d / "models/video").exists()
    r = mavsr(d, *TINY)
    assert "whisper kept" in r.stdout + r.stderr
    assert sha(d / "models/whisper/model.safetensors") == kept
    for part in ("whisper/model.safetensors", "video/model.safetensors", "llm/model.safetensors"):
        assert sha(d / "models" / part) == sha(recipe / "models" / part), part
