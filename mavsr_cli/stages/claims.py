"""Stage `claims`: the paper's four claims (paper.md), checked against a finished study.

Reads what earlier stages wrote, decodes nothing:
    <bench>/bench.json                  rows of `mavsr bench` over the Matryoshka, audio-only and
                                        video-only experiments (clean and babble conditions)
    <exp>/decode_<pair>_beam<B>/<split>/wer.json          per-rate baselines, other strategies
    <rate1>/decode_<pair>_pool<pair>_beam<B>/<split>/wer.json  the rate-1 model pooled at inference
writes <out>/CLAIMS.md and <out>/claims.json: each claim with its verdict (holds / fails) and the
numbers behind it. The bounds are options, so a small study (CI) checks the same claims looser.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import MavsrError
from ..fsutil import atomic_write_json, atomic_write_text
from ..rates import Rates
from ..recipe import Recipe


@dataclass(frozen=True)
class Bounds:
    margin: float = 1.5  # claim 1: Matryoshka WER at most this many points above the per-rate baseline
    target_best: float = 10.0  # clean WER bound at the least compressed pair, e.g. (4,2)
    target_worst: float = 20.0  # clean WER bound at the most compressed pair, e.g. (16,5)
    gentle: float = 10.0  # claim 2: WER rise from least to most compressed pair at most this
    collapse: float = 10.0  # claim 2: pooled rate-1 model at least this many points worse at the most compressed pair
    video_max: float = 80.0  # claim 3: video-only WER below this
    noisy_snrs: tuple[float, ...] = (0.0, -5.0)  # claim 3: AV must beat audio-only at these SNRs
    av_slack: float = 0.0  # claim 3: ... by more than -av_slack points (0: AV strictly lower)
    linear_tol: float = 0.1  # claim 4: media tokens within this fraction of the rate-proportional count


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


def check(recipe: Recipe, bench: dict, matryoshka: list[Path], baselines: list[Path], rate1: Path | None,
          audio_only: str | None, video_only: str | None, bounds: Bounds, split: str = "test") -> list[Claim]:
    rows = bench["rows"]
    beam = int(bench["environment"]["beam"])
    main = matryoshka[0].name
    clean = {r["rates"]: r for r in rows if r["exp"] == main and r["snr"] is None}
    if not clean:
        raise MavsrError(f"claims: the bench has no clean rows of {main}")
    pairs = sorted((Rates.parse(t) for t in clean), key=lambda r: -r.tokens_per_second())
    best, worst = pairs[0], pairs[-1]

    c0 = Claim(0, "The model is accurate enough for the comparisons to mean something (the study's targets).")
    c0.check(f"{main} clean WER at {best.pair}", clean[best.tag]["wer"] < bounds.target_best,
             f"{clean[best.tag]['wer']:.2f}", f"< {bounds.target_best:g}")
    c0.check(f"{main} clean WER at {worst.pair}", clean[worst.tag]["wer"] < bounds.target_worst,
             f"{clean[worst.tag]['wer']:.2f}", f"< {bounds.target_worst:g}")

    c1 = Claim(1, "One Matryoshka checkpoint decodes at every trained configuration, each within a small "
                  "margin of (or better than) a model trained for that configuration alone.")
    base = {}
    for b in baselines:
        trained = [line.strip() for line in (b / "rates.txt").read_text().split()] if (b / "rates.txt").is_file() else []
        for t in trained:
            base[t] = (b.name, _wer(b, f"decode_{t}_beam{beam}", split))
    if not base:
        c1.check("per-rate baselines given", False, "none", "one per configuration")
    for m in matryoshka:
        for p in pairs:
            if p.tag not in base:
                c1.check(f"{m.name} {p.pair}: a baseline trained at {p.pair}", False, "missing", "present")
                continue
            w = clean[p.tag]["wer"] if m.name == main else _wer(m, f"decode_{p.tag}_beam{beam}", split)
            bw = base[p.tag][1]
            c1.check(f"{m.name} {p.pair} vs {base[p.tag][0]}", w - bw <= bounds.margin,
                     f"{w:.2f} vs {bw:.2f} ({w - bw:+.2f})", f"<= +{bounds.margin:g}")

    c2 = Claim(2, "WER rises gently with compression; pooling a model trained at rate 1 collapses.")
    rise = clean[worst.tag]["wer"] - clean[best.tag]["wer"]
    c2.check(f"{main} WER rise {best.pair} -> {worst.pair}", rise <= bounds.gentle, f"{rise:+.2f}", f"<= +{bounds.gentle:g}")
    if rate1 is None:
        c2.check("rate-1 model given", False, "none", "a model trained at (1,1)")
    else:
        r1 = (rate1 / "rates.txt").read_text().split()[0] if (rate1 / "rates.txt").is_file() else "a1v1"
        own = f"decode_{r1}_beam{beam}"
        if (rate1 / own / split / "wer.json").is_file():  # context: the rate-1 model at the rate it was trained for
            c2.check(f"{rate1.name} at its own {Rates.parse(r1).pair}", True, f"{_wer(rate1, own, split):.2f}", "reported")
        for p in (best, worst):
            pw = _wer(rate1, f"decode_{r1}_pool{p.tag}_beam{beam}", split)
            gap = pw - clean[p.tag]["wer"]
            bound = bounds.collapse if p == worst else None
            c2.check(f"{rate1.name} pooled at {p.pair} vs {main}", True if bound is None else gap >= bound,
                     f"{pw:.2f} vs {clean[p.tag]['wer']:.2f} ({gap:+.2f})",
                     "reported" if bound is None else f">= +{bound:g}")

    c3 = Claim(3, "Audio+video beats audio alone under heavy babble noise; video alone is far better than chance.")
    if audio_only is None:
        c3.check("audio-only model given", False, "none", "present")
    else:
        for snr in bounds.noisy_snrs:
            for p in pairs:
                av = next((r for r in rows if r["exp"] == main and r["rates"] == p.tag and r["snr"] == snr), None)
                a = next((r for r in rows if r["exp"] == audio_only and r["audio_rate"] == p.audio
                          and r["snr"] == snr), None)
                if av is None or a is None:
                    c3.check(f"{p.pair} at {snr:g} dB", False, "not in the bench", "AV and audio-only rows")
                    continue
                c3.check(f"{main} {p.pair} vs {audio_only} (a{p.audio}) at {snr:g} dB",
                         av["wer"] < a["wer"] + bounds.av_slack, f"{av['wer']:.2f} vs {a['wer']:.2f}",
                         "AV lower" if not bounds.av_slack else f"AV < audio-only + {bounds.av_slack:g}")
    if video_only is None:
        c3.check("video-only model given", False, "none", "present")
    else:
        v = [r for r in rows if r["exp"] == video_only and r["snr"] is None]
        if not v:
            c3.check("video-only rows", False, "not in the bench", "present")
        for r in v:
            c3.check(f"{video_only} v{r['video_rate']} clean WER", r["wer"] < bounds.video_max,
                     f"{r['wer']:.2f}", f"< {bounds.video_max:g}")

    c4 = Claim(4, "LLM input tokens and decode time fall with the rates, close to linearly.")
    # the LLM input = prompt tokens (a constant per utterance) + media tokens (proportional to 1/rate)
    prompt = clean[best.tag]["tokens_per_s"] - best.tokens_per_second()
    for p in pairs:
        media = clean[p.tag]["tokens_per_s"] - prompt
        ideal = p.tokens_per_second()
        c4.check(f"media tokens/s at {p.pair}", abs(media / ideal - 1) <= bounds.linear_tol,
                 f"{media:.1f} vs {ideal:.1f} ideal", f"within {bounds.linear_tol:.0%}")
    tb, tw = clean[best.tag], clean[worst.tag]
    ratio_tok = tw["tokens_per_s"] / tb["tokens_per_s"]
    ratio_time = tw["latency_s"] / max(1e-12, tb["latency_s"])
    c4.check(f"decode time {worst.pair} / {best.pair}", ratio_time < 1.0,
             f"{ratio_time:.2f} (tokens {ratio_tok:.2f})", "< 1 (falls); the gap to the token ratio is "
             "the cost that does not scale with the input: generation, the prompt")
    return [c0, c1, c2, c3, c4]


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
    log(f"claims: {sum(c.holds for c in claims[1:])} of {len(claims) - 1} hold, targets {'met' if claims[0].holds else 'missed'} -> {out}/CLAIMS.md, claims.json")
    return claims
