"""Decoding and scoring on the tiny recipe: beam search, sweeps, budgets, noise, shards, audit files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from e2e_helpers import mavsr, refused, snapshot

from mavsr_cli.rates import DecodeTag, Rates


def hyps(path):
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in path.read_text().splitlines()]


def test_batch_size_and_reruns_do_not_change_beam_hypotheses(recipe, tmp_path):
    d = recipe
    out = d / "exp/t/decode_a4v5_beam3/test/hyp.jsonl"
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "5", "--beam", "3", "--batch-size", "4")
    first = hyps(out)
    assert len(first) == 4
    for bs in ("1", "3"):
        mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "5", "--beam", "3",
              "--batch-size", bs, "--force")
        assert hyps(out) == first
    assert "beam: 3" in (out.parent / "config.yaml").read_text()


def test_sweep_decodes_the_whole_grid_and_budget_picks_within_it(recipe):
    d = recipe
    r = mavsr(d, "decode", "--exp", "exp/t", "--sweep", "--beam", "2")
    for tag in ("a4v2", "a4v5", "a16v2", "a16v5"):
        assert (d / f"exp/t/decode_{tag}_beam2/test/.done").is_file()
    assert r.stdout.count("decode: 4 utterances") == 4
    # 20 tokens/s: (4,5) = 17.5 and (16,2) = 15.6 and (16,5) = 8.1 fit, (4,2) = 25 does not
    r = mavsr(d, "decode", "--exp", "exp/t", "--budget", "20", "--beam", "2")
    assert "-> a" in r.stdout
    chosen = r.stdout.split("-> ")[1].split()[0]
    assert chosen in ("a4v5", "a16v2", "a16v5")
    r = mavsr(d, "decode", "--exp", "exp/t", "--budget", "5", ok=False)
    assert r.returncode == 2 and "no trained configuration fits" in r.stderr + r.stdout


def test_budget_prefers_the_lowest_known_wer_then_the_least_compression():
    from mavsr_cli.decoding import Budget, pick_by_budget
    from mavsr_cli.rates import Rates

    grid = [Rates(4, 2), Rates(4, 5), Rates(16, 2), Rates(16, 5)]

    two_s = ((2.0, 100, 50),)  # one utterance of 2 s: 100 audio frames, 50 video frames

    def pick(limit, scores=None, fixed=0):
        return pick_by_budget(grid, Budget(limit, fixed, two_s), [(scores, "test")] if scores else [])[0]

    assert pick(100) == Rates(4, 2)
    assert pick(20) == Rates(4, 5)  # 17.5 tokens/s, the most tokens that fit
    assert pick(20, {"a16v2": 3.0, "a4v5": 4.0}) == Rates(16, 2)  # better known WER
    assert pick(9) == Rates(16, 5)  # 6 + 10 tokens in 2 s: the frames pooled, a partial group dropped
    assert Budget(0, 0, two_s).cost(Rates(16, 2)) == (6 + 25) / 2.0
    # the prompt counts: 8 fixed tokens per 2 s utterance add 4 tokens/s, so 20 no longer fits (4,5)
    assert pick(20, fixed=8) == Rates(16, 2) and pick(21.5, fixed=8) == Rates(4, 5)
    # the split that scores the most of the pairs that fit ranks them, validation first on a tie
    val, test = {"a4v2": 1.0}, {"a16v2": 3.0, "a4v5": 4.0, "a16v5": 2.0}
    both = [(val, "val"), (test, "test")]
    r, why = pick_by_budget(grid, Budget(20, 0, two_s), both)
    assert r == Rates(16, 5) and "lowest test WER (2.00%)" in why
    r, why = pick_by_budget(grid, Budget(100, 0, two_s), both)  # one pair scored on val hides no test score
    assert r == Rates(16, 5) and "of the 3 scored pairs" in why
    val = {"a4v2": 9.0, "a4v5": 1.0, "a16v2": 8.0}
    r, why = pick_by_budget(grid, Budget(100, 0, two_s), [(val, "val"), (test, "test")])
    assert r == Rates(4, 5) and "lowest val WER (1.00%)" in why


def test_budget_speaks_the_reports_unit_and_decode_and_transcribe_agree(recipe, tmp_path):
    """--budget counts what RESULTS.md's tokens/s column counts (media + prompt), both commands rank
    by the same scores, and the log says why a pair was chosen."""
    d = tmp_path / "r"
    shutil.copytree(recipe, d, ignore=shutil.ignore_patterns("decode_*", "RESULTS.md"))
    for a, v in ((4, 2), (4, 5), (16, 2), (16, 5)):
        mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", str(a), "--video-rate", str(v), "--beam", "1")
    mavsr(d, "score", "--exp", "exp/t")
    table = {row.split("|")[2].strip(): float(row.split("|")[11]) for row in
             (d / "exp/t/RESULTS.md").read_text().splitlines() if row.startswith("| test | (")}
    wer = {DecodeTag.parse(w.parent.parent.name).rates: json.loads(w.read_text())["wer"]
           for w in (d / "exp/t").glob("decode_*/test/wer.json")}
    assert len(table) == 4 and len(wer) == 4

    def best(pairs):  # the rule: lowest WER, then the least compressed
        return min(pairs, key=lambda r: (wer[r], -r.tokens_per_second())).tag

    # a budget just above the reported tokens/s of (4,5) admits it and nothing costlier
    limit = table["(4,5)"] + 0.05
    fits = [r for r in wer if table[r.pair] <= limit]
    assert Rates(4, 5) in fits and Rates(4, 2) not in fits
    r = mavsr(d, "decode", "--exp", "exp/t", "--budget", f"{limit:.2f}", "--beam", "1")
    said = r.stdout + r.stderr
    assert "media + " in said and "prompt tokens" in said and "scored pairs that fit" in said
    assert said.split("-> ")[1].split()[0] == best(fits)
    # the report's figure of the cheapest pair is a budget it fits (the frames it pools, not the nominal rate)
    r = mavsr(d, "decode", "--exp", "exp/t", "--budget", f"{table['(16,5)'] + 0.05:.2f}", "--beam", "1")
    assert r.stdout.split("-> ")[1].split()[0] == "a16v5"
    # a budget between the media-only and the reported count of (4,5) no longer admits it
    between = (Rates(4, 5).tokens_per_second() + table["(4,5)"]) / 2
    r = mavsr(d, "decode", "--exp", "exp/t", "--budget", f"{between:.2f}", "--beam", "1")
    assert r.stdout.split("-> ")[1].split()[0] in {x.tag for x in fits if table[x.pair] < table["(4,5)"]}
    # transcribe of a test clip picks by the same rule (its own duration) and says why on stderr
    u = json.loads((d / "data/test/manifest.jsonl").read_text().splitlines()[0])
    r = mavsr(d, "transcribe", str(d / u["video"]), "--exp", "exp/t", "--budget", "1000", "--json")
    assert json.loads(r.stdout)["rates"] == best(list(wer))
    assert "lowest test WER" in r.stderr


def test_sharded_decoding_merges_into_the_unsharded_result(recipe, tmp_path):
    d = tmp_path / "r"
    shutil.copytree(recipe, d, ignore=shutil.ignore_patterns("decode_*"))
    args = ["decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "2", "--batch-size", "1"]
    r = mavsr(d, *args, "--shard", "1/3")
    assert "run without --shard to merge" in r.stdout
    out = d / "exp/t/decode_a16v5_beam2/test"
    assert not (out / ".done").exists()
    mavsr(d, *args)  # computes parts 0 and 2, reuses part 1, merges
    assert (out / ".done").is_file() and not (out.parent / ".test.parts").exists()
    ref = tmp_path / "ref"
    shutil.copytree(recipe, ref, ignore=shutil.ignore_patterns("decode_*"))
    mavsr(ref, *args)
    assert hyps(out / "hyp.jsonl") == hyps(ref / "exp/t/decode_a16v5_beam2/test/hyp.jsonl")


def test_noisy_decoding_is_seeded_and_cached_apart(recipe):
    d = recipe
    args = ["decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1", "--snr", "-5"]
    mavsr(d, *args)
    out = d / "exp/t/decode_a16v5_beam1_snr-5/test/hyp.jsonl"
    first = hyps(out)
    tag = json.loads((d / "exp/t/meta.json").read_text())["encoders_tag"]
    noisy = d / "dump" / tag / "test-snr-5"
    assert (noisy / ".done").is_file()
    from safetensors.torch import load_file

    a = load_file(noisy / "shard-00000.safetensors")
    b = load_file(d / "dump" / tag / "test" / "shard-00000.safetensors")
    k = next(k for k in a if k.endswith("/audio"))
    assert not (a[k] == b[k]).all()  # the audio features changed
    kv = next(k for k in a if k.endswith("/video"))
    assert (a[kv] == b[kv]).all()  # the video did not
    shutil.rmtree(noisy)  # a fresh noisy encoding gives the same noisy input, hence the same output
    mavsr(d, *args, "--force")
    assert hyps(out) == first and (load_file(noisy / "shard-00000.safetensors")[k] == a[k]).all()
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1", "--snr", "0",
          "--noise", "white")
    assert (d / "exp/t/decode_a16v5_beam1_white_snr0/test/.done").is_file()


def test_score_writes_an_auditable_table(recipe):
    d = recipe
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1", "--snr", "-5")
    mavsr(d, "score", "--exp", "exp/t")
    dd = d / "exp/t/decode_a16v5_beam1_snr-5/test"
    for name in ("wer.json", "result.txt", "errors.txt", "ref.trn", "hyp.trn"):
        assert (dd / name).is_file(), name
    w = json.loads((dd / "wer.json").read_text())
    assert {"wer", "cer", "sub", "del", "ins", "normaliser"} <= set(w) and w["normaliser"] == "default"
    ids = [json.loads(x)["id"] for x in (dd / "hyp.jsonl").read_text().splitlines()]
    assert [line.rsplit("(", 1)[1].rstrip(")") for line in (dd / "ref.trn").read_text().splitlines()] == ids
    res = (d / "exp/t/RESULTS.md").read_text()
    assert "| test | (16,5) | snr-5 | 1 |" in res and "| test | (16,5) | clean |" in res
    assert "git " in res and "torch " in res
    assert res.index("| clean |") < res.index("| snr-5 |")  # clean rows first


@pytest.mark.parametrize("case", ["missing split", "no checkpoint", "bad beam"])
def test_decode_errors_are_one_line(recipe, tmp_path, case):
    d = recipe
    if case == "missing split":
        r = mavsr(d, "decode", "--exp", "exp/t", "--split", "dev", "--audio-rate", "4", "--video-rate", "2", ok=False)
    elif case == "no checkpoint":
        e = d / "exp/empty"
        e.mkdir(exist_ok=True)
        shutil.copy(d / "exp/t/config.yaml", e / "config.yaml")
        r = mavsr(d, "decode", "--exp", "exp/empty", "--audio-rate", "4", "--video-rate", "2", ok=False)
    else:
        r = mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2", "--beam", "0", ok=False)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), r.stderr


def _test_utt(d):
    rec = json.loads((d / "data/test/manifest.jsonl").read_text().splitlines()[0])
    return rec, d / rec["video"] if not Path(rec["video"]).is_absolute() else Path(rec["video"])


def test_transcribe_reads_a_video_like_the_recipe_does(recipe):
    d = recipe
    rec, video = _test_utt(d)
    r = mavsr(d, "transcribe", str(video), "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1",
              "--json")
    res = json.loads(r.stdout)
    assert res["rates"] == "a16v5" and res["duration"] == pytest.approx(rec["duration"], abs=0.05)
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1")
    cached = next(json.loads(x) for x in (d / "exp/t/decode_a16v5_beam1/test/hyp.jsonl").read_text().splitlines()
                  if json.loads(x)["id"] == rec["id"])
    assert res["tokens_in"] == cached["tokens_in"]  # same frames, same lengths as the cached path
    plain = mavsr(d, "transcribe", str(video), "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5",
                  "--beam", "1").stdout.strip()
    assert plain == res["text"]  # plain text mode prints just the transcript


def test_transcribe_takes_other_frame_rates_sizes_and_a_roi(recipe, tmp_path):
    import numpy as np

    from mavsr_cli.media import read_audio, read_video_at, read_video_gray, write_av

    d = recipe
    rec, video = _test_utt(d)
    roi = read_video_gray(video)  # (T, 96, 96) at 25 fps
    t = len(roi)
    # the same mouth at 50 fps inside a larger frame
    big = np.full((2 * t, 160, 200), 30, np.uint8)
    for k in range(2 * t):
        big[k, 40:136, 50:146] = roi[k // 2]
    path = tmp_path / "wide.mp4"
    write_av(path, big, read_audio(video), fps=50)
    back = read_video_at(path, 25)
    assert abs(len(back) - t) <= 1 and back.shape[1:] == (160, 200)
    r = mavsr(d, "transcribe", str(path), "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2", "--beam", "1",
              "--roi", "50,40,96,96", "--json")
    res = json.loads(r.stdout)
    assert res["duration"] == pytest.approx(rec["duration"], abs=0.1)
    for bad, msg in (("--roi", "outside"), (None, "corrupt.mp4"), ("face", "wide.mp4: no face found in any of")):
        if bad == "face":  # the wide frame without --roi goes through face detection, which finds no face
            r = mavsr(d, "transcribe", str(path), "--exp", "exp/t", ok=False)
        elif bad:
            r = mavsr(d, "transcribe", str(path), "--exp", "exp/t", "--roi", "150,100,96,96", ok=False)
        else:
            junk = tmp_path / "corrupt.mp4"
            junk.write_bytes(path.read_bytes()[:300])
            r = mavsr(d, "transcribe", str(junk), "--exp", "exp/t", ok=False)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, r.stderr


def test_bench_measures_every_pair_and_condition_in_one_run(recipe, tmp_path):
    import csv

    out = tmp_path / "bench"
    r = mavsr(recipe, "bench", "--exp", "exp/t", "--snr", "clean,0", "--beam", "2", "--out", str(out))
    assert "bench: 8 rows" in r.stdout
    assert "mavsr bench --exp exp/t --snr clean,0" in (out / "cmd.txt").read_text()  # the report names its command
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert sorted((x["rates"], x["snr"]) for x in rows) == sorted(
        (t, s) for t in ("a4v2", "a4v5", "a16v2", "a16v5") for s in ("clean", "0.0"))
    clean = [x for x in rows if x["snr"] == "clean"]
    for x in clean:  # the Pareto flags follow from the numbers in the same file
        dominated = any(float(y["tokens_per_s"]) <= float(x["tokens_per_s"]) and float(y["wer"]) <= float(x["wer"])
                        and (float(y["tokens_per_s"]), float(y["wer"])) != (float(x["tokens_per_s"]), float(x["wer"]))
                        for y in clean)
        assert (x["pareto"] == "True") == (not dominated)
    tokens = {x["rates"]: float(x["tokens_per_s"]) for x in clean}
    assert tokens["a4v2"] > tokens["a4v5"] > tokens["a16v5"] and tokens["a4v2"] > tokens["a16v2"] > tokens["a16v5"]
    assert all(float(x["latency_s"]) > 0 and float(x["rtf"]) > 0 for x in rows)
    # the WER of each row is the one its decode dir scores
    for x in rows:
        cond = "" if x["snr"] == "clean" else "_snr0"
        w = json.loads((recipe / f"exp/t/decode_{x['rates']}_beam2{cond}/test/wer.json").read_text())
        assert abs(w["wer"] - float(x["wer"])) < 0.01
    report = (out / "REPORT.md").read_text()
    assert "| exp | modality | (A,V) | clean | 0 dB |" in report
    assert "| t | av | (16,5) | " in report and "a16v5" not in report  # one notation for rate pairs
    assert all(float(x["peak_mem_mb"]) > 50 for x in rows)  # the process's real peak, the model in it; never 0
    data = json.loads((out / "bench.json").read_text())
    assert len(data["rows"]) == 8 and data["environment"]["beam"] == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots not drawn" in report
    else:
        assert (out / "wer_vs_tokens.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "wer_vs_snr.png").read_bytes()[:4] == b"\x89PNG"
    r = mavsr(recipe, "bench", "--exp", "exp/t", "--snr", "clean,loud", ok=False)
    assert r.returncode == 2 and "'loud' is neither 'clean' nor a number" in r.stderr


def test_inference_only_pooling_feeds_one_pairs_projectors_other_rates(recipe):
    d = recipe
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2", "--pool-rates", "a16v5")
    pooled = [json.loads(x) for x in (d / "exp/t/decode_a4v2_poola16v5_beam15/test/hyp.jsonl").read_text().splitlines()]
    native = [json.loads(x) for x in (d / "exp/t/decode_a16v5_beam15/test/hyp.jsonl").read_text().splitlines()]
    own = [json.loads(x) for x in (d / "exp/t/decode_a4v2_beam15/test/hyp.jsonl").read_text().splitlines()]
    # the LLM sees as many tokens as at (16,5), fewer than at (4,2)
    assert [x["tokens_in"] for x in pooled] == [x["tokens_in"] for x in native]
    assert all(p["tokens_in"] < o["tokens_in"] for p, o in zip(pooled, own, strict=True))
    assert "pool: a16v5" in (d / "exp/t/decode_a4v2_poola16v5_beam15/test/config.yaml").read_text()
    mavsr(d, "score", "--exp", "exp/t")
    assert "| test | (4,2) pooled at (16,5) | clean | 15 |" in (d / "exp/t/RESULTS.md").read_text()
    from mavsr_cli.decoding import known_scores

    own_wers = [json.loads(w.read_text())["wer"] for w in (d / "exp/t").glob("decode_a4v2_beam*/test/wer.json")
                if "_snr" not in w.parent.parent.name]
    assert known_scores(d / "exp/t", "test")["a4v2"] == min(own_wers)  # the pooled dir never ranks (4,2)
    for bad, phrase in ((["--sweep", "--pool-rates", "a16v5"], "not --sweep"),
                        (["--audio-rate", "4", "--video-rate", "2", "--pool-rates", "a16"], "same modalities")):
        r = mavsr(d, "decode", "--exp", "exp/t", *bad, ok=False)
        assert r.returncode == 2 and phrase in r.stderr, r.stderr


def test_options_that_would_be_ignored_are_refused(recipe):
    d = recipe
    before = snapshot(d)
    r = mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "2", "--noise", "white", ok=False)
    assert r.returncode == 2 and "give --snr too" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert snapshot(d) == before  # nothing decoded, nothing written
    _, video = _test_utt(d)
    r = mavsr(d, "transcribe", str(video), "--exp", "exp/t", "--budget", "20", "--audio-rate", "16", ok=False)
    assert r.returncode == 2 and "--budget picks the rates" in r.stderr, r.stderr
    for extra in (["--num-utts", "5"], ["--speakers", "3"], ["--csv", "x.csv"]):  # not options of prepare dir
        r = mavsr(d, "prepare", "dir", "--root", str(d), *extra, ok=False)
        assert r.returncode == 2 and "No such option" in r.stderr, r.stderr
    (d / "report.txt").write_text("not a dir")
    for args, phrase in ((["transcribe", str(video), "--exp", "exp/t", "--roi", "0,0,40,40", "--mouth-crop"],
                          "give one of them"),
                         (["bench", "--exp", "exp/t", "--snr", "clean", "--noise", "white"], "give one in --snr"),
                         (["bench", "--exp", "exp/t", "--snr", "clean", "--out", "report.txt"], "is a file")):
        r = mavsr(d, *args, ok=False)
        assert r.returncode == 2 and phrase in r.stderr and r.stderr.strip().count("\n") == 0, (args, r.stderr)
    (d / "report.txt").unlink()
    for args, phrase in ((["decode", "--exp", "exp/t", "--budget", "-3"], "> 0; got -3"),
                         (["train", "--config", "conf/tiny.yaml", "--rates", "all", "--tag", "../escape"],
                          "must be a plain name"),
                         (["serve", "--exp", "exp/t", "--batch-wait-ms", "-5"], "at least 0, got -5"),
                         (["serve", "--exp", "exp/t", "--beam", "65"], "--beam must be 1 to 64, got 65"),
                         (["prepare", "synth", "--nj", "0"], "--nj"),
                         (["score", "--exp", "exp/nope"], "is not an experiment dir"),
                         (["transcribe", str(video), "--exp", "exp/t", "--save-roi", "roi.txt"], "give a .mp4 name"),
                         (["transcribe", str(video), "--exp", "exp/t", "--roi", "-5,0,0,10"], "at least 1"),
                         (["bench", "--exp", "exp/t", "--exp", "exp/t", "--snr", "clean"], "given twice")):
        r = mavsr(d, *args, ok=False)
        assert r.returncode == 2 and phrase in r.stderr, (args, r.stderr)
    assert snapshot(d) == before and not (d / "escape").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine must not have")
def test_a_device_not_here_is_one_line_before_any_write_and_each_hypothesis_names_its_device(recipe):
    """decode, transcribe, bench and serve take --device as extract-features does: a GPU that is not
    here is refused in one line before anything is written; a decode records where each utterance
    was decoded (its hyp.jsonl line) and the devices of the whole split (config.yaml)."""
    d = recipe
    _, video = _test_utt(d)
    before = snapshot(d)
    for args in (["decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "5", "--beam", "1"],
                 ["transcribe", str(video), "--exp", "exp/t"], ["bench", "--exp", "exp/t", "--snr", "clean"],
                 ["serve", "--exp", "exp/t", "--port", "0"]):
        for dev in ("cuda", "cuda:1"):
            r = mavsr(d, *args, "--device", dev, ok=False)
            err = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(err) == 1 and "sees no CUDA GPU" in err[0], (args, r.stderr)
    assert snapshot(d) == before
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "5", "--beam", "1", "--device", "cpu")
    out = d / "exp/t/decode_a4v5_beam1/test"
    assert {json.loads(x)["device"] for x in (out / "hyp.jsonl").read_text().splitlines()} == {"cpu"}
    assert "devices: ['cpu']" in (out / "config.yaml").read_text()


def test_a_decode_begun_on_another_device_type_is_not_finished_on_this_one(recipe, tmp_path):
    """A part decoded on a GPU (its lines say so) is not finished by a CPU run, nor is a decode dir
    finished on a GPU reused by one: each is refused in one line before any write; --force redoes it."""
    d = shutil.copytree(recipe, tmp_path / "r", symlinks=True)
    shutil.rmtree(d / "exp/t/decode_a16v5_beam1", ignore_errors=True)  # another test may have decoded it
    args = ["decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1", "--device", "cpu"]
    mavsr(d, *args, "--shard", "0/2")
    part = d / "exp/t/decode_a16v5_beam1/.test.parts/part-00000-of-00002.jsonl"
    lines = [json.loads(x) for x in part.read_text().splitlines()]
    assert {x["device"] for x in lines} == {"cpu"}
    part.write_text("".join(json.dumps({**x, "device": "cuda"}) + "\n" for x in lines))  # as a GPU worker's

    line = refused(d, *args)  # part 1 is still to decode, here on the CPU
    assert "was begun on cuda" in line and "--device cuda" in line and "--force" in line, line
    mavsr(d, *args, "--force")
    out = d / "exp/t/decode_a16v5_beam1/test"
    assert "devices: ['cpu']" in (out / "config.yaml").read_text()
    done = json.loads((out / ".done").read_text())
    assert done["device"] == "cpu"
    (out / ".done").write_text(json.dumps({**done, "device": "cuda"}))  # as a GPU's decode would have recorded
    line = refused(d, *args)
    assert "device cuda != cpu" in line, line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the CI machine)")
def test_a_decode_on_a_gpu_reads_the_same_inputs_and_scores_near_the_cpus(recipe, tmp_path):
    """The model and the search on the GPU (the LLM in bf16 where training would use it there): every
    utterance says cuda, its LLM input length is the CPU's (the same features and compression), and
    the WER is within 10 points of the CPU's (other kernels, other rounding)."""
    d = shutil.copytree(recipe, tmp_path / "r", symlinks=True)
    got = {}
    for dev in ("cpu", "cuda"):
        mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "4", "--video-rate", "5", "--beam", "3",
              "--device", dev, "--force")
        out = d / "exp/t/decode_a4v5_beam3/test"
        lines = [json.loads(x) for x in (out / "hyp.jsonl").read_text().splitlines()]
        assert {x["device"] for x in lines} == {dev}
        mavsr(d, "score", "--exp", "exp/t", "--force")
        got[dev] = ([x["tokens_in"] for x in lines], json.loads((out / "wer.json").read_text())["wer"])
    assert got["cuda"][0] == got["cpu"][0]
    assert abs(got["cuda"][1] - got["cpu"][1]) <= 10.0, got


def test_a_decode_of_an_earlier_checkpoint_is_flagged_by_score_and_never_ranks(recipe, tmp_path):
    """A decode dir made from another checkpoint than the one the experiment decodes now (a decode
    of a training still running) is marked in RESULTS.md and warned of, and --budget does not rank
    pairs by it."""
    from mavsr_cli.decoding import known_scores
    from mavsr_cli.rates import DecodeTag

    d = shutil.copytree(recipe, tmp_path / "r", symlinks=True)
    mavsr(d, "decode", "--exp", "exp/t", "--audio-rate", "16", "--video-rate", "5", "--beam", "1")
    out = d / "exp/t/decode_a16v5_beam1/test"
    r = mavsr(d, "score", "--exp", "exp/t")
    assert "decoded from" not in r.stdout + r.stderr and known_scores(d / "exp/t", "test").get("a16v5") is not None
    done = json.loads((out / ".done").read_text())
    (out / ".done").write_text(json.dumps({**done, "checkpoint": "step-000001"}))  # as a decode during training
    r = mavsr(d, "score", "--exp", "exp/t")
    assert "decode_a16v5_beam1/test was decoded from step-000001" in r.stdout + r.stderr
    assert "| decode_a16v5_beam1 (from step-000001) |" in (d / "exp/t/RESULTS.md").read_text()
    wer = json.loads((out / "wer.json").read_text())
    (out / "wer.json").write_text(json.dumps({**wer, "wer": 0.0}))  # the best of all, were it counted
    clean = [w for w in (d / "exp/t").glob("decode_a16v5_beam*/test/wer.json")
             if not DecodeTag.parse(w.parent.parent.name).condition]  # other tests' noisy dirs never rank
    others = [json.loads(w.read_text())["wer"] for w in clean
              if w.parent.parent.name != "decode_a16v5_beam1"]  # (16,5) at other beams still rank it
    assert known_scores(d / "exp/t", "test").get("a16v5") == (min(others) if others else None)
