"""`mavsr claims`: verdicts follow from the numbers a study wrote (bench.json, wer.json files)."""

import json

import pytest
from typer.testing import CliRunner

from mavsr_cli.cli import app
from mavsr_cli.errors import MavsrError
from mavsr_cli.rates import Rates
from mavsr_cli.recipe import Recipe
from mavsr_cli.stages import claims

PAIRS = ["a4v2", "a4v5", "a16v2", "a16v5"]


def _wer(d, exp, name, wer):
    f = d / "exp" / exp / name / "test" / "wer.json"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"wer": wer}))


def _row(exp, modality, tag, snr, wer, latency=0.01):
    r = Rates.parse(tag)
    prompt = 3.0  # tokens/s of the prompt, the same for every pair
    return {"exp": exp, "modality": modality, "rates": tag, "audio_rate": r.audio, "video_rate": r.video, "snr": snr,
            "wer": wer, "tokens_per_s": round(r.tokens_per_second() + prompt, 2), "latency_s": latency}


def study(d, ms=None, base=None, pooled=None, av_noisy=40.0, a_noisy=60.0, video=70.0):
    """A finished study's files, with good numbers unless overridden."""
    ms = ms or {"a4v2": 8.0, "a4v5": 9.0, "a16v2": 14.0, "a16v5": 15.0}
    base = base or {p: w - 0.5 for p, w in ms.items()}
    pooled = pooled or {p: w + 30 for p, w in ms.items()}
    rows = []
    for p in PAIRS:
        lat = 0.02 if p.startswith("a4") else 0.012
        rows.append(_row("ms", "av", p, None, ms[p], lat))
        rows += [_row("ms", "av", p, s, av_noisy) for s in (0.0, -5.0)]
    for p in ("a4", "a16"):
        rows += [_row("audio", "a", p, None, 12.0)] + [_row("audio", "a", p, s, a_noisy) for s in (0.0, -5.0)]
    for p in ("v2", "v5"):
        rows.append(_row("video", "v", p, None, video))
    (d / "exp/bench").mkdir(parents=True)
    (d / "exp/bench/bench.json").write_text(json.dumps({"environment": {"beam": 15, "machine": "test"}, "rows": rows}))
    for p in PAIRS:
        (d / "exp" / f"base_{p}").mkdir(parents=True, exist_ok=True)
        (d / "exp" / f"base_{p}" / "meta.json").write_text(json.dumps({"rates": [p]}))  # the trained grid
        _wer(d, f"base_{p}", f"decode_{p}_beam15", base[p])
        _wer(d, "ss", f"decode_{p}_beam15", ms[p] + 1.0)
        _wer(d, "rate1", f"decode_a1v1_pool{p}_beam15", pooled[p])
    (d / "exp/rate1/meta.json").write_text(json.dumps({"rates": ["a1v1"]}))


def run(d, bounds=claims.Bounds(), **kw):
    args = dict(matryoshka=["exp/ms", "exp/ss"], baselines=[f"exp/base_{p}" for p in PAIRS], rate1="exp/rate1",
                audio_only="exp/audio", video_only="exp/video")
    args.update(kw)
    res = claims.run(Recipe(d), "exp/bench", args["matryoshka"], args["baselines"], args["rate1"],
                     args["audio_only"], args["video_only"], bounds, None, log=lambda *_: None)
    return {c.number: c for c in res}


def test_a_study_that_bears_the_claims_out(tmp_path):
    study(tmp_path)
    res = run(tmp_path)
    assert all(c.holds for c in res.values()), [(c.number, c.checks) for c in res.values() if not c.holds]
    out = json.loads((tmp_path / "exp/bench/claims.json").read_text())
    assert [c["holds"] for c in out["claims"]] == [True] * 5
    md = (tmp_path / "exp/bench/CLAIMS.md").read_text()
    assert "## Claim 1: HOLDS" in md and "## Accuracy targets: HOLDS" in md
    # claim 4 reads the media tokens (prompt removed) against 50/a + 25/v
    c4 = {x["what"]: x for x in res[4].checks}
    assert c4["media tokens/s at (16,5)"]["value"] == "8.1 vs 8.1 ideal"
    # the rate-1 model at its own rates is reported next to the pooled checks when it was decoded
    assert not any("own" in x["what"] for x in res[2].checks)
    _wer(tmp_path, "rate1", "decode_a1v1_beam15", 6.5)
    own = [x for x in run(tmp_path)[2].checks if "own" in x["what"]]
    assert [(x["what"], x["value"], x["bound"]) for x in own] == [("rate1 at its own (1,1)", "6.50", "reported")]


@pytest.mark.parametrize("change, failing", [
    (dict(base={"a4v2": 5.0, "a4v5": 9.0, "a16v2": 14.0, "a16v5": 15.0}), {1}),  # 3 points worse than (4,2)'s baseline
    (dict(ms={"a4v2": 8.0, "a4v5": 9.0, "a16v2": 14.0, "a16v5": 25.0}), {0, 2}),  # (16,5) misses 20 and rises 17 points
    (dict(pooled={p: 18.0 for p in PAIRS}), {2}),  # pooling does not collapse
    (dict(av_noisy=65.0), {3}),  # AV worse than audio-only in babble
    (dict(video=85.0), {3}),
])
def test_each_claim_can_fail(tmp_path, change, failing):
    study(tmp_path, **change)
    res = run(tmp_path)
    assert {n for n, c in res.items() if not c.holds} == failing


def test_looser_bounds_and_missing_parts(tmp_path):
    study(tmp_path, ms={"a4v2": 60.0, "a4v5": 61.0, "a16v2": 65.0, "a16v5": 66.0})
    assert not run(tmp_path)[0].holds
    assert run(tmp_path, claims.Bounds(target_best=70, target_worst=70))[0].holds
    res = run(tmp_path, baselines=[], rate1=None)
    assert not res[1].holds and not res[2].holds  # a claim without its evidence does not hold
    (tmp_path / "exp/ss/decode_a16v5_beam15/test/wer.json").unlink()
    with pytest.raises(MavsrError, match="decode_a16v5_beam15/test/wer.json is missing"):
        run(tmp_path)


def test_cli_strict_exit_code(tmp_path):
    study(tmp_path, av_noisy=65.0)
    args = ["claims", "--dir", str(tmp_path), "--bench", "exp/bench", "--matryoshka", "exp/ms", "--audio-only",
            "exp/audio", "--video-only", "exp/video", "--rate1", "exp/rate1"]
    args += [x for p in PAIRS for x in ("--baseline", f"exp/base_{p}")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert CliRunner().invoke(app, args + ["--strict"]).exit_code == 1
    r = CliRunner().invoke(app, ["claims", "--dir", str(tmp_path), "--bench", "exp/nothing", "--matryoshka", "exp/ms"])
    assert isinstance(r.exception, MavsrError) and "run mavsr bench first" in str(r.exception)
