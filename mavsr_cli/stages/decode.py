"""Stage `decode`: a trained experiment + cached features -> hypotheses at one rate pair (or all).

    reads  exp/<tag>/{config.yaml, meta.json, ckpt/*/}, dump/<encoders-tag>/<split>[-<condition>]/,
           data/<split>/manifest.jsonl
    writes exp/<tag>/decode_<rates>_beam<B>[_<condition>]/<split>/{hyp.jsonl, config.yaml, cmd.txt, .done}
Batched beam search with a KV cache through transformers' `generate`, never sampling
(do_sample=False): a rerun, and any batch size, give the same hypotheses. Rates outside the
checkpoint's trained grid are refused before any work. A noisy condition (`--snr`, `--noise`)
encodes the split once more with noise seeded per utterance into its own cache. `--shard i/N`
decodes every N-th batch into a part file; a run without it merges the parts (computing any
missing ones).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint, faults
from .. import config as config_mod
from ..errors import MavsrError
from ..features import FeatureStore
from ..fsutil import atomic_write_text, clean_stale, staged_dir
from ..model.build import build_model
from ..progress import bar
from ..rates import Rates, require
from ..recipe import Recipe, is_done, resolve_model, write_provenance
from ..train_loop import batch_features
from . import extract_features as ef


@dataclass(frozen=True)
class DecodeOptions:
    beam: int = 15  # beam width (1 = greedy)
    batch_size: int | None = None  # utterances per generate call (default: config)
    max_new_tokens: int | None = None  # None: max(32, 8 per second of the batch's longest utterance)
    snr: float | None = None  # noisy condition: SNR in dB (None = clean)
    noise: str = "babble"  # babble | white | a noise file
    shard: tuple[int, int] | None = None  # (i, N): decode only every N-th batch into a part file
    pool: Rates | None = None  # inference-only pooling: compress at these rates, keep the decoded pair's projectors


def decode_dir(exp: Path, rates: Rates, split: str, opts: DecodeOptions = DecodeOptions()) -> Path:
    cond = "" if opts.snr is None else "_" + ef.condition_name(opts.noise, opts.snr)
    pool = "" if opts.pool is None else f"_pool{opts.pool.tag}"
    return exp / f"decode_{rates.tag}{pool}_beam{opts.beam}{cond}" / split


def load_experiment(exp: Path):
    if not (exp / "config.yaml").is_file():
        raise MavsrError(f"{exp} is not an experiment dir (no config.yaml)")
    cfg = config_mod.load(exp / "config.yaml")
    ckpt = checkpoint.for_decoding(exp)
    meta = checkpoint.read_meta(ckpt)
    return cfg, ckpt, meta


def auto_max_new_tokens(durations: list[float]) -> int:
    """Room for about 8 tokens per second of the longest utterance, never fewer than 32 (paper.md)."""
    return max(32, math.ceil(8 * max(durations)))


def pick_by_budget(trained: list[Rates], budget: float, scores: dict[str, float] | None = None) -> Rates:
    """The most accurate trained configuration whose LLM input rate (tokens per second of speech)
    fits the budget: lowest known WER if scores are given, else the least compressed one."""
    fits = [r for r in trained if r.tokens_per_second() <= budget + 1e-9]
    if not fits:
        cheapest = min(trained, key=lambda r: r.tokens_per_second())
        raise MavsrError(f"no trained configuration fits {budget:g} tokens/s; the cheapest, {cheapest.tag}, "
                         f"needs {cheapest.tokens_per_second():.2f}")
    scored = [r for r in fits if scores and r.tag in scores]
    if scored:
        return min(scored, key=lambda r: (scores[r.tag], -r.tokens_per_second()))
    return max(fits, key=lambda r: (r.tokens_per_second(), -(r.audio or 0), -(r.video or 0)))


def known_scores(exp: Path, split: str) -> dict[str, float]:
    """WER per rate tag from scored clean decode dirs of this split (the lowest over beams)."""
    from .score import parse_decode_name

    out: dict[str, float] = {}
    for w in exp.glob(f"decode_*/{split}/wer.json"):
        rates, _, condition, pool = parse_decode_name(w.parent.parent.name)
        if condition or pool:  # noisy conditions and inference-only pooling do not rank configurations
            continue
        out[rates.tag] = min(out.get(rates.tag, 1e9), json.loads(w.read_text())["wer"])
    return out


class Decoder:
    """One loaded experiment, decoding any of its trained configurations (the model loads once)."""

    def __init__(self, recipe: Recipe, exp: Path, split: str | None, log=print) -> None:
        """`split` None: the experiment only (for `transcribe`), no manifest needed."""
        self.recipe, self.split, self.log = recipe, split, log
        self.exp = Path(exp) if Path(exp).is_absolute() else recipe.root / exp
        self.cfg, self.ckpt, self.meta = load_experiment(self.exp)
        self.trained = [Rates.parse(t) for t in self.meta["rates"]]
        self.utts = {u.id: u for u in recipe.utterances(split)} if split else {}
        self._model = None
        self._stores: dict[str, FeatureStore] = {}

    @property
    def model(self):
        if self._model is None:
            cfg, meta = self.cfg, self.meta
            m = build_model(cfg, meta["dims"].get("audio"), meta["dims"].get("video"),
                            llm_path=resolve_model(self.recipe, cfg.model.llm), rates=self.trained)
            m.load_trainable(checkpoint.load_state(self.ckpt))
            self._model = m.eval()
        return self._model

    def store(self, opts: DecodeOptions) -> FeatureStore:
        cond = None if opts.snr is None else (opts.noise, float(opts.snr))
        key = ef.cache_split(self.cfg, self.split, cond)
        if key not in self._stores:
            if cond is not None:  # encode the noisy condition once (reused by later runs)
                if self.cfg.model.modality == "v":
                    raise MavsrError("--snr adds noise to the audio; this is a video-only model")
                ef.run(self.recipe, self.cfg, [self.split], log=self.log, condition=cond)
            self._stores[key] = FeatureStore(self.recipe.dump(self.meta["encoders_tag"], key))
        return self._stores[key]

    def run(self, rates: Rates, opts: DecodeOptions, force: bool = False) -> Path:
        require(rates, self.trained)
        out = decode_dir(self.exp, rates, self.split, opts)
        rel = out.relative_to(self.recipe.root) if out.is_relative_to(self.recipe.root) else out
        if is_done(out) and not force:
            self.log(f"decode: {rel} is done (use --force to redo)")
            return out
        store = self.store(opts)
        ids = [i for i in store.ids() if i in self.utts]
        if not ids:
            raise MavsrError(f"no utterances of split {self.split!r} in the feature cache")
        bs = opts.batch_size or self.cfg.decode.batch_size
        batches = [ids[b:b + bs] for b in range(0, len(ids), bs)]
        parts_dir = out.parent / f".{self.split}.parts"
        clean_stale(parts_dir)
        n_parts = opts.shard[1] if opts.shard else _existing_parts(parts_dir)
        mine = [opts.shard[0]] if opts.shard else range(n_parts)
        for p in mine:
            part = parts_dir / f"part-{p:05d}-of-{n_parts:05d}.jsonl"
            if part.is_file() and not force:
                continue
            parts_dir.mkdir(parents=True, exist_ok=True)
            journal = part.with_name(part.name + ".journal")
            if force:
                journal.unlink(missing_ok=True)
            lines = self._decode_batches(rates, opts, store, batches[p::n_parts], f"{rates.tag} {self.split}"
                                         + (f" part {p}/{n_parts}" if n_parts > 1 else ""), journal)
            atomic_write_text(part, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            journal.unlink(missing_ok=True)
        if opts.shard:
            self.log(f"decode: part {opts.shard[0]}/{opts.shard[1]} of {rel} done; run without --shard to merge")
            return out
        lines = []
        for p in range(n_parts):
            part = parts_dir / f"part-{p:05d}-of-{n_parts:05d}.jsonl"
            lines += [json.loads(x) for x in part.read_text().splitlines()]
        order = {i: k for k, i in enumerate(ids)}
        lines.sort(key=lambda x: order[x["id"]])
        with staged_dir(out) as tmp:
            atomic_write_text(tmp / "hyp.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            o = {"checkpoint": self.ckpt.name, "rates": rates.tag,
                 "pool": opts.pool.tag if opts.pool else None, "split": self.split, "beam": opts.beam,
                 "batch_size": bs, "max_new_tokens": opts.max_new_tokens or "auto", "snr": opts.snr,
                 "noise": opts.noise if opts.snr is not None else None, "sampling": False}
            write_provenance(tmp, self.cfg.dump() + "decode_options:\n" + "".join(f"  {k}: {v}\n" for k, v in o.items()))
        import shutil

        shutil.rmtree(parts_dir, ignore_errors=True)
        self.log(f"decode: {len(lines)} utterances at {rates.tag} beam {opts.beam} -> {rel}")
        return out

    def _decode_batches(self, rates: Rates, opts: DecodeOptions, store: FeatureStore, batches: list[list[str]],
                        what: str, journal: Path) -> list[dict]:
        """Decode `batches`; each finished batch is appended to `journal` (one JSON line, synced),
        so an interrupted run resumes after the last whole batch and ends with the same output."""
        _ = self.model  # load it before the progress bar starts
        done = _read_journal(journal, batches)
        out = [x for k in range(len(done)) for x in done[k]]
        with torch.inference_mode(), bar() as pbar, open(journal, "a", encoding="utf-8") as jf:
            task = pbar.add_task(f"decode {what}", total=sum(len(b) for b in batches),
                                 completed=sum(len(b) for b in batches[:len(done)]), info="")
            if done:
                self.log(f"decode: resuming {what} after {len(done)} of {len(batches)} batches")
            for k, bid in enumerate(batches):
                if k < len(done):
                    continue
                mine = []
                mnt = opts.max_new_tokens or auto_max_new_tokens([self.utts[i].duration for i in bid])
                t0 = time.perf_counter()
                hyps, n_in = self._generate(store, bid, rates, mnt, opts.beam, opts.pool)
                dt = (time.perf_counter() - t0) / len(bid)
                for i, h, n in zip(bid, hyps, n_in, strict=True):
                    u = self.utts[i]
                    mine.append({"id": i, "ref": u.text, "hyp": h, "tokens_in": n, "duration": u.duration,
                                 "time": round(dt, 5)})
                jf.write(json.dumps({"batch": k, "ids": bid, "lines": mine}, ensure_ascii=False) + "\n")
                jf.flush()
                os.fsync(jf.fileno())
                out += mine
                pbar.advance(task, len(bid))
        return out


    def _generate(self, store: FeatureStore, bid: list[str], rates: Rates, mnt: int, beam: int,
                  pool: Rates | None = None):
        """One batch; a batch that runs out of accelerator memory is decoded again in halves
        (down to single utterances, which then fail in one line)."""
        try:
            faults.maybe_oom(len(bid))
            return self.model.generate(batch_features(store, bid, self.cfg.model.modality), rates, mnt, beam=beam,
                                       pool=pool)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(bid) == 1:
                raise MavsrError(f"out of memory decoding {bid[0]} alone at {rates.tag} beam {beam}: "
                                 "lower --beam or decode on a larger device") from None
            half = len(bid) // 2
            self.log(f"decode: out of memory on a batch of {len(bid)}; retrying as {half} + {len(bid) - half}")
            a, na = self._generate(store, bid[:half], rates, mnt, beam, pool)
            b, nb = self._generate(store, bid[half:], rates, mnt, beam, pool)
            return a + b, na + nb


def _read_journal(journal: Path, batches: list[list[str]]) -> list[list[dict]]:
    """The leading batches a killed run finished, from its journal; a torn last line (the kill
    came mid-write) or a journal of other batches counts for nothing from there on."""
    done: list[list[dict]] = []
    if not journal.is_file():
        return done
    lines = journal.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        k = len(done)
        if rec.get("batch") != k or k >= len(batches) or rec.get("ids") != batches[k]:
            break
        done.append(rec["lines"])
    if len(done) < len(lines) or (lines and not lines[-1].endswith("\n")):  # keep only what is valid
        atomic_write_text(journal, "".join(lines[:len(done)]))
    return done


def _existing_parts(parts_dir: Path) -> int:
    """N of the part files a sharded run left (1 when there are none)."""
    ns = {int(p.stem.split("-of-")[1]) for p in parts_dir.glob("part-*-of-*.jsonl")} if parts_dir.is_dir() else set()
    if len(ns) > 1:
        raise MavsrError(f"{parts_dir} holds parts of different --shard N ({sorted(ns)}); remove it and decode again")
    return ns.pop() if ns else 1


def run(recipe: Recipe, exp: Path, split: str, audio_rate: int | None, video_rate: int | None,
        batch_size: int | None = None, max_new_tokens: int | None = None, force: bool = False, log=print,
        beam: int = 15, snr: float | None = None, noise: str = "babble", shard: tuple[int, int] | None = None,
        sweep: bool = False, budget: float | None = None, pool: str | None = None) -> list[Path]:
    """Decode at one rate pair, at every trained pair (`sweep`), or at the best pair within `budget`.

    `pool` (a rate tag, e.g. a16v5): inference-only pooling, the paper's baseline: features are
    compressed at these rates but go through the projectors (and adapters) of the decoded pair,
    typically a model trained at rate 1 decoded at rates it never saw."""
    if beam < 1:
        raise MavsrError("--beam must be at least 1")
    dec = Decoder(recipe, exp, split, log)
    pool_rates = None
    if pool is not None:
        pool_rates = Rates.parse(pool)
        if sweep or budget is not None:
            raise MavsrError("--pool-rates goes with one pair (--audio-rate/--video-rate), not --sweep or --budget")
        if dec.cfg.model.compression != "avg":
            raise MavsrError(f"--pool-rates needs average pooling; this model compresses by {dec.cfg.model.compression!r}, "
                             "which changes the projector's input width")
        if (pool_rates.audio is None) != (audio_rate is None) or (pool_rates.video is None) != (video_rate is None):
            raise MavsrError(f"--pool-rates {pool} must name the same modalities as the decoded pair")
    opts = DecodeOptions(beam, batch_size, max_new_tokens, snr, noise, shard, pool_rates)
    if sweep:
        if audio_rate is not None or video_rate is not None or budget is not None:
            raise MavsrError("--sweep decodes every trained configuration; drop --audio-rate/--video-rate/--budget")
        chosen = list(dec.trained)
    elif budget is not None:
        if audio_rate is not None or video_rate is not None:
            raise MavsrError("--budget picks the rates; drop --audio-rate/--video-rate")
        r = pick_by_budget(dec.trained, budget, known_scores(dec.exp, split))
        log(f"decode: budget {budget:g} tokens/s -> {r.tag} {r.pair} ({r.tokens_per_second():.2f} tokens/s)")
        chosen = [r]
    else:
        if audio_rate is None and video_rate is None:
            raise MavsrError(f"give --audio-rate and/or --video-rate (or --sweep, --budget); trained grid: "
                             f"{', '.join(dec.meta['rates'])}")
        chosen = [Rates(audio_rate, video_rate)]
    for r in chosen:
        require(r, dec.trained)
    return [dec.run(r, opts, force) for r in chosen]
