"""mavsr before and after, on the shapes of the comparison with the authors' code (issue 21).

Tiny random models of the compared shapes: Whisper d128 x 2 layers (faithful: padded to 30 s), a
Llama-style LM 256 x 2 layers with a 2053-word vocabulary, audio-only Matryoshka at rates {4, 16},
projectors 2048 wide, LoRA r64 on q/v, 2 threads. Rows:

  train_cache     one training step (both rates, MS, batch 4) from cached features
  train_faithful  the same step with Whisper run on the batch's audio first (faithful, 30 s)
  beam15_b8       beam 15 over 8 utterances from cached features
  beam15_b1_fly   beam 15 on one utterance, Whisper on the fly (what `transcribe` does)
  greedy_b1_fly   greedy on one utterance, Whisper on the fly

The decode rows decode a second copy of the model, built alike and never trained, so every round
decodes the same model whatever ran before it (reports up to 2026-12-06 decoded the
model the training rows had stepped 8 times: the same operations, other numbers).

The driver runs a worker process per checkout (`--tree NAME=DIR`, e.g. the working tree and a `git
worktree` of an older commit) in interleaved rounds: by default a fresh worker per tree and round,
which times every row (a warm-up call, then `--reps` timed calls); with `--keep-workers` one worker
per tree for the whole run, and a round times each row in every tree back to back, so the two sides
of a ratio are seconds apart and a minute-long slow spell of the machine falls on both (a long-lived
process also reuses its heap: fewer fresh pages for a tree that allocates a lot). A kept worker
waits `--pause` seconds before timing a row: right after the other tree's process has timed its
call, the batched beam ran 1.2-1.3x slower than a second later (2 cores). It reports
medians and least rounds per tree, the ratios to the first tree, the median of the per-round
ratios with the range that holds it at 95% confidence (from 6 rounds; with 9, the second least and
second greatest ratio), minor page faults per call, and whether each tree's hypotheses equal the first's (a kept
worker reports them once, at the end).

    python benchmarks/vs_authors.py --tree before=/tmp/base --tree after=. [--rounds 5] [--keep-workers] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
TRAIN_ROWS = ("train_cache", "train_faithful")
ROWS = [*TRAIN_ROWS, "beam15_b8", "beam15_b1_fly", "greedy_b1_fly"]
THREADS = 2
MAX_NEW = 24


# ---- the worker: runs inside one checkout ----------------------------------------------------
def _utterances(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    wavs = [rng.normal(0, 0.05, int(16000 * rng.uniform(2.0, 6.0))).astype(np.float32) for _ in range(n)]
    return wavs, [rng.integers(10, 2000, int(rng.integers(8, 16))).tolist() for _ in range(n)]


def _encode(enc, wavs):
    """Features of several utterances: one batched call where the checkout has one."""
    import torch

    from mavsr_cli.features import pad_batch

    with torch.no_grad():
        if hasattr(enc, "encode_batch"):
            return enc.encode_batch(wavs)
        return pad_batch([enc(w).float() for w in wavs])


PROFILE: dict[str, list] = {}  # row -> [(op, share of the row's CPU time)], filled with --profile


def _shares(fn, top: int = 6) -> list:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return [(e.key, round(e.self_cpu_time_total / total, 3)) for e in ops[:top]]


FAULTS: dict[str, float] = {}  # row -> minor page faults per timed call (fresh memory mapped in by the kernel)


def _timed(fn, reps: int, row: str = "") -> float:
    import resource

    if os.environ.get("VS_PROFILE") and row:
        fn()
        PROFILE[row] = _shares(fn)
    fn()  # warm-up
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    FAULTS[row] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / reps
    return statistics.median(times)


def _generate(model, feats, rates, beam: int):
    try:
        from mavsr_cli.decoding import generate
    except ImportError:  # before the house refactor: a method of the model
        return model.generate(feats, rates, MAX_NEW, beam)[0]
    return generate(model, feats, rates, MAX_NEW, beam)[0]


def _rows(models: Path) -> tuple[dict, dict]:
    """Load the models once: {row: (set-up, one call of the row)} and the hypotheses the decode rows fill."""
    import torch

    torch.set_num_threads(THREADS)
    import mavsr_cli  # noqa: F401  (torchaudio guard)
    from mavsr_cli import config as C
    from mavsr_cli.model.audio_encoder import WhisperAudioEncoder
    from mavsr_cli.model.build import build_model
    from mavsr_cli.rates import Rates
    from mavsr_cli.train_loop import MatryoshkaLoss

    cfg = C.from_dict({"model": {"modality": "a", "audio_rates": [4, 16], "projector_layernorm": True,
                                 "lora": {"dropout": 0.0}}})  # the authors' settings (mavsr_cli/authors.py)
    enc = WhisperAudioEncoder.load(str(models / "whisper"), "faithful")
    model = build_model(cfg, enc.dim, None, llm_path=str(models / "llm"))
    # the decode rows' model, built alike and never trained: every round decodes the same model, in
    # a fresh worker or a kept one (the training rows step `model`)
    decoder = build_model(cfg, enc.dim, None, llm_path=str(models / "llm")).eval()
    grid = cfg.model.rate_grid()
    loss = MatryoshkaLoss(model, grid, False)
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the optimizer `mavsr train` makes
        from mavsr_cli.train_loop import optimizer
        opt = optimizer(params, cfg.train)
    except ImportError:
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                weight_decay=cfg.train.weight_decay)
    wavs, targets = _utterances(8, 0)
    cached = {"audio": _encode(enc, wavs)}
    four = {"audio": (cached["audio"][0][:4], cached["audio"][1][:4])}

    def step(feats):
        model.train()  # inside the timed call, as in every report of this script
        opt.zero_grad(set_to_none=True)
        loss(feats, targets[:4]).sum().backward()
        opt.step()

    r = Rates(16, None)
    hyps: dict[str, list[str]] = {}

    def dec(name, feats_fn, beam):
        def run():
            hyps[name] = _generate(decoder, feats_fn(), r, beam)
        return decoder.eval, run

    rows = {"train_cache": (model.train, lambda: step(four)),
            "train_faithful": (model.train, lambda: step({"audio": _encode(enc, wavs[:4])})),
            "beam15_b8": dec("beam15_b8", lambda: cached, 15),
            "beam15_b1_fly": dec("beam15_b1_fly", lambda: {"audio": _encode(enc, wavs[:1])}, 15),
            "greedy_b1_fly": dec("greedy_b1_fly", lambda: {"audio": _encode(enc, wavs[:1])}, 1)}
    return rows, hyps


def _time_row(rows: dict, row: str, reps: int) -> float:
    set_up, call = rows[row]
    set_up()
    return _timed(call, reps, row)


def worker(models: Path, reps: int) -> dict:
    """Every row once, in order (the profiled run)."""
    import mavsr_cli

    rows, hyps = _rows(models)
    out = {row: _time_row(rows, row, reps) for row in ROWS}
    return {"seconds": out, "hyps": hyps, "mavsr": mavsr_cli.__file__, "profile": PROFILE, "faults": FAULTS}


def serve(models: Path, reps: int, pause: float) -> None:
    """A worker kept for the whole run: it reads a row's name per line, waits `pause` seconds, and
    answers the row's time and page faults as one JSON line; an empty line ends it, answered with the
    hypotheses and the code it ran."""
    import mavsr_cli

    answer, sys.stdout = sys.stdout, sys.stderr  # anything else the checkout prints goes to the log

    def say(msg: dict) -> None:
        print(json.dumps(msg), file=answer, flush=True)

    rows, hyps = _rows(models)
    say({"ready": True, "mavsr": mavsr_cli.__file__})
    for line in sys.stdin:
        if not line.strip():
            break
        row = line.strip()
        time.sleep(pause)  # the other tree's process, just done, goes quiet (see the module's docstring)
        t = _time_row(rows, row, reps)
        say({"seconds": t, "faults": FAULTS[row]})
    say({"hyps": hyps, "mavsr": mavsr_cli.__file__})


# ---- the driver ------------------------------------------------------------------------------
def build_models(d: Path) -> None:
    """The tiny models, saved once in the hub's formats (every checkout loads the same files)."""
    sys.path.insert(0, str(HERE.parents[1]))
    import mavsr_cli  # noqa: F401
    from mavsr_cli.model import llm as llm_mod
    from mavsr_cli.model.audio_encoder import WhisperAudioEncoder

    WhisperAudioEncoder.tiny(d / "whisper", d_model=128, layers=2, heads=4)
    words = [f"w{i:04d}" for i in range(2053 - 9 - 7)] + "transcribe speech and video to text .".split()
    llm_mod.tiny(d / "llm", words, hidden=256, layers=2, heads=4)
    # a random LM ends its hypotheses at random: with the EOS row at zero its logit sits mid-vocabulary,
    # never among a beam's candidates, so every decode row does the same work (MAX_NEW tokens)
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(d / "llm").eos_token_id
    path = d / "llm/model.safetensors"
    state = load_file(str(path))
    for k in state:
        if k.endswith(("embed_tokens.weight", "lm_head.weight")):
            state[k][eos] = 0.0
    save_file(state, str(path), metadata={"format": "pt"})


def _env(tree: Path, profile: bool = False) -> dict:
    return dict(os.environ, PYTHONPATH=str(tree.resolve()), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(THREADS),
                TOKENIZERS_PARALLELISM="false", VS_PROFILE="1" if profile else "", VS_ROWS=",".join(ROWS))


def _own_code(tree: Path, res: dict) -> dict:
    if not Path(res["mavsr"]).is_relative_to(tree.resolve()):  # the checkout's code, not the installed one
        raise SystemExit(f"worker for {tree} imported {res['mavsr']}")
    return res


def run_worker(tree: Path, models: Path, reps: int, profile: bool = False) -> dict:
    r = subprocess.run([sys.executable, "-W", "ignore", str(HERE), "--worker", str(models), "--reps", str(reps)],
                       capture_output=True, text=True, env=_env(tree, profile), cwd=str(tree))
    if r.returncode != 0:
        raise SystemExit(f"worker in {tree} failed:\n{r.stderr[-3000:]}")
    return _own_code(tree, json.loads(r.stdout.strip().splitlines()[-1]))


class Worker:
    """A checkout's worker process, alive for the whole run (`serve`), so that the trees can time the
    same row back to back: seconds apart, not a whole worker's run apart."""

    def __init__(self, tree: Path, models: Path, reps: int, pause: float, log) -> None:
        self.tree = tree
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", str(HERE), "--serve", str(models), "--reps",
                                      str(reps), "--pause", str(pause)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True, env=_env(tree), cwd=str(tree))
        ready = self._answer()
        if not ready.get("ready"):
            raise SystemExit(f"worker in {tree} answered {ready} before it was ready")
        _own_code(tree, ready)

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker in {self.tree} failed (its stderr is above)")
        return json.loads(line)

    def time(self, row: str) -> dict:
        self.proc.stdin.write(row + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> dict:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        res = self._answer()
        self.proc.wait()
        return _own_code(self.tree, res)


def _times(seconds: dict[str, float]) -> str:
    """A round's times for the log: 'row N ms, ...'."""
    return ", ".join(f"{r} {seconds[r] * 1000:.0f} ms" for r in ROWS)


def fresh_rounds(trees: dict[str, Path], models: Path, rounds: int, reps: int) -> dict[str, list[dict]]:
    """Each round starts a fresh worker per tree, which times every row (the first tree alternating);
    -> per tree, per round {seconds: {row: s}, faults: {row: n}, hyps}."""
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for k in range(rounds):
        for t in list(trees) if k % 2 == 0 else list(reversed(trees)):
            results[t].append(run_worker(trees[t], models, reps))
            print(f"round {k + 1} {t}: " + _times(results[t][-1]["seconds"]), file=sys.stderr)
    return results


def kept_rounds(trees: dict[str, Path], models: Path, rounds: int, reps: int, pause: float) -> dict[str, list[dict]]:
    """Each round times every row in every tree, the trees back to back per row, the first tree
    alternating; -> per tree, per round {seconds: {row: s}, faults: {row: n}, hyps}."""
    workers = {t: Worker(tree, models, reps, pause, sys.stderr) for t, tree in trees.items()}
    results: dict[str, list[dict]] = {t: [{"seconds": {}, "faults": {}} for _ in range(rounds)] for t in trees}
    for k in range(rounds):
        for j, row in enumerate(ROWS):
            for t in list(trees) if (k + j) % 2 == 0 else list(reversed(trees)):
                res = workers[t].time(row)
                results[t][k]["seconds"][row], results[t][k]["faults"][row] = res["seconds"], res["faults"]
        print(f"round {k + 1}: " + "; ".join(f"{t} " + _times(results[t][k]["seconds"]) for t in trees),
              file=sys.stderr)
    for t, w in workers.items():
        hyps = w.close()["hyps"]
        for res in results[t]:
            res["hyps"] = hyps
    return results


def _table(trees: dict[str, Path], times: dict[str, dict[str, float]]) -> list[str]:
    first = next(iter(trees))
    lines = ["| row | " + " | ".join(trees) + " | " + " | ".join(f"{t} vs {first}" for t in list(trees)[1:]) + " |",
             "|---|" + "---|" * (2 * len(trees) - 1)]
    for row in ROWS:
        cells = [f"{times[t][row] * 1000:.1f}" for t in trees]
        ratios = [f"{times[first][row] / times[t][row]:.2f}x" for t in list(trees)[1:]]
        lines.append(f"| {row} | " + " | ".join(cells + ratios) + " |")
    return lines


def median_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float, float] | None:
    """(low, high, coverage): the narrowest pair of order statistics x_(j) <= x_(n+1-j) that holds the
    median of the distribution the xs come from with probability `coverage` >= `confidence`, whatever
    that distribution (each x lies below the median with probability 1/2, so the count below is
    Binomial(n, 1/2)); None when n is too small (n < 6 at 95%). With 9 rounds: the second least and
    second greatest, 96%."""
    n, xs = len(xs), sorted(xs)
    for j in range(n // 2, 0, -1):
        coverage = 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n
        if coverage >= confidence:
            return xs[j - 1], xs[n - j], coverage
    return None


def _paired(trees: dict[str, Path], results: dict[str, list[dict]]) -> list[str]:
    """Per other tree: the median of the per-round ratios, and the range that holds the median of
    such ratios with >= 95% confidence (median_interval), so a target can be read as met or not."""
    first, others = next(iter(trees)), list(trees)[1:]
    lines = ["| row | " + " | ".join(f"{t} vs {first} | 95% range of the median" for t in others) + " |",
             "|---|" + "---|---|" * len(others)]
    for row in ROWS:
        cells = []
        for t in others:
            ratios = [a["seconds"][row] / b["seconds"][row] for a, b in zip(results[first], results[t], strict=True)]
            ci = median_interval(ratios)
            cells += [f"{statistics.median(ratios):.2f}x",
                      f"{ci[0]:.2f}-{ci[1]:.2f}x ({ci[2]:.0%})" if ci else "(too few rounds: 6 or more)"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _faults(trees: dict[str, Path], results: dict[str, list[dict]]) -> list[str]:
    lines = ["| row | " + " | ".join(trees) + " |", "|---|" + "---|" * len(trees)]
    for row in ROWS:
        cells = [f"{statistics.median(x['faults'][row] for x in results[t]):.0f}" for t in trees]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def report(trees: dict[str, Path], results: dict[str, list[dict]], rounds: int, kept: bool = False) -> list[str]:
    """The medians over the rounds; the least round, the figure least disturbed by other work on the
    machine (on a shared 2-core machine one round of a row can take 3x another); the median of the
    per-round ratios; each tree's page faults per call; whether the hypotheses agree."""
    first = next(iter(trees))
    over = {how: {t: {row: how(x["seconds"][row] for x in results[t]) for row in ROWS} for t in trees}
            for how in (statistics.median, min)}
    lines = [f"# mavsr on the shapes of the comparison with the authors' code ({time.strftime('%Y-%m-%d')})", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {THREADS} threads, "
             f"{rounds} interleaved rounds ("
             + ("one long-lived worker per tree, each row timed in the trees back to back" if kept else
                "a fresh worker per tree and round") + f"); times in ms; ratio = {first} time / tree time "
             "(higher is faster)", "",
             "Medians over the rounds:", ""] + _table(trees, over[statistics.median])
    lines += ["", "The least round of each tree and row:", ""] + _table(trees, over[min])
    lines += ["", "The median of the per-round ratios (a round runs the trees back to back, so a slow spell of "
              "the machine slows both sides of its ratio), and the range of per-round ratios that holds their "
              "median with at least 95% confidence whatever their distribution:", ""] + _paired(trees, results)
    lines += ["", "Minor page faults per timed call, median over the rounds (memory the kernel maps in afresh, "
              "where freed tensors went back to the system):", ""] + _faults(trees, results) + [""]
    for t in list(trees)[1:] if set(ROWS) - set(TRAIN_ROWS) else []:
        same = all(x["hyps"] == results[first][0]["hyps"] for x in results[t])
        lines.append(f"- hypotheses of {t} {'equal' if same else 'DIFFER FROM'} {first}'s on every decode row")
    return lines


def profiles(trees: dict[str, Path], models: Path, reps: int) -> list[str]:
    """Where each tree's time goes: the top operators' shares of each row's CPU time (one profiled run)."""
    lines = ["", "Where the time goes (share of each row's CPU time, top operators, one profiled run):", ""]
    for t, tree in trees.items():
        prof = run_worker(tree, models, 1, profile=True)["profile"]
        lines += [f"{t}:", ""] + [f"- {row}: " + ", ".join(f"{op} {share:.0%}" for op, share in prof[row])
                                  for row in ROWS if row in prof] + [""]
    return lines


def _seconds(text: str) -> float:
    if not 0 <= float(text) < 3600:
        raise argparse.ArgumentTypeError("a pause is 0 s or more, under an hour")
    return float(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR of a checkout (first: the reference)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per row in each round")
    ap.add_argument("--keep-workers", action="store_true",
                    help="one long-lived worker per tree, timing each row in the trees back to back (default: "
                         "a fresh worker per tree and round, which times every row)")
    ap.add_argument("--pause", type=_seconds, default=1.0,
                    help="with --keep-workers, seconds a worker waits before timing a row, so that the other "
                         "tree's process has gone quiet (default: 1)")
    ap.add_argument("--rows", default=os.environ.get("VS_ROWS") or ",".join(ROWS),
                    help=f"the rows to time, comma-separated (default: all of {','.join(ROWS)})")
    ap.add_argument("--profile", action="store_true", help="also report each tree's operator shares")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    rows = [r.strip() for r in a.rows.split(",")]
    if not all(rows) or set(rows) - set(ROWS):
        raise SystemExit(f"--rows: choose among {','.join(ROWS)}")
    ROWS[:] = [r for r in ROWS if r in rows]
    if a.worker:
        print(json.dumps(worker(a.worker, a.reps)))
        return
    if a.serve:
        serve(a.serve, a.reps, a.pause)
        return
    trees = dict(t.split("=", 1) for t in a.tree) or {"this": str(HERE.parents[1])}
    trees = {k: Path(v) for k, v in trees.items()}
    with tempfile.TemporaryDirectory() as tmp:
        build_models(Path(tmp))
        results = (kept_rounds(trees, Path(tmp), a.rounds, a.reps, a.pause) if a.keep_workers else
                   fresh_rounds(trees, Path(tmp), a.rounds, a.reps))
        lines = report(trees, results, a.rounds, a.keep_workers)
        if a.profile:
            lines += profiles(trees, Path(tmp), a.reps)
    from _common import emit

    emit(lines, a.out)


if __name__ == "__main__":
    main()
