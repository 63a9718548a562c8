"""Decoding: the search algorithms, and a loaded experiment that decodes a split into a decode dir.

Kept apart from the model (model/avsr.py builds the LLM input; this module searches over the
LLM's outputs), as openai/whisper keeps decoding.py beside model.py. Deterministic throughout:
mavsr's greedy loop (token for token transformers' greedy `generate`) or its batched beam search,
never sampling, so a rerun and any batch size give the same hypotheses. A step's attention on
the CPU is model/attention.py's (it does not depend on the batch), and a beam's prompt is cached
and read once per utterance there (model/kv_cache.py).

`Decoder.run` reads  exp/<tag>/{config.yaml, meta.json, ckpt/*/}, dump/<encoders-tag>/<split>[-<condition>]/,
                           data/<split>/manifest.jsonl
              writes exp/<tag>/<DecodeTag.name>/<split>/{hyp.jsonl, config.yaml, cmd.txt, .done}
A finished batch is journalled, so an interrupted decode resumes after it; `shard` (i, N) decodes
every N-th batch into a part file, and a run without it merges the parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from . import checkpoint, devices, faults
from . import config as config_mod
from .config import DecodeConfig
from .errors import MavsrError
from .extraction import extract
from .features import FeatureStore, batch_features, cache_split
from .fsutil import atomic_write_text, clean_stale, staged_dir
from .model import kv_cache
from .model.build import build_model, train_bf16
from .model.llm import causal_lm
from .model.step import add_fresh, one_token_step
from .options import DEVICE
from .progress import bar
from .rates import DecodeTag, Rates, condition_name, most_accurate_first, require
from .recipe import (
    Recipe,
    checksum_or_none,
    decoding_checkpoint,
    done_text,
    finished,
    is_done,
    other_checkpoint,
    resolve_model,
    write_provenance,
)
from .sharding import Shard


# ---- rules ---------------------------------------------------------------------------------
def auto_max_new_tokens(durations: list[float]) -> int:
    """Room for about 8 tokens per second of the longest utterance, never fewer than the authors' 32
    (docs/method.md, Decoding and scoring)."""
    return max(32, math.ceil(8 * max(durations)))


def max_new_tokens(opts: DecodeConfig, durations: list[float]) -> int:
    return opts.max_new_tokens or auto_max_new_tokens(durations)


RANKING_SPLITS = ("val", "test")  # --budget ranks by the one of these that scores the most fitting pairs (val on a tie)


@dataclasses.dataclass(frozen=True)
class Budget:
    """`--budget`'s unit and count, the reports': LLM input tokens per second of speech. A pair's cost
    is what RESULTS.md and REPORT.md would count for the utterances decoded: each one's media tokens
    at the pair's rates (its streams' frames pooled as the model pools them, Rates.media_tokens) plus
    `fixed` (BOS, modality markers, prompt), over their seconds of speech."""

    limit: float
    fixed: int
    clips: tuple[tuple[float, int, int], ...]  # per utterance: (seconds, audio frames at 50 Hz, video frames at 25)

    def cost(self, r: Rates) -> float:
        tokens = sum(self.fixed + r.media_tokens(a, v) for _, a, v in self.clips)
        return tokens / max(sum(s for s, _, _ in self.clips), 1e-9)

    def describe(self) -> str:
        n, seconds = len(self.clips), sum(s for s, _, _ in self.clips)
        return (f"{self.limit:g} LLM input tokens/s (media + {self.fixed} prompt tokens per utterance, "
                f"{n} utterance{'s' if n != 1 else ''} of {seconds:.2f} s)")


def pick_by_budget(trained: list[Rates], budget: Budget,
                   rankings: list[tuple[dict[str, float], str]] = ()) -> tuple[Rates, str]:
    """(the pair, why): among the trained pairs whose cost fits the budget, the one of lowest known
    WER on the split of `rankings` ((scores, split) pairs, ranking_scores) that scores the most of
    them (the first, validation before test, on a tie: one pair scored on val must not hide the test
    scores of the others), else the least compressed one."""
    fits = [r for r in trained if budget.cost(r) <= budget.limit + 1e-9]
    if not fits:
        cheapest = min(trained, key=budget.cost)
        raise MavsrError(f"no trained configuration fits {budget.describe()}; the cheapest, {cheapest.tag}, "
                         f"needs {budget.cost(cheapest):.2f}")
    ranked = [(scores, split, [r for r in fits if r.tag in scores]) for scores, split in rankings]
    scores, split, scored = max(ranked, key=lambda x: len(x[2]), default=({}, "", []))  # max keeps the first
    if scored:
        best = min(scored, key=lambda r: (scores[r.tag], -r.tokens_per_second()))
        return best, f"lowest {split} WER ({scores[best.tag]:.2f}%) of the {len(scored)} scored pairs that fit"
    best = most_accurate_first(fits)[0]
    return best, (f"the least compressed of the {len(fits)} pairs that fit (none of them has a scored clean "
                  "decode dir of the experiment's checkpoint to rank by)")


def known_scores(exp: Path, split: str) -> dict[str, float]:
    """WER per rate tag from scored clean decode dirs of this split decoded from the experiment's
    checkpoint (the lowest over beams)."""
    out: dict[str, float] = {}
    now = decoding_checkpoint(exp)
    for w in exp.glob(f"decode_*/{split}/wer.json"):
        tag = DecodeTag.parse(w.parent.parent.name)
        if tag.condition or tag.pool:  # noisy conditions and inference-only pooling do not rank configurations
            continue
        if other_checkpoint(w.parent, now):  # an earlier checkpoint's score says nothing of this one
            continue
        out[tag.rates.tag] = min(out.get(tag.rates.tag, 1e9), json.loads(w.read_text())["wer"])
    return out


def ranking_scores(exp: Path) -> list[tuple[dict[str, float], str]]:
    """What --budget ranks by, whatever split is decoded: (scores, split) for each of RANKING_SPLITS
    with any (a validation split before the test set); pick_by_budget takes the one that scores the
    most pairs within the budget."""
    return [(s, split) for split in RANKING_SPLITS if (s := known_scores(exp, split))]


def condition_of(opts: DecodeConfig) -> str:
    """The noisy condition these options decode ('' = clean), as decode dirs and caches name it."""
    return "" if opts.snr is None else condition_name(opts.noise, float(opts.snr))


def decode_tag(rates: Rates, opts: DecodeConfig) -> DecodeTag:
    """The decode dir of `rates` decoded with these options."""
    return DecodeTag(rates, opts.beam, Rates.parse(opts.pool) if opts.pool else None, condition_of(opts))


# ---- search --------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, feats: dict, rates: Rates, max_new_tokens: int, beam: int = 1,
             pool: Rates | None = None) -> tuple[list[str], list[int]]:
    """Texts and the LLM input length per utterance: greedy (`beam` 1) or mavsr's batched beam
    search. A model whose frozen LLM is held in bf16 decodes under bf16
    autocast (its float32 projectors and LoRA meet the bf16 weights there)."""
    bf16, dev = model.frozen_dtype == torch.bfloat16, model.markers.device
    feats = {m: (x.to(dev), n.to(dev)) for m, (x, n) in feats.items()}  # (B, T, D), (B,) where the model is
    with torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        emb, mask, _ = model.build(feats, rates, None, left_pad=True, pool=pool)  # (B, L, D), (B, L)
        tok = model.tokenizer
        llm = causal_lm(model.llm)
        if beam > 1:
            ids = beam_search(llm, emb, mask, tok.eos_token_id, beam, max_new_tokens)
        else:
            ids = greedy_search(llm, emb, mask, tok.eos_token_id, max_new_tokens)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts], mask.sum(1).tolist()


class _Beams:
    """The bookkeeping of a batched beam search: per active utterance, `k` live hypotheses (rows
    p*k .. p*k+k-1 of the KV cache belong to active[p]) and the finished ones of every utterance."""

    def __init__(self, b: int, k: int, eos: int, length_penalty: float, device: torch.device) -> None:
        self.k, self.eos, self.lp = k, eos, length_penalty
        self.active = list(range(b))
        self.scores = torch.full((b, k), float("-inf"), device=device)
        self.scores[:, 0] = 0.0  # one live beam at the start: the others must not duplicate it
        self.seqs: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(b)]
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        self.last_live: dict[int, list[tuple[float, list[int]]]] = {}

    def step(self, logp: torch.Tensor, last: bool) -> tuple[list[int], list[int]]:
        """Extend every live beam by the best tokens of logp (A*K, V), which it may overwrite with
        the candidates' scores; returns the cache rows to keep (in order) and the token each kept row
        takes next. Empty when all are done."""
        k, a, vocab = self.k, len(self.active), logp.shape[-1]
        scores = self.scores.view(-1, 1)
        cand = add_fresh(logp, scores)  # (A*K, V)
        top_s, top_i = cand.view(a, k * vocab).topk(2 * k, dim=-1)  # sorted
        top_s, top_i = top_s.tolist(), top_i.tolist()  # the bookkeeping below is plain Python
        keep, rows, toks, new_scores, new_seqs = [], [], [], [], []
        for p, i in enumerate(self.active):
            live = self._candidates(p, i, top_s[p], top_i[p], vocab)
            if len(self.finished[i]) >= k:
                continue  # done (early stopping): its rows leave the batch
            live += [(float("-inf"), 0, self.eos)] * (k - len(live))
            if last:
                self.last_live[i] = [(sc, self.seqs[p][src] + [t]) for sc, src, t in live if sc > float("-inf")]
                continue
            keep.append(i)
            rows += [p * k + src for _, src, _ in live]
            toks += [t for _, _, t in live]
            new_scores.append([sc for sc, _, _ in live])
            new_seqs.append([self.seqs[p][src] + [t] for _, src, t in live])
        if keep:
            self.active, self.seqs = keep, new_seqs
            self.scores = torch.tensor(new_scores, device=self.scores.device)
        return rows, toks

    def _candidates(self, p: int, i: int, scores: list[float], ids: list[int], vocab: int) -> list:
        """Of the 2k best candidates, the first k that do not end in EOS; an EOS among the first
        k finishes its hypothesis with score sum(log p) / length**length_penalty."""
        n, live = 0, []
        for rank in range(2 * self.k):
            sc = scores[rank]
            if sc == float("-inf"):
                break
            src, t = divmod(ids[rank], vocab)
            if t == self.eos:
                if rank < self.k:
                    hyp = self.seqs[p][src]
                    self.finished[i].append((sc / (len(hyp) + 1) ** self.lp, hyp))
                continue
            live.append((sc, src, t))
            n += 1
            if n == self.k:
                break
        return live

    def best(self, b: int) -> list[list[int]]:
        out = []
        for i in range(b):
            cands = list(self.finished[i])
            if len(cands) < self.k:  # ran out of steps: the live beams count too
                cands += [(sc / max(1, len(h)) ** self.lp, h) for sc, h in self.last_live.get(i, [])]
            out.append(max(cands, key=lambda c: c[0])[1] if cands else [])
        return out


def _last_position(emb: torch.Tensor) -> int | torch.Tensor:
    """The prompt's full call keeps the logits of its last position only. In float32 as the slice `1`
    (each row's product alone, by a batched product: the numbers every CPU test holds); in a lower
    precision as an index, which copies the (B, 1, D) rows together: a strided slice there sent the
    output layer's weight, expanded per row, through a copy (2 GB and 9 s a prompt at Llama-3.2-1B's
    vocabulary in bf16 on this CPU, benchmarks/real_size_memory.md)."""
    if emb.dtype == torch.float32:
        return 1
    return torch.tensor([emb.shape[1] - 1], device=emb.device)


@torch.no_grad()
def greedy_search(llm, emb: torch.Tensor, mask: torch.Tensor, eos: int, max_new_tokens: int) -> list[list[int]]:
    """The most likely token at every step, with the in-place KV cache; token for token what
    transformers' greedy `generate` gives (tested). emb (B, L, D) left-padded, mask (B, L)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = kv_cache.in_place_cache(max_new_tokens)
    out = llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
              logits_to_keep=_last_position(emb))
    full = _search_mask(mask, max_new_tokens)
    step_logits = one_token_step(causal_lm(llm), mask.shape[1] + max_new_tokens)
    logits = out.logits[:, -1]  # (B, V)
    done = [False] * emb.shape[0]
    seqs: list[list[int]] = [[] for _ in range(emb.shape[0])]
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        for i, t in enumerate(nxt.tolist()):
            if not done[i] and t != eos:
                seqs[i].append(t)
            done[i] = done[i] or t == eos
        if all(done) or step == max_new_tokens - 1:
            break
        logits = step_logits(llm.get_input_embeddings()(nxt[:, None]), pos[:, -1] + step + 1,
                             full[..., : mask.shape[1] + step + 1], cache)
    return seqs


def _search_mask(mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """(B, 1, 1, L + max_new_tokens) True where a one-token step may attend: the prompt's mask (left
    padding) and every generated token. Built once, sliced per step, and given to the LLM as the
    prepared 4-D mask it would otherwise rebuild from the 2-D one at every step."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], dim=1).bool()[:, None, None, :]


@torch.no_grad()
def beam_search(llm, emb: torch.Tensor, mask: torch.Tensor, eos: int, beam: int, max_new_tokens: int,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Batched beam search with a KV cache; the prompt is run once per utterance, not per beam.

    transformers' beam search copies every input `beam` times before the first forward pass,
    so the (long) audio-visual prefix is computed beam-fold; here the prefix is run once and
    its cache expanded. Per step, each utterance keeps the `beam` best live hypotheses from the
    2*beam best candidates; a candidate ending in EOS among the first `beam` is finished with
    score sum(log p) / length**length_penalty. An utterance is done when it holds `beam`
    finished hypotheses (early stopping), and the best finished one is returned. On the CPU the
    step holds each prompt once, reads float32 LoRA merged and takes oneDNN's products
    (model/step.py): its logits equal the full call's to rounding, and do not depend on the batch.
    emb (B, L, D) left-padded, mask (B, L) -> token ids per utterance.
    """
    b, k = emb.shape[0], beam
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = kv_cache.in_place_cache(max_new_tokens)
    out = llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
              logits_to_keep=_last_position(emb))
    logp = torch.log_softmax(out.logits[:, -1].float(), -1).repeat_interleave(k, 0)  # (B*K, V)
    step_logits = one_token_step(causal_lm(llm), mask.shape[1] + max_new_tokens, beams=k)
    embed = llm.get_input_embeddings()
    if getattr(step_logits, "shares_prompt", False):
        kv_cache.share_prompt(cache, k)  # the prompt once per utterance, read once per step
    else:
        cache.batch_repeat_interleave(k)
    full = _search_mask(mask, max_new_tokens).repeat_interleave(k, 0)
    last_pos = pos[:, -1].repeat_interleave(k)
    beams = _Beams(b, k, eos, length_penalty, emb.device)
    for step in range(max_new_tokens):
        rows, toks = beams.step(logp, last=step == max_new_tokens - 1)
        if not rows:
            break
        idx = torch.tensor(rows, device=emb.device)
        cache.reorder_cache(idx)  # reorders beams and drops the rows of finished utterances
        if len(rows) != full.shape[0]:  # a beam's rows share their mask and position
            full, last_pos = full[idx], last_pos[idx]
        last_pos = last_pos + 1
        step_emb = embed(torch.tensor(toks, device=emb.device)[:, None])
        logits = step_logits(step_emb, last_pos, full[..., : mask.shape[1] + step + 1], cache)  # (A*K, V)
        logp = torch.log_softmax(logits.float(), -1)
    return beams.best(b)


# ---- a loaded experiment -------------------------------------------------------------------
def load_experiment(exp: Path):
    """(config, checkpoint dir, checkpoint meta) of an experiment dir."""
    if not (exp / "config.yaml").is_file():
        raise MavsrError(f"{exp} is not an experiment dir (no config.yaml)")
    cfg = config_mod.load(exp / "config.yaml")
    ckpt = checkpoint.for_decoding(exp)
    return cfg, ckpt, checkpoint.read_meta(ckpt)


class Decoder:
    """One loaded experiment, decoding any of its trained configurations (the model loads once)."""

    def __init__(self, recipe: Recipe, exp: Path, split: str | None, log=print, device: str = DEVICE) -> None:
        """`split` None: the experiment only (for `transcribe`), no manifest needed. `device`: where
        the model runs (devices.resolve; a device not here is refused now, before any work)."""
        self.recipe, self.split, self.log = recipe, split, log
        self.device = devices.resolve(device)
        self.exp = Path(exp) if Path(exp).is_absolute() else recipe.root / exp
        self.cfg, self.ckpt, self.meta = load_experiment(self.exp)
        self.trained = checkpoint.grid_of(self.meta)
        self.utts = {u.id: u for u in recipe.utterances(split)} if split else {}
        self._model = None
        self._fixed_tokens: int | None = None
        self._stores: dict[str, FeatureStore] = {}
        if not is_done(self.exp):
            log(f"decode: warning: the training of {self.exp.name} has not finished; decoding its latest "
                f"checkpoint, {self.ckpt.name}")

    def inputs(self, opts: DecodeConfig) -> dict:
        """What a decode dir is made from beyond its name (rates, beam, pool, condition): the
        checkpoint, the token limit, checksums of the manifest and the feature cache, and the device
        type (a GPU's kernels and bf16 give other numbers). The batch size is not among them: it does
        not change the hypotheses."""
        sums = self.ckpt / "checksums.json"
        weights = json.loads(sums.read_text()).get("model.safetensors") if sums.is_file() else None
        cache = self.recipe.dump(self.meta["encoders_tag"], cache_split(self.cfg, self.split, condition_of(opts)))
        return {"checkpoint": self.ckpt.name, "checkpoint_sha256": weights,
                "max_new_tokens": opts.max_new_tokens or "auto",
                "manifest": checksum_or_none(self.recipe.manifest(self.split)),
                "features": checksum_or_none(cache / "provenance.json"), "device": self.device.type}

    def requested_rates(self, audio_rate: int | None, video_rate: int | None, budget: float | None,
                        clips: list[tuple[float, int, int]] | None = None) -> Rates | None:
        """The trained pair a call asks for: by --budget for the `clips` decoded ((seconds, audio frames,
        video frames) each; default: the split's, from its feature cache; the choice and its reason are
        logged) or by --audio-rate/--video-rate; None when it names neither."""
        if budget is not None:
            if audio_rate is not None or video_rate is not None:
                raise MavsrError("--budget picks the rates; drop --audio-rate/--video-rate")
            if not budget > 0:
                raise MavsrError(f"--budget is LLM input tokens per second of speech, > 0; got {budget:g}")
            b = Budget(budget, self.fixed_tokens(), tuple(self._split_clips() if clips is None else clips))
            r, why = pick_by_budget(self.trained, b, ranking_scores(self.exp))
            self.log(f"decode: budget {b.describe()} -> {r.tag} {r.pair} at {b.cost(r):.2f}: {why}")
            return r
        if audio_rate is None and video_rate is None:
            return None
        r = Rates(audio_rate, video_rate)
        require(r, self.trained)
        return r

    def _split_clips(self) -> list[tuple[float, int, int]]:
        """(seconds, audio frames, video frames) of the split's utterances that decode reads."""
        store = self.store(dataclasses.replace(self.options(), snr=None))  # the clean cache: the same lengths
        return [(self.utts[i].duration, *store.lengths(i)) for i in store.ids() if i in self.utts]

    def fixed_tokens(self) -> int:
        """LLM input tokens of every utterance beside the media: BOS, two markers per stream, the prompt
        (counted once per Decoder: the tokenizer is loaded for it)."""
        if self._fixed_tokens is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(resolve_model(self.recipe, self.cfg.model.llm))
            streams = len(self.cfg.model.modality)  # "av", "a" or "v"
            prompt = tok(self.cfg.model.resolved_prompt(), add_special_tokens=False).input_ids
            self._fixed_tokens = 1 + 2 * streams + len(prompt)
        return self._fixed_tokens

    def options(self, **overrides) -> DecodeConfig:
        """The experiment's decode settings with the given fields replaced (None keeps the config's)."""
        opts = dataclasses.replace(self.cfg.decode, **{k: v for k, v in overrides.items() if v is not None})
        return config_mod.check_decode(opts)

    @property
    def model(self):
        if self._model is None:
            cfg, meta = self.cfg, self.meta
            # on a GPU the frozen LLM is held as training held it there (bf16 with precision auto); on
            # the CPU in float32, as training runs there
            bf16 = self.device.type == "cuda" and train_bf16(cfg.train, "cuda")
            m = build_model(cfg, meta["dims"].get("audio"), meta["dims"].get("video"),
                            llm_path=resolve_model(self.recipe, cfg.model.llm), rates=self.trained, bf16=bf16)
            m.load_trainable(checkpoint.load_state(self.ckpt))
            self._model = m.to(self.device).eval()
        return self._model

    def store(self, opts: DecodeConfig) -> FeatureStore:
        """The features of the split under the options' condition (a noisy one is encoded once, then reused)."""
        key = cache_split(self.cfg, self.split, condition_of(opts))
        if key not in self._stores:
            if opts.snr is not None:
                if self.cfg.model.modality == "v":
                    raise MavsrError("--snr adds noise to the audio; this is a video-only model")
                extract(self.recipe, self.cfg, [self.split], log=self.log, condition=(opts.noise, float(opts.snr)),
                        device=str(self.device))  # the encoders where the model runs
            self._stores[key] = FeatureStore(self.recipe.dump(self.meta["encoders_tag"], key))
        return self._stores[key]

    def run(self, rates: Rates, opts: DecodeConfig, force: bool = False, shard: Shard | None = None) -> Path:
        """Decode the split at `rates` into exp/<tag>/<decode dir>/<split>/ (or one shard's part file)."""
        require(rates, self.trained)
        out = self.exp / decode_tag(rates, opts).name / self.split
        rel = out.relative_to(self.recipe.root) if out.is_relative_to(self.recipe.root) else out
        if not force and finished(out, self.inputs(opts), f"decode: {rel}", self.log):
            return out
        store = self.store(opts)
        ids = [i for i in store.ids() if i in self.utts]
        if not ids:
            raise MavsrError(f"no utterances of split {self.split!r} in the feature cache")
        batches = [ids[b:b + opts.batch_size] for b in range(0, len(ids), opts.batch_size)]
        parts_dir = out.parent / f".{self.split}.parts"
        n_parts = self._decode_parts(rates, opts, store, batches, parts_dir, force, shard)
        if shard:
            self.log(f"decode: part {shard[0]}/{shard[1]} of {rel} done; run without --shard to merge")
            return out
        lines = self._merge_parts(parts_dir, n_parts, ids)
        self._write(out, rates, opts, lines)
        shutil.rmtree(parts_dir, ignore_errors=True)
        self.log(f"decode: {len(lines)} utterances at {rates.tag} beam {opts.beam} -> {rel}")
        return out

    def _decode_parts(self, rates: Rates, opts: DecodeConfig, store: FeatureStore, batches: list[list[str]],
                      parts_dir: Path, force: bool, shard: Shard | None) -> int:
        """Write the part files this call owns (all of them without `shard`); returns their count N."""
        clean_stale(parts_dir)
        n_parts = shard[1] if shard else _existing_parts(parts_dir)
        parts = [parts_dir / f"part-{p:05d}-of-{n_parts:05d}.jsonl" for p in range(n_parts)]
        mine = [shard[0]] if shard else range(n_parts)
        if not force and any(not parts[p].is_file() for p in mine):  # the split is finished here: as begun?
            self._same_device([json.loads(x) for f in parts if f.is_file() for x in f.read_text().splitlines()],
                              f"{rates.tag} {self.split}")
        for p in mine:
            part = parts[p]
            if part.is_file() and not force:
                continue
            parts_dir.mkdir(parents=True, exist_ok=True)
            journal = part.with_name(part.name + ".journal")
            if force:
                journal.unlink(missing_ok=True)
            what = f"{rates.tag} {self.split}" + (f" part {p}/{n_parts}" if n_parts > 1 else "")
            lines = self._decode_batches(rates, opts, store, batches[p::n_parts], what, journal)
            atomic_write_text(part, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            journal.unlink(missing_ok=True)
        return n_parts

    @staticmethod
    def _merge_parts(parts_dir: Path, n_parts: int, ids: list[str]) -> list[dict]:
        lines = []
        for p in range(n_parts):
            part = parts_dir / f"part-{p:05d}-of-{n_parts:05d}.jsonl"
            lines += [json.loads(x) for x in part.read_text().splitlines()]
        order = {i: k for k, i in enumerate(ids)}
        return sorted(lines, key=lambda x: order[x["id"]])

    def _write(self, out: Path, rates: Rates, opts: DecodeConfig, lines: list[dict]) -> None:
        with staged_dir(out, done_text(self.inputs(opts))) as tmp:
            atomic_write_text(tmp / "hyp.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
            o = {"checkpoint": self.ckpt.name, "rates": rates.tag, "pool": opts.pool or None, "split": self.split,
                 "beam": opts.beam, "batch_size": opts.batch_size, "max_new_tokens": opts.max_new_tokens or "auto",
                 "snr": opts.snr, "noise": opts.noise if opts.snr is not None else None, "sampling": False,
                 "devices": sorted(_decoded_on(lines))}  # several where parts were decoded apart
            options = "decode_options:\n" + "".join(f"  {k}: {v}\n" for k, v in o.items())
            write_provenance(tmp, self.cfg.dump() + options)

    def _decode_batches(self, rates: Rates, opts: DecodeConfig, store: FeatureStore, batches: list[list[str]],
                        what: str, journal: Path) -> list[dict]:
        """Decode `batches`; each finished batch is appended to `journal` (one JSON line, synced),
        so an interrupted run resumes after the last whole batch and ends with the same output."""
        _ = self.model  # load it before the progress bar starts
        done = _read_journal(journal, batches)
        out = [x for k in range(len(done)) for x in done[k]]
        self._same_device(out, what)
        pool = Rates.parse(opts.pool) if opts.pool else None
        with torch.inference_mode(), bar() as pbar, open(journal, "a", encoding="utf-8") as jf:
            task = pbar.add_task(f"decode {what}", total=sum(len(b) for b in batches),
                                 completed=sum(len(b) for b in batches[:len(done)]), info="")
            if done:
                self.log(f"decode: resuming {what} after {len(done)} of {len(batches)} batches")
            for k, bid in enumerate(batches[len(done):], start=len(done)):
                mnt = max_new_tokens(opts, [self.utts[i].duration for i in bid])
                t0 = time.perf_counter()
                hyps, n_in = self._generate(store, bid, rates, mnt, opts.beam, pool)
                dt = (time.perf_counter() - t0) / len(bid)
                mine = [{"id": i, "ref": self.utts[i].text, "hyp": h, "tokens_in": n,
                         "duration": self.utts[i].duration, "time": round(dt, 5), "device": self.device.type}
                        for i, h, n in zip(bid, hyps, n_in, strict=True)]
                jf.write(json.dumps({"batch": k, "ids": bid, "lines": mine}, ensure_ascii=False) + "\n")
                jf.flush()
                os.fsync(jf.fileno())
                out += mine
                pbar.advance(task, len(bid))
        return out

    def _same_device(self, lines: list[dict], what: str) -> None:
        """Refuse to finish on this device type a decode begun on another: CPU float32 and GPU bf16
        hypotheses would mix in one result (extract-features refuses a cache's resume alike)."""
        other = sorted(_decoded_on(lines) - {self.device.type})
        if other:
            raise MavsrError(f"decode: {what} was begun on {' and '.join(other)}; finish it there (--device "
                             f"{other[0]}) or decode it again here with --force")

    def _generate(self, store: FeatureStore, bid: list[str], rates: Rates, mnt: int, beam: int,
                  pool: Rates | None = None):
        """One batch; a batch that runs out of accelerator memory is decoded again in halves
        (down to single utterances, which then fail in one line)."""
        try:
            faults.maybe_oom(len(bid))
            feats = batch_features(store, bid, self.cfg.model.modality)
            return generate(self.model, feats, rates, mnt, beam=beam, pool=pool)
        except torch.OutOfMemoryError:
            pass  # retried below: here the exception's frames still hold the failed call's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(bid) == 1:
            raise MavsrError(f"out of memory decoding {bid[0]} alone at {rates.tag} beam {beam}: "
                             "lower --beam or decode on a larger device")
        half = len(bid) // 2
        self.log(f"decode: out of memory on a batch of {len(bid)}; retrying as {half} + {len(bid) - half}")
        a, na = self._generate(store, bid[:half], rates, mnt, beam, pool)
        b, nb = self._generate(store, bid[half:], rates, mnt, beam, pool)
        return a + b, na + nb


def _decoded_on(lines: list[dict]) -> set[str]:
    """The device types that decoded these hyp lines (a line from before lines named one: the CPU,
    then decode's only device)."""
    return {x.get("device", "cpu") for x in lines}


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
