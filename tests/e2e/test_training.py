"""Training at scale on the tiny recipe: exact resume after a kill, gradient accumulation, DDP and
FSDP over gloo with 2 processes, checkpoint averaging, augmented caches."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from e2e_helpers import av_dump, mavsr
from safetensors.torch import load_file


def conf(d, name, **train):
    c = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    c["model"]["lora"]["dropout"] = 0.0  # dropout masks differ per process; everything else must not
    c["train"].update({"time_mask": True, **train})  # masks are per utterance: the same in any process split
    (d / f"conf/{name}.yaml").write_text(yaml.safe_dump(c))
    return f"conf/{name}.yaml"


def final_state(exp):
    meta = json.loads((exp / "meta.json").read_text())
    return load_file(exp / "ckpt" / meta["checkpoint"] / "model.safetensors")


def records(exp, kind="step"):
    """metrics.jsonl: the step records (`loss`) or the epoch records (`train_loss`, `val_loss`)."""
    recs = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if ("loss" in r) == (kind == "step")]


def losses(exp):
    return [r["loss_per_rate"] for r in records(exp)]


def max_diff(a, b):
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# Splitting a batch (accumulation, processes) only reorders float sums; Adam divides each gradient
# by its own running scale, which turns that rounding in near-zero gradients into weight
# differences of about 1e-6 (measured 1.4e-6). A wrong split moves weights by about one
# learning rate (2e-3) per step, so 1e-5 keeps two orders of magnitude between the two.
SAME_WEIGHTS = 1e-5


@pytest.fixture(scope="module")
def ref(recipe):
    """An uninterrupted single-process run with a checkpoint every step."""
    mavsr(recipe, "train", "--config", conf(recipe, "every", save_every=1), "--tag", "ref")
    return recipe / "exp/ref"


def test_a_killed_run_resumes_and_ends_exactly_like_an_uninterrupted_one(recipe, ref):
    d = recipe
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1", MAVSR_FAULT_KILL_AT_STEP="3")
    r = subprocess.run([sys.executable, "-m", "mavsr_cli", "train", "--config", "conf/every.yaml", "--tag", "killed",
                        "--dir", str(d)], capture_output=True, text=True, env=env, cwd=d)
    assert r.returncode == -9  # SIGKILL right after step 3's checkpoint: nothing else written
    exp = d / "exp/killed"
    assert not (exp / ".done").exists() and not (exp / "meta.json").exists()
    assert sorted(p.name for p in (exp / "ckpt").iterdir()) == ["step-000002", "step-000003"]
    r = mavsr(d, "train", "--config", "conf/every.yaml", "--tag", "killed")
    assert "resuming from step-000003" in r.stdout
    assert losses(exp) == losses(ref)  # the same curve, step for step
    assert max_diff(final_state(exp), final_state(ref)) == 0.0  # bit-identical weights on CPU


def test_gradient_accumulation_gives_the_one_batch_result(recipe, ref):
    mavsr(recipe, "train", "--config", conf(recipe, "accum", save_every=1, accum_steps=2), "--tag", "accum")
    assert max_diff(final_state(recipe / "exp/accum"), final_state(ref)) < SAME_WEIGHTS


@pytest.mark.parametrize("engine,backward", [("ddp", "per_config"), ("fsdp", "per_config"), ("ddp", "joint")])
def test_two_gloo_processes_train_the_same_weights_as_one(recipe, ref, engine, backward):
    """ref steps configuration by configuration in one process; a joint MS step under DDP runs
    its configurations in one merged LLM pass (model/merged.py), FSDP runs them apart."""
    d = recipe
    tag = f"{engine}_{backward}"
    cf = conf(d, f"dist_{tag}", save_every=1, distributed=engine, backward=backward)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MAVSR_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mavsr_cli", "train", "--config", cf, "--tag", tag, "--dir", str(d)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=d, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    exp = d / "exp" / tag
    assert (exp / ".done").is_file()
    assert len(losses(exp)) == len(losses(ref))  # one writer: rank 0
    for a, b in zip(losses(exp), losses(ref), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert max_diff(final_state(exp), final_state(ref)) < SAME_WEIGHTS
    ran = "joint" if engine == "fsdp" or backward == "joint" else "per_config"  # FSDP runs one backward
    assert json.loads((exp / "meta.json").read_text())["backward"] == ran  # what ran, whatever was asked
    said = (exp / "train.log").read_text().count("one joint backward, not per_config")
    assert said == (ran != backward)  # once, by the main process, where it differs from what was asked


def test_gradient_checkpointing_trains_the_same_weights_and_says_the_configurations_run_apart(recipe, ref):
    """Checkpointed layers recompute their activations in the backward: the same weights. A joint
    MS step would share one merged LLM pass, which checkpointing (acting on a layer's call) rules
    out: train says so in one line."""
    cf = conf(recipe, "ckpt_joint", save_every=1, backward="joint", grad_checkpointing=True)
    r = mavsr(recipe, "train", "--config", cf, "--tag", "ckpt_joint")
    assert "run in separate LLM passes, not one merged pass: gradient checkpointing" in r.stdout + r.stderr
    assert max_diff(final_state(recipe / "exp/ckpt_joint"), final_state(ref)) < SAME_WEIGHTS
    r = mavsr(recipe, "train", "--config", conf(recipe, "joint", save_every=1, backward="joint"), "--tag", "joint")
    assert "separate LLM passes" not in r.stdout + r.stderr  # merged


def test_the_final_checkpoint_can_average_the_last_ones_and_decode_uses_it(recipe):
    d = recipe
    mavsr(d, "train", "--config", conf(d, "avg", save_every=1, average_last=3, select="last"), "--tag", "avg")
    exp = d / "exp/avg"
    meta = json.loads((exp / "meta.json").read_text())
    assert meta["checkpoint"] == "avg-000002-000004"
    own = [load_file(exp / "ckpt" / f"step-{s:06d}" / "model.safetensors") for s in (2, 3, 4)]
    want = {k: (own[0][k].double() + own[1][k].double() + own[2][k].double()) / 3 for k in own[0]}
    assert max_diff({k: v.double() for k, v in final_state(exp).items()}, want) < 1e-6
    mavsr(d, "decode", "--exp", "exp/avg", "--audio-rate", "16", "--video-rate", "5")
    assert "checkpoint: avg-000002-000004" in (exp / "decode_a16v5_beam15/test/config.yaml").read_text()


def test_validation_loss_per_epoch_picks_the_best_checkpoints(recipe):
    d = recipe
    assert (d / "data/val/manifest.jsonl").is_file()  # prepare synth held out a seeded share
    mavsr(d, "train", "--config", conf(d, "val1", epochs=4, keep_checkpoints=1), "--tag", "val1")
    exp = d / "exp/val1"
    epochs = records(exp, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert all(set(r["val_loss_per_rate"]) == {"a4v2", "a4v5", "a16v2", "a16v5"} for r in epochs)
    log = (exp / "train.log").read_text()
    assert "epoch 2/4 done: train loss " in log and "; val loss " in log and "a16v5=" in log
    best = min(epochs, key=lambda r: (r["val_loss"], -r["step"]))
    assert json.loads((exp / "meta.json").read_text())["checkpoint"] == f"step-{best['step']:06d}"
    # the best N averaged: kept though older than keep_checkpoints, and averaged in step order
    mavsr(d, "train", "--config", conf(d, "val2", epochs=4, keep_checkpoints=1, average_last=2), "--tag", "val2")
    exp = d / "exp/val2"
    two = sorted(sorted(records(exp, "epoch"), key=lambda r: (r["val_loss"], -r["step"]))[:2], key=lambda r: r["step"])
    meta = json.loads((exp / "meta.json").read_text())
    assert meta["checkpoint"] == f"avg-{two[0]['step']:06d}-{two[1]['step']:06d}"
    assert all((exp / "ckpt" / f"step-{r['step']:06d}").is_dir() for r in two)
    # a prepared val split without features is refused before anything is written
    shutil.rmtree(av_dump(d) / "val")
    try:
        r = mavsr(d, "train", "--config", conf(d, "val3"), "--tag", "val3", ok=False)
        assert r.returncode == 2 and "extract-features --split val" in r.stderr and not (d / "exp/val3").exists()
    finally:
        mavsr(d, "extract-features", "--config", "conf/tiny.yaml", "--split", "val")


def test_frame_capped_batches_cover_every_utterance_once_within_the_cap(recipe):
    from mavsr_cli.features import FeatureStore
    from mavsr_cli.train_loop import plan_epoch

    dump = av_dump(recipe)
    store = FeatureStore(dump / "train")
    ids = store.ids()
    cap = 300
    for epoch in (0, 1):
        plan = plan_epoch(store, ids, 8, cap, seed=0, epoch=epoch)
        assert sorted(u for b in plan for u in b) == ids
        assert all(sum(store.frames(u) for u in b) <= cap or len(b) == 1 for b in plan)
        assert plan == plan_epoch(store, ids, 8, cap, seed=0, epoch=epoch)  # a function of (seed, epoch)
    assert plan_epoch(store, ids, 8, cap, 0, 0) != plan_epoch(store, ids, 8, cap, 0, 1)  # reshuffled
    merged = plan_epoch(store, ids, 8, cap, 0, 0, min_batch=5)
    assert all(len(b) >= 5 for b in merged) and sorted(u for b in merged for u in b) == ids
    d = recipe
    mavsr(d, "train", "--config", conf(d, "frames", max_frames=cap, epochs=1), "--tag", "frames")
    assert sum(r["utts"] for r in records(d / "exp/frames")) == len(ids)


def test_augmented_copies_are_cached_apart_and_drawn_in_training(recipe, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(recipe, d, ignore=shutil.ignore_patterns("exp"))
    c = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    c["augment"] = {"noisy_copies": 2, "snrs": [-5, 0, "clean"], "babble_utts": 3}
    (d / "conf/aug.yaml").write_text(yaml.safe_dump(c))
    mavsr(d, "extract-features", "--config", "conf/aug.yaml")
    tag = d / "dump" / av_dump(recipe).name
    aug = [p for p in tag.iterdir() if p.name.startswith("train-aug")]
    assert len(aug) == 1 and (tag / "train").is_dir()  # the clean cache is kept as it was
    index = [json.loads(x) for x in (aug[0] / "index.jsonl").read_text().splitlines()]
    assert all(len(e["copies"]) == 2 for e in index)
    snrs = [c["snr"] for e in index for c in e["copies"]]
    assert set(snrs) <= {-5.0, 0.0, None} and len(set(snrs)) > 1
    clean = load_file(tag / "train" / "shard-00000.safetensors")
    noisy = load_file(aug[0] / "shard-00000.safetensors")
    e = next(e for e in index if e["copies"][0]["snr"] == -5.0)
    a0, a1 = clean[f"{e['id']}/audio"].float(), noisy[f"{e['id']}/audio#0"].float()
    assert torch.equal(noisy[f"{e['id']}/audio"], clean[f"{e['id']}/audio"])  # the original is there too
    assert a1.shape == a0.shape and not torch.allclose(a0, a1, atol=1e-2)  # -5 dB babble changes the features
    assert not torch.equal(noisy[f"{e['id']}/video#0"], clean[f"{e['id']}/video"])  # random crop
    r = mavsr(d, "train", "--config", "conf/aug.yaml", "--tag", "aug")
    assert (d / "exp/aug/.done").is_file() and r.returncode == 0
    # a second extraction with the same settings is a no-op; the train stage found its own cache
    assert "is done" in mavsr(d, "extract-features", "--config", "conf/aug.yaml").stdout


def test_a_bf16_frozen_llm_trains_and_decodes_through_the_stages(recipe):
    """model.frozen_dtype bfloat16 on CPU: the code path a GPU takes by default (auto), here asked
    for: the LLM held in bf16, bf16 autocast in training and decoding, float32 trained tensors."""
    d = recipe
    c = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    c["model"]["frozen_dtype"] = "bfloat16"
    c["train"]["epochs"] = 1
    (d / "conf/bf16.yaml").write_text(yaml.safe_dump(c))
    r = mavsr(d, "train", "--config", "conf/bf16.yaml", "--tag", "bf16")
    assert "frozen in bfloat16" in r.stdout, r.stdout
    state = final_state(d / "exp/bf16")
    assert state and all(t.dtype == torch.float32 for t in state.values())
    assert all(math.isfinite(x["loss"]) for x in records(d / "exp/bf16"))
    mavsr(d, "decode", "--exp", "exp/bf16", "--audio-rate", "16", "--video-rate", "5", "--beam", "2")
    hyps = (d / "exp/bf16/decode_a16v5_beam2/test/hyp.jsonl").read_text().splitlines()
    assert len(hyps) == 4
