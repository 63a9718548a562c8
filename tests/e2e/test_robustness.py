"""Interruption, resource faults and integrity, on the tiny recipe, through the CLI a user runs.

Kill-and-rerun: each stage is started as a subprocess, interrupted at a random point once its
work is under way (SIGINT, SIGTERM or SIGKILL), then run again; the result must equal the
uninterrupted run of the shared fixture. The random points come from MAVSR_TEST_SEED (default 0)
and are printed, so a failure can be replayed.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from e2e_helpers import MAVSR, av_dump, mavsr, refused
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SEED = int(os.environ.get("MAVSR_TEST_SEED", "0"))
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143), "SIGKILL": (signal.SIGKILL, -9)}


def env() -> dict:
    """The environment of a mavsr process, read when it starts: conftest.py sets one thread per
    process after collection when the reduced study runs beside the suite, and a reference run and
    an interrupted one must use the same thread count to give bit-identical weights."""
    return dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1")


def interrupt(d: Path, args: list[str], ready, sig: str, rng: random.Random, max_delay: float = 0.3,
              pace=None) -> str:
    """Run `mavsr args`, wait until ready() says its work is under way, wait a random moment more,
    send the signal; returns stderr. The process must die of it (not finish first). `pace`: a second
    mark one unit of work after ready(); the moment is then at most 4 units (however fast the process
    runs beside the other workers, most of its work is still ahead when the signal comes)."""
    p = subprocess.Popen(MAVSR + args + ["--dir", str(d)], cwd=d, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(p, args, ready)
    if pace is not None:
        t = time.monotonic()
        wait_for(p, args, pace)
        max_delay = min(max_delay, 4 * (time.monotonic() - t))
    delay = rng.uniform(0.0, max_delay)
    print(f"{sig} after ready + {delay:.3f} s (seed {SEED})")
    time.sleep(delay)
    p.send_signal(SIGNALS[sig][0])
    out, err = p.communicate(timeout=300)
    assert p.returncode == SIGNALS[sig][1], f"exit {p.returncode}, expected {SIGNALS[sig][1]}:\n{err[-2000:]}"
    if sig != "SIGKILL":  # a catchable signal: temporary outputs are removed on the way out
        assert "rerun the same command to resume" in err
        assert not leftovers(d, journals=False), leftovers(d)  # a decode journal is finished work: kept
    return err


def wait_for(p: subprocess.Popen, args: list[str], mark) -> None:
    t0 = time.time()
    while not mark():
        if p.poll() is not None:
            pytest.fail(f"mavsr {' '.join(args)} ended ({p.returncode}) before the interruption point:\n"
                        + p.stderr.read()[-2000:])
        assert time.time() - t0 < 300, "the interruption point never came"
        time.sleep(0.002)


def leftovers(d: Path, journals: bool = True) -> list[str]:
    return [str(p.relative_to(d)) for p in d.rglob("*")
            if ".tmp-" in p.name or (journals and p.name.endswith(".journal"))]


def copy_recipe(src: Path, dst: Path, without=()) -> Path:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns(*without))
    return dst


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def features(dump_split: Path) -> dict:
    index = [json.loads(x) for x in (dump_split / "index.jsonl").read_text().splitlines()]
    out = {}
    for e in index:
        with safe_open(str(dump_split / e["shard"]), framework="pt") as f:
            for k in f.keys():
                if k.startswith(e["id"] + "/"):
                    out[k] = f.get_tensor(k)
    return out


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


@pytest.mark.parametrize("sig", list(SIGNALS))
def test_prepare_interrupted_then_rerun_equals_an_uninterrupted_run(recipe, tmp_path, sig):
    d = tmp_path / "r"
    d.mkdir()
    corpus = d / "corpus/synth"
    args = ["prepare", "synth", "--num-utts", "16", "--test-utts", "4", "--speakers", "2", "--nj", "1"]
    interrupt(d, args, lambda: len(list(corpus.rglob("*.txt"))) >= 4, sig, rng_for(f"prepare-{sig}"))
    assert not (d / "data/train/.done").exists()
    mavsr(d, *args)
    for split in ("train", "test"):
        assert (d / f"data/{split}/manifest.jsonl").read_text() == (recipe / f"data/{split}/manifest.jsonl").read_text()
        for u in (json.loads(x) for x in (d / f"data/{split}/manifest.jsonl").read_text().splitlines()):
            for m in ("video", "audio"):
                assert sha(d / u[m]) == sha(recipe / u[m]), u[m]
    assert not leftovers(d)


@pytest.mark.parametrize("sig", list(SIGNALS))
def test_extraction_interrupted_then_rerun_equals_an_uninterrupted_run(recipe, tmp_path, sig):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp", "dump"))
    ref = av_dump(recipe)
    out = d / "dump" / ref.name / "train"
    # one utterance per shard, interrupted at most 4 shards after the second: 10 or more of train's 16 still to
    # encode (with two of them per shard and a fixed 0.3 s, a CI run beside another worker finished train first)
    args = ["extract-features", "--config", "conf/tiny.yaml", "--shard-size", "1"]
    interrupt(d, args, lambda: (out / "shard-00000.safetensors").is_file(), sig, rng_for(f"extract-{sig}"),
              pace=lambda: (out / "shard-00001.safetensors").is_file())
    assert not (out / ".done").exists()
    mavsr(d, *args)
    for split in ("train", "test"):
        got, want = features(d / "dump" / ref.name / split), features(ref / split)
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in want)
    assert not leftovers(d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine must not have")
def test_extraction_on_a_device_not_here_is_one_line_before_any_write_and_the_cache_names_its_device(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp", "dump"))
    for dev, says in (("cuda", "sees no CUDA GPU"), ("cuda:1", "sees no CUDA GPU"), ("tpu", "auto, cpu, cuda")):
        r = mavsr(d, "extract-features", "--config", "conf/tiny.yaml", "--device", dev, ok=False)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and says in err[0], r.stderr
        assert not (d / "dump").exists()  # refused before any write
    mavsr(d, "extract-features", "--config", "conf/tiny.yaml", "--split", "test", "--device", "cpu")
    ref = av_dump(recipe)
    out = d / "dump" / ref.name / "test"
    got, want = features(out), features(ref / "test")  # the default (auto: the CPU here) made the same cache
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "provenance.json").read_text())["devices"] == ["cpu"]
    for f in out.glob("shard-*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            assert sf.metadata()["device"] == "cpu"


def test_a_split_begun_on_another_device_type_is_not_finished_on_this_one(recipe, tmp_path):
    """A resume that would encode the rest of a split on another device type than its finished shards
    is refused in one line before any write; a merge with nothing left to encode, or --force, is not."""
    d = copy_recipe(recipe, tmp_path / "r", without=("exp", "dump"))
    args = ["extract-features", "--config", "conf/tiny.yaml", "--split", "test", "--shard-size", "1", "--device", "cpu"]
    mavsr(d, *args, "--shard", "0/2")  # shards 0 and 2 of the test split's 4
    out = next(d.glob("dump/*/test"))
    for n in (0, 2):  # as a GPU worker would have named them (the same tensors)
        _name_device(out / f"shard-{n:05d}.safetensors", "cuda")

    line = refused(d, *args)  # owns all four: 1 and 3 to encode on the CPU
    assert "shard-00000.safetensors was encoded on cuda" in line and "--device cuda" in line, line
    assert refused(d, *args[:3], "--split", "train", *args[3:]) == line  # train, asked first, is not begun either
    assert not (out / ".done").exists()
    mavsr(d, *args, "--shard", "1/2")  # the other worker's share, its own shards on the CPU
    (out / "shard-00003.safetensors").unlink()
    line = refused(d, *args)  # 3 to encode, finished shards of both types: no single device to resume on
    assert "encoded on cpu and cuda" in line and "--shard i/N" in line and not (out / ".done").exists(), line
    mavsr(d, *args, "--shard", "1/2")  # worker 1 finishes its own share on its own device
    mavsr(d, *args)  # nothing left to encode: the merge gathers both devices' shards and names them
    assert json.loads((out / "provenance.json").read_text())["devices"] == ["cpu", "cuda"]
    mavsr(d, *args, "--force")
    assert json.loads((out / "provenance.json").read_text())["devices"] == ["cpu"]


def _name_device(shard: Path, device: str) -> None:
    with safe_open(str(shard), framework="pt") as f:
        tensors, md = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(shard), metadata={**md, "device": device})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the CI machine)")
def test_extraction_on_a_gpu_gives_the_cpu_cache_within_fp16_rounding(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp", "dump"))
    mavsr(d, "extract-features", "--config", "conf/tiny.yaml", "--split", "test", "--device", "cuda")
    ref = av_dump(recipe)  # made with --device auto: on such a machine, the GPU too; so the CPU's again
    cpu = copy_recipe(recipe, tmp_path / "c", without=("exp", "dump"))
    mavsr(cpu, "extract-features", "--config", "conf/tiny.yaml", "--split", "test", "--device", "cpu")
    out = d / "dump" / ref.name / "test"
    got, want = features(out), features(cpu / "dump" / ref.name / "test")
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=2e-2, rtol=2e-2)
    assert json.loads((out / "provenance.json").read_text())["devices"] == ["cuda"]


TRAIN = ["train", "--config", "conf/long.yaml", "--rates", "all", "--tag", "t"]


@pytest.fixture(scope="module")
def train_ref(recipe, tmp_path_factory):
    """An uninterrupted run of 8 epochs (32 steps) with a checkpoint every step."""
    d = copy_recipe(recipe, tmp_path_factory.mktemp("train") / "r", without=("exp",))
    c = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    c["train"].update(epochs=8, save_every=1)
    (d / "conf/long.yaml").write_text(yaml.safe_dump(c))
    mavsr(d, *TRAIN)
    return d


@pytest.mark.parametrize("sig", list(SIGNALS))
def test_training_interrupted_then_rerun_equals_an_uninterrupted_run(train_ref, tmp_path, sig):
    d = copy_recipe(train_ref, tmp_path / "r", without=("exp",))
    ckpt = d / "exp/t/ckpt"
    interrupt(d, TRAIN, lambda: (ckpt / "step-000002").is_dir(), sig, rng_for(f"train-{sig}"))
    assert not (d / "exp/t/.done").exists()
    r = mavsr(d, *TRAIN)
    assert "resuming from step-" in r.stdout
    name = json.loads((train_ref / "exp/t/meta.json").read_text())["checkpoint"]
    got = load_file(d / "exp/t/ckpt" / name / "model.safetensors")
    want = load_file(train_ref / "exp/t/ckpt" / name / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)  # bit-identical
    def losses(r):  # every step's loss, every epoch's training and validation loss
        return [tuple(json.loads(x).get(k) for k in ("step", "loss", "train_loss", "val_loss"))
                for x in (r / "exp/t/metrics.jsonl").read_text().splitlines()]

    assert losses(d) == losses(train_ref)
    assert any(x[3] is not None for x in losses(d))  # the fixture validates
    assert not leftovers(d)


# one utterance per batch: 16 batches of about 40 ms each on a 2-core CPU (beam 40: at beam 15 a batch took
# 15 ms, and the whole decode less than a busy worker may go unscheduled)
DECODE = ["decode", "--exp", "exp/t", "--split", "train", "--audio-rate", "4", "--video-rate", "2", "--batch-size", "1",
          "--beam", "40"]


@pytest.fixture(scope="module")
def decode_ref(recipe, tmp_path_factory):
    """An uninterrupted decode of the train split (16 utterances)."""
    d = copy_recipe(recipe, tmp_path_factory.mktemp("dec") / "r")
    mavsr(d, *DECODE)
    return hyps(d / "exp/t/decode_a4v2_beam40/train/hyp.jsonl")


def hyps(p: Path) -> list[tuple]:
    return [(x["id"], x["hyp"], x["tokens_in"]) for x in map(json.loads, p.read_text().splitlines())]


@pytest.mark.parametrize("sig", list(SIGNALS))
def test_decoding_interrupted_then_rerun_equals_an_uninterrupted_run(recipe, decode_ref, tmp_path, sig):
    d = copy_recipe(recipe, tmp_path / "r")
    journal = d / "exp/t/decode_a4v2_beam40/.train.parts/part-00000-of-00001.jsonl.journal"
    args = DECODE
    interrupt(d, args, lambda: journal.is_file() and journal.read_text().count("\n") >= 1, sig,
              rng_for(f"decode-{sig}"), pace=lambda: journal.is_file() and journal.read_text().count("\n") >= 2)
    r = mavsr(d, *args)
    if sig == "SIGKILL":
        assert "resuming" in r.stdout  # the batches finished before the kill are not decoded again
    assert hyps(d / "exp/t/decode_a4v2_beam40/train/hyp.jsonl") == decode_ref
    assert not leftovers(d)


# ---- resources --------------------------------------------------------------------------------
def mount_tmpfs(where: Path, size: str, ro: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()}): needs root")


def umount(where: Path):
    subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_during_extraction_is_one_line_and_keeps_finished_shards(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp", "dump"))
    mount_tmpfs(d / "dump", "160k")
    try:
        r = mavsr(d, "extract-features", "--config", "conf/tiny.yaml", "--shard-size", "2", ok=False)
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "finished work is kept" in err[0], r.stderr
        out = next((d / "dump").iterdir()) / "train"
        kept = sorted(p.name for p in out.glob("shard-*.safetensors"))
        assert kept and not leftovers(d)
        saved = {n: sha(out / n) for n in kept}
        for n in kept:  # every finished shard is whole
            load_file(out / n)
        shutil.copytree(d / "dump", tmp_path / "saved")
    finally:
        umount(d / "dump")
    shutil.rmtree(d / "dump")
    shutil.copytree(tmp_path / "saved", d / "dump")  # space freed: the same command finishes the job
    mavsr(d, "extract-features", "--config", "conf/tiny.yaml", "--shard-size", "2")
    assert {n: sha(out / n) for n in kept} == saved  # finished shards were kept, not redone
    got, want = features(out), features(av_dump(recipe) / "train")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)


def test_a_read_only_output_dir_fails_before_any_work(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp",))
    mount_tmpfs(d / "exp", "1m", ro=True)
    try:
        r = mavsr(d, "train", "--config", "conf/tiny.yaml", "--tag", "x", ok=False)
    finally:
        umount(d / "exp")
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot write to" in err[0] and "Read-only file system" in err[0], r.stderr
    assert "train:" not in r.stdout  # refused before loading anything


def test_out_of_memory_decode_retries_in_halves_with_the_same_result(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r")
    shutil.rmtree(d / "exp/t/decode_a4v2_beam15")
    faulty = dict(env(), MAVSR_FAULT_OOM_ABOVE="1")  # every batch of more than one utterance runs out of memory
    r = subprocess.run(MAVSR + ["decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2", "--batch-size",
                                "4", "--dir", str(d)], cwd=d, env=faulty, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "out of memory on a batch of 4; retrying as 2 + 2" in r.stdout
    assert "out of memory on a batch of 2; retrying as 1 + 1" in r.stdout
    name = "decode_a4v2_beam15/test/hyp.jsonl"
    assert hyps(d / "exp/t" / name) == hyps(recipe / "exp/t" / name)


def test_out_of_memory_in_training_names_the_batch(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp",))
    faulty = dict(env(), MAVSR_FAULT_OOM_ABOVE="4")
    r = subprocess.run(MAVSR + ["train", "--config", "conf/tiny.yaml", "--tag", "x", "--dir", str(d)], cwd=d,
                       env=faulty, capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "out of memory at step 1 (epoch 1) on a micro-batch of 8 utterances" in err[0], r.stderr
    assert "train.max_frames" in err[0]


# ---- integrity --------------------------------------------------------------------------------
def _flip(p: Path, at: int = -100):
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("fault", ["flipped byte", "truncated", "another model"])
def test_a_damaged_or_foreign_checkpoint_is_refused_in_one_line(recipe, tmp_path, fault):
    d = copy_recipe(recipe, tmp_path / "r")
    exp = d / "exp/t"
    shutil.rmtree(exp / "decode_a4v2_beam15")
    ckpt = exp / "ckpt" / json.loads((exp / "meta.json").read_text())["checkpoint"]
    f = ckpt / "model.safetensors"
    if fault == "flipped byte":
        _flip(f)
        phrase = "is corrupt: its checksum does not match"
    elif fault == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        phrase = "is corrupt: its checksum does not match"
    else:  # a checkpoint of a model with another LoRA rank, under this experiment's config
        c = yaml.safe_load((exp / "config.yaml").read_text())
        c["model"]["lora"]["rank"] = 4
        (exp / "config.yaml").write_text(yaml.safe_dump(c))
        phrase = "checkpoint does not match the model"
    r = mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2", ok=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and phrase in err[0], r.stderr
    assert not (exp / "decode_a4v2_beam15/test").exists()


def test_a_damaged_feature_shard_is_refused_in_one_line(recipe, tmp_path):
    d = copy_recipe(recipe, tmp_path / "r", without=("exp",))
    shard = next((d / "dump" / av_dump(recipe).name / "train").glob("shard-*.safetensors"))
    _flip(shard)
    r = mavsr(d, "train", "--config", "conf/tiny.yaml", "--tag", "x", ok=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "feature shard" in err[0] and "is corrupt" in err[0], r.stderr
    assert not list((d / "exp/x").glob("ckpt/step-*"))


def test_pickles_users_bring_cannot_run_code(tmp_path):
    """A crafted landmark pickle is refused by the restricted unpickler (and nothing runs)."""
    from mavsr_cli.errors import MavsrError
    from mavsr_cli.safe_pickle import load_numpy_pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    import pickle

    p = tmp_path / "x.pkl"
    p.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(MavsrError, match="refused to load global posix.system"):
        load_numpy_pickle(p)
    assert not (tmp_path / "pwned").exists()
