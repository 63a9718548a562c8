"""Stage `claims`: the paper's four claims (docs/method.md), checked against a finished study.

Reads what earlier stages wrote, decodes nothing:
    <bench>/bench.json                  rows of `mavsr bench` over the Matryoshka, audio-only and
                                        video-only experiments (clean and babble conditions)
    <exp>/meta.json                     the rate grid each experiment trained
    <exp>/decode_<pair>_beam<B>/<split>/wer.json          per-rate baselines, other strategies
    <rate1>/decode_<pair>_pool<pair>_beam<B>/<split>/wer.json  the rate-1 model pooled at inference
writes <out>/CLAIMS.md and <out>/claims.json: each claim with its verdict (holds / fails) and the
numbers behind it. The bounds are options, so a small study (CI) checks the same claims looser.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint import trained_grid
from ..errors import MavsrError
from ..fsutil import atomic_write_json, atomic_write_text
from ..options import Bounds
from ..rates import DecodeTag, Rates
from ..recipe import Recipe


@dataclass
class Claim:
    number: int
    text: str
    holds: bool = True
    checks: list[dict] = field(default_factory=list)  # {what, value, bound, ok}

    def check(self, what: str, ok: bool, value: str, bound: str) -> None:
        self.checks.append({"what": what, "value": value, "bound": bound, "ok": bool(ok)})
        self.holds = self.holds and bool(ok)


def _wer(exp: Path, name: str, split: str) -> float:
    f = exp / name / split / "wer.json"
    if not f.is_file():
        raise MavsrError(f"claims: {f} is missing (decode and score {exp.name} first)")
    return float(json.loads(f.read_text())["wer"])


def load_bench(bench: Path) -> dict:
    """bench.json (given as the file or its directory): {"rows": [...], "environment": {...}}."""
    f = bench / "bench.json" if bench.is_dir() else bench
    if not f.is_file():
        raise MavsrError(f"claims: {f} is missing (run mavsr bench first)")
    return json.loads(f.read_text())


@dataclass(frozen=True)
class Study:
    """What the claims read: the bench rows, the main Matryoshka experiment's clean rows by rate
    tag, and its pairs from the least to the most compressed."""

    rows: list[dict]
    beam: int
    split: str
    main: str
    clean: dict[str, dict]
    pairs: list[Rates]

    @property
    def best(self) -> Rates:
        return self.pairs[0]

    @property
    def worst(self) -> Rates:
        return self.pairs[-1]

    def wer(self, exp: Path, rates: Rates, pool: Rates | None = None) -> float:
        """A decode dir's clean WER at the study's beam (DecodeTag names it)."""
        return _wer(exp, DecodeTag(rates, self.beam, pool).name, self.split)


def check(recipe: Recipe, bench: dict, matryoshka: list[Path], baselines: list[Path], rate1: Path | None,
          audio_only: str | None, video_only: str | None, bounds: Bounds, split: str = "test") -> list[Claim]:
    rows = bench["rows"]
    main = matryoshka[0].name
    clean = {r["rates"]: r for r in rows if r["exp"] == main and r["snr"] is None}
    if not clean:
        raise MavsrError(f"claims: the bench has no clean rows of {main}")
    pairs = sorted((Rates.parse(t) for t in clean), key=lambda r: -r.tokens_per_second())
    s = Study(rows, int(bench["environment"]["beam"]), split, main, clean, pairs)
    return [targets(s, bounds), claim1(s, matryoshka, baselines, bounds), claim2(s, rate1, bounds),
            claim3(s, audio_only, video_only, bounds), claim4(s, bounds)]


def targets(s: Study, bounds: Bounds) -> Claim:
    c = Claim(0, "The model is accurate enough for the comparisons to mean something (the study's targets).")
    for p, bound in ((s.best, bounds.target_best), (s.worst, bounds.target_worst)):
        w = s.clean[p.tag]["wer"]
        c.check(f"{s.main} clean WER at {p.pair}", w < bound, f"{w:.2f}", f"< {bound:g}")
    return c


def claim1(s: Study, matryoshka: list[Path], baselines: list[Path], bounds: Bounds) -> Claim:
    c = Claim(1, "One Matryoshka checkpoint decodes at every trained configuration, each within a small "
                 "margin of (or better than) a model trained for that configuration alone.")
    base = {r.tag: (b.name, s.wer(b, r)) for b in baselines for r in trained_grid(b)}
    if not base:
        c.check("per-rate baselines given", False, "none", "one per configuration")
    for m in matryoshka:
        for p in s.pairs:
            if p.tag not in base:
                c.check(f"{m.name} {p.pair}: a baseline trained at {p.pair}", False, "missing", "present")
                continue
            w = s.clean[p.tag]["wer"] if m.name == s.main else s.wer(m, p)
            bw = base[p.tag][1]
            c.check(f"{m.name} {p.pair} vs {base[p.tag][0]}", w - bw <= bounds.margin,
                    f"{w:.2f} vs {bw:.2f} ({w - bw:+.2f})", f"<= +{bounds.margin:g}")
    return c


def claim2(s: Study, rate1: Path | None, bounds: Bounds) -> Claim:
    c = Claim(2, "WER rises gently with compression; pooling a model trained at rate 1 collapses.")
    rise = s.clean[s.worst.tag]["wer"] - s.clean[s.best.tag]["wer"]
    c.check(f"{s.main} WER rise {s.best.pair} -> {s.worst.pair}", rise <= bounds.gentle, f"{rise:+.2f}",
            f"<= +{bounds.gentle:g}")
    if rate1 is None:
        c.check("rate-1 model given", False, "none", "a model trained at (1,1)")
        return c
    r1 = trained_grid(rate1)[0]
    if (rate1 / DecodeTag(r1, s.beam).name / s.split / "wer.json").is_file():  # context: at its own rates
        c.check(f"{rate1.name} at its own {r1.pair}", True, f"{s.wer(rate1, r1):.2f}", "reported")
    for p in (s.best, s.worst):
        pw = s.wer(rate1, r1, pool=p)
        gap = pw - s.clean[p.tag]["wer"]
        bound = bounds.collapse if p == s.worst else None
        c.check(f"{rate1.name} pooled at {p.pair} vs {s.main}", True if bound is None else gap >= bound,
                f"{pw:.2f} vs {s.clean[p.tag]['wer']:.2f} ({gap:+.2f})",
                "reported" if bound is None else f">= +{bound:g}")
    return c


def claim3(s: Study, audio_only: str | None, video_only: str | None, bounds: Bounds) -> Claim:
    c = Claim(3, "Audio+video beats audio alone under heavy babble noise; video alone is far better than chance.")
    if audio_only is None:
        c.check("audio-only model given", False, "none", "present")
    for snr in bounds.noisy_snrs if audio_only is not None else ():
        for p in s.pairs:
            av = next((r for r in s.rows if r["exp"] == s.main and r["rates"] == p.tag and r["snr"] == snr), None)
            a = next((r for r in s.rows if r["exp"] == audio_only and r["audio_rate"] == p.audio
                      and r["snr"] == snr), None)
            if av is None or a is None:
                c.check(f"{p.pair} at {snr:g} dB", False, "not in the bench", "AV and audio-only rows")
                continue
            c.check(f"{s.main} {p.pair} vs {audio_only} (a{p.audio}) at {snr:g} dB",
                    av["wer"] < a["wer"] + bounds.av_slack, f"{av['wer']:.2f} vs {a['wer']:.2f}",
                    "AV lower" if not bounds.av_slack else f"AV < audio-only + {bounds.av_slack:g}")
    if video_only is None:
        c.check("video-only model given", False, "none", "present")
        return c
    v = [r for r in s.rows if r["exp"] == video_only and r["snr"] is None]
    if not v:
        c.check("video-only rows", False, "not in the bench", "present")
    for r in v:
        c.check(f"{video_only} v{r['video_rate']} clean WER", r["wer"] < bounds.video_max,
                f"{r['wer']:.2f}", f"< {bounds.video_max:g}")
    return c


def claim4(s: Study, bounds: Bounds) -> Claim:
    c = Claim(4, "LLM input tokens and decode time fall with the rates, close to linearly.")
    # the LLM input = prompt tokens (a constant per utterance) + media tokens (proportional to 1/rate)
    prompt = s.clean[s.best.tag]["tokens_per_s"] - s.best.tokens_per_second()
    for p in s.pairs:
        media = s.clean[p.tag]["tokens_per_s"] - prompt
        ideal = p.tokens_per_second()
        c.check(f"media tokens/s at {p.pair}", abs(media / ideal - 1) <= bounds.linear_tol,
                f"{media:.1f} vs {ideal:.1f} ideal", f"within {bounds.linear_tol:.0%}")
    tb, tw = s.clean[s.best.tag], s.clean[s.worst.tag]
    ratio_tok = tw["tokens_per_s"] / tb["tokens_per_s"]
    ratio_time = tw["latency_s"] / max(1e-12, tb["latency_s"])
    c.check(f"decode time {s.worst.pair} / {s.best.pair}", ratio_time < 1.0,
            f"{ratio_time:.2f} (tokens {ratio_tok:.2f})", "< 1 (falls); the gap to the token ratio is "
            "the cost that does not scale with the input: generation, the prompt")
    return c


def render(claims: list[Claim], bounds: Bounds, env: dict) -> str:
    lines = ["# The paper's claims on this study", "",
             " | ".join(f"{k}: {v}" for k, v in env.items()), "",
             "Bounds: " + ", ".join(f"{k}={v}" for k, v in asdict(bounds).items()), ""]
    for c in claims:
        title = "Accuracy targets" if c.number == 0 else f"Claim {c.number}"
        lines += [f"## {title}: {'HOLDS' if c.holds else 'FAILS'}", "", c.text, "",
                  "| check | value | bound | ok |", "|---|---|---|---|"]
        lines += [f"| {x['what']} | {x['value']} | {x['bound']} | {'yes' if x['ok'] else '**no**'} |" for x in c.checks]
        lines.append("")
    return "\n".join(lines)


def run(recipe: Recipe, bench: Path, matryoshka: list[Path], baselines: list[Path], rate1: Path | None,
        audio_only: Path | None, video_only: Path | None, bounds: Bounds, out: Path | None, split: str = "test",
        log=print) -> list[Claim]:
    def at(p):
        return None if p is None else (Path(p) if Path(p).is_absolute() else recipe.root / p)

    if not matryoshka:
        raise MavsrError("claims: give the Matryoshka experiment with --matryoshka")
    bench = at(bench)
    data = load_bench(bench)
    claims = check(recipe, data, [at(m) for m in matryoshka], [at(b) for b in baselines], at(rate1),
                   None if audio_only is None else Path(audio_only).name,
                   None if video_only is None else Path(video_only).name, bounds, split)
    env = data["environment"]
    out = at(out) if out is not None else (bench if bench.is_dir() else bench.parent)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "claims.json", {"bounds": asdict(bounds), "environment": env,
                                            "claims": [asdict(c) for c in claims]})
    atomic_write_text(out / "CLAIMS.md", render(claims, bounds, env))
    for c in claims:
        log(f"{'targets' if c.number == 0 else f'claim {c.number}'}: {'HOLDS' if c.holds else 'FAILS'}: {c.text}")
        for x in c.checks:
            log(f"    {'ok ' if x['ok'] else 'NO '} {x['what']}: {x['value']} (bound {x['bound']})")
    met = "met" if claims[0].holds else "missed"
    log(f"claims: {sum(c.holds for c in claims[1:])} of {len(claims) - 1} hold, targets {met} "
        f"-> {out}/CLAIMS.md, claims.json")
    return claims
