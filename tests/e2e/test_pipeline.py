"""The whole recipe through the `mavsr` command, on a tiny synthetic corpus (about a minute)."""

import json
import shutil

import pytest
import yaml
from e2e_helpers import av_dump, mavsr, snapshot


def test_file_contracts(recipe):
    d = recipe
    for split, n in (("train", 15), ("val", 1), ("test", 4)):  # val: a seeded share of the 16, one at least
        lines = (d / f"data/{split}/manifest.jsonl").read_text().splitlines()
        assert len(lines) == n
        rec = json.loads(lines[0])
        assert set(rec) == {"id", "video", "audio", "text", "num_frames", "duration", "speaker"}
        assert [json.loads(x)["id"] for x in lines] == sorted(json.loads(x)["id"] for x in lines)
    dump = av_dump(d)
    for split in ("train", "test"):
        s = dump / split
        for name in ("index.jsonl", "provenance.json", "config.yaml", "cmd.txt", ".done", "shard-00000.safetensors"):
            assert (s / name).is_file(), s / name
        entry = json.loads((s / "index.jsonl").read_text().splitlines()[0])
        assert entry["audio_len"] == pytest.approx(2 * entry["video_len"], abs=2)  # 50 Hz vs 25 Hz
    exp = d / "exp/t"
    for name in ("config.yaml", "cmd.txt", "train.log", "metrics.jsonl", "meta.json", "RESULTS.md", ".done"):
        assert (exp / name).is_file(), name
    assert (exp / "cmd.txt").read_text().startswith("mavsr train")
    (ckpt,) = sorted((exp / "ckpt").iterdir())[-1:]
    meta = json.loads((exp / "meta.json").read_text())
    assert meta["rates"] == ["a4v2", "a4v5", "a16v2", "a16v5"] and meta["strategy"] == "ms"
    ckpt_bytes = (ckpt / "model.safetensors").stat().st_size
    llm_bytes = (d / "models/llm/model.safetensors").stat().st_size
    assert ckpt_bytes < llm_bytes  # only trained tensors, never the frozen LLM
    metrics = [json.loads(x) for x in (exp / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[0]["loss_per_rate"]) == set(meta["rates"])  # every configuration, every step
    for tag in ("a4v2", "a16v5"):
        dd = exp / f"decode_{tag}_beam15" / "test"
        for name in ("hyp.jsonl", "wer.json", "result.txt", "config.yaml", "cmd.txt", ".done"):
            assert (dd / name).is_file(), dd / name
        hyps = [json.loads(x) for x in (dd / "hyp.jsonl").read_text().splitlines()]
        assert len(hyps) == 4 and {"id", "ref", "hyp", "tokens_in", "time"} <= set(hyps[0])
        assert 0 <= json.loads((dd / "wer.json").read_text())["wer"]
    # one checkpoint, two rate pairs: the lower rate pair feeds the LLM more tokens
    t_lo = [json.loads(x)["tokens_in"] for x in (exp / "decode_a4v2_beam15/test/hyp.jsonl").read_text().splitlines()]
    t_hi = [json.loads(x)["tokens_in"] for x in (exp / "decode_a16v5_beam15/test/hyp.jsonl").read_text().splitlines()]
    assert all(a > b for a, b in zip(t_lo, t_hi, strict=True))
    results = (exp / "RESULTS.md").read_text()
    assert "| (4,2) |" in results and "| (16,5) |" in results


def test_rerun_is_a_no_op(recipe):
    d = recipe
    before = snapshot(d)
    r1 = mavsr(d, "prepare", "synth", "--num-utts", "16", "--test-utts", "4", "--speakers", "2", "--nj", "1")
    r2 = mavsr(d, "extract-features", "--config", "conf/tiny.yaml")
    r3 = mavsr(d, "train", "--config", "conf/tiny.yaml", "--rates", "all", "--tag", "t")
    r4 = mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2")
    for r in (r1, r2, r3, r4):
        assert "is done" in r.stdout or "are done" in r.stdout
    assert "next: mavsr train --config conf/tiny.yaml --rates all" in r2.stdout  # a recipe config: train next
    assert snapshot(d) == before


def test_a_recipe_config_is_found_from_another_dir(recipe, tmp_path):
    """`--config conf/tiny.yaml --dir D` run elsewhere reads D's conf/tiny.yaml, as --exp is read from D,
    and the next command it prints names --dir D, so that it runs from there as printed."""
    before = snapshot(recipe)
    for stage in (["extract-features"], ["train", "--rates", "all", "--tag", "t"]):
        r = mavsr(recipe, *stage, "--config", "conf/tiny.yaml", cwd=tmp_path)
        assert "is done" in r.stdout, r.stdout[-1500:]
        hint = next(x for x in r.stdout.splitlines() if x.startswith("next: "))
        assert hint.endswith(f" --dir {recipe}"), hint
    assert snapshot(recipe) == before


def test_decoding_is_deterministic(recipe):
    d = recipe
    hyp = d / "exp/t/decode_a16v5_beam15/test/hyp.jsonl"
    first = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in hyp.read_text().splitlines()]
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--batch-size", "1", "--force")
    again = [{k: v for k, v in json.loads(x).items() if k != "time"} for x in hyp.read_text().splitlines()]
    assert again == first  # same hypotheses, also at batch size 1


def test_user_errors_are_one_line_and_non_zero(recipe):
    d = recipe
    r = mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "8", "--video-rate", "5", ok=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "a4v2, a4v5, a16v2, a16v5" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (d / "exp/t/decode_a8v5_beam15").exists()  # nothing half-written
    r = mavsr(d, "decode", "--exp", "exp/nope", "--audio-rate", "4", "--video-rate", "2", ok=False)
    assert r.returncode == 2 and "not an experiment dir" in r.stderr
    r = mavsr(d, "prepare", "lrs3", ok=False)
    assert r.returncode == 2 and "needs --root" in r.stderr
    r = mavsr(d, "prepare", "voxceleb", ok=False)
    assert r.returncode == 2 and "unknown corpus" in r.stderr
    r = mavsr(d, "train", "--config", "conf/missing.yaml", ok=False)
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_interrupted_training_resumes_from_its_last_checkpoint(recipe, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(recipe, d, ignore=shutil.ignore_patterns("exp"))
    mavsr(d, "train", "--config", "conf/tiny.yaml", "--tag", "x")
    ckpts = sorted((d / "exp/x/ckpt").iterdir())
    # simulate a crash after the first epoch: drop the last checkpoint and the .done marker
    shutil.rmtree(ckpts[-1])
    (d / "exp/x/.done").unlink()
    r = mavsr(d, "train", "--config", "conf/tiny.yaml", "--tag", "x")
    assert "resuming from" in r.stdout
    assert (d / "exp/x/.done").is_file()
    assert [p.name for p in sorted((d / "exp/x/ckpt").iterdir())] == [p.name for p in ckpts]


@pytest.mark.parametrize("strategy", ["ss", "mss"])
def test_each_lora_strategy_trains_and_decodes_at_every_rate(recipe, strategy, monkeypatch):
    from mavsr_cli.recipe import Recipe
    from mavsr_cli.stages import decode

    monkeypatch.setenv("MAVSR_QUIET", "1")
    d = recipe
    mavsr(d, "train", "--config", "conf/tiny.yaml", "--lora", strategy, "--tag", strategy)
    meta = json.loads((d / "exp" / strategy / "meta.json").read_text())
    assert meta["strategy"] == strategy
    for tag in meta["rates"]:
        a, v = tag[1:].split("v")
        (out,) = decode.run(Recipe(d), d / "exp" / strategy, "test", int(a), int(v), log=lambda m: None)
        assert len((out / "hyp.jsonl").read_text().splitlines()) == 4
    r = mavsr(d, "score", "--exp", f"exp/{strategy}")
    assert r.stdout.count("WER") == 4


@pytest.mark.parametrize("modality", ["a", "v"])
def test_audio_only_and_video_only_models_train_and_decode(recipe, modality):
    d = recipe
    conf = yaml.safe_load((d / "conf/tiny.yaml").read_text())
    conf["model"]["modality"] = modality
    (d / f"conf/{modality}.yaml").write_text(yaml.safe_dump(conf))
    mavsr(d, "extract-features", "--config", f"conf/{modality}.yaml")
    mavsr(d, "train", "--config", f"conf/{modality}.yaml", "--tag", modality)
    exp = d / "exp" / modality
    meta = json.loads((exp / "meta.json").read_text())
    want = {"a": ["a4", "a16"], "v": ["v2", "v5"]}[modality]
    assert meta["modality"] == modality and meta["rates"] == want
    assert list(meta["dims"]) == [{"a": "audio", "v": "video"}[modality]]
    # the cache holds only the modality used; the checkpoint only its projectors
    from safetensors import safe_open

    (shard,) = (d / "dump" / meta["encoders_tag"] / "train").glob("shard-*.safetensors")
    with safe_open(shard, "pt") as f:
        assert {k.split("/")[-1] for k in f.keys()} == {meta["dims"].popitem()[0]}
    with safe_open(sorted((exp / "ckpt").iterdir())[-1] / "model.safetensors", "pt") as f:
        proj = {k.split(".")[1] for k in f.keys() if k.startswith("projectors.")}
    assert proj == set(want)
    flag = {"a": "--audio-rate", "v": "--video-rate"}[modality]
    for tag in want:
        mavsr(d, "decode", "--exp", f"exp/{modality}", flag, tag[1:])
        assert len((exp / f"decode_{tag}_beam15/test/hyp.jsonl").read_text().splitlines()) == 4
    other = {"a": "--video-rate", "v": "--audio-rate"}[modality]
    r = mavsr(d, "decode", "--exp", f"exp/{modality}", flag, want[0][1:], other, "2", ok=False)
    assert r.returncode == 2 and "not in the trained grid" in r.stderr + r.stdout
    assert mavsr(d, "score", "--exp", f"exp/{modality}").stdout.count("WER") == 2
    if modality == "a":  # options on the video an audio-only model never reads are refused, not ignored
        video = d / json.loads((d / "data/test/manifest.jsonl").read_text().splitlines()[0])["video"]
        for extra in (["--roi", "0,0,40,40"], ["--mouth-crop"], ["--save-roi", str(d / "crop.mp4")]):
            r = mavsr(d, "transcribe", str(video), "--exp", "exp/a", *extra, ok=False)
            assert r.returncode == 2 and "an audio-only model" in r.stderr, (extra, r.stderr)
        assert not (d / "crop.mp4").exists()


def test_sharded_extraction_merges_into_the_same_cache(recipe, tmp_path):
    from mavsr_cli import config as C
    from mavsr_cli.errors import MavsrError
    from mavsr_cli.recipe import Recipe
    from mavsr_cli.sharding import parse_shard
    from mavsr_cli.stages import extract_features as ef

    d = tmp_path / "r"
    shutil.copytree(recipe, d, ignore=shutil.ignore_patterns("dump", "exp"))
    r, cfg = Recipe(d), C.load(d / "conf/tiny.yaml")
    quiet = lambda m: None  # noqa: E731
    for i in (1, 0):  # two workers, in any order, 4 utterances per shard file -> 4 shard files
        ef.run(r, cfg, ["train"], log=quiet, shard=(i, 2), shard_size=4)
    (out,) = [p / "train" for p in (d / "dump").iterdir()]
    files = sorted(out.glob("shard-*.safetensors"))
    assert [f.name for f in files] == [f"shard-{n:05d}.safetensors" for n in range(4)]
    assert not (out / ".done").exists()  # not merged yet
    before = {f.name: f.stat().st_mtime_ns for f in files}
    ef.run(r, cfg, ["train"], log=quiet, shard_size=4)  # the merge computes nothing again
    assert {f.name: f.stat().st_mtime_ns for f in sorted(out.glob("shard-*.safetensors"))} == before
    assert (out / ".done").is_file() and len((out / "index.jsonl").read_text().splitlines()) == 15
    # identical to an unsharded extraction of the same corpus
    from safetensors.torch import load_file

    ref = load_file(av_dump(recipe) / "train" / "shard-00000.safetensors")
    got = {k: v for f in files for k, v in load_file(f).items()}
    assert set(got) == set(ref) and all(torch_equal(got[k], ref[k]) for k in ref)
    with pytest.raises(MavsrError, match="i/N"):
        parse_shard("2of4")
    with pytest.raises(MavsrError, match="0 <= i < N"):
        parse_shard("4/4")


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)
