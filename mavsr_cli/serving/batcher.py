"""Dynamic batching: requests whose clips are encoded wait a few milliseconds in one queue, then are
decoded together by the batched search, at the pair the request named or the controller picks.

A batch holds requests of one experiment, one beam and one token limit (and one named pair, when
they name one), so each transcript is the one the request would get alone (decoding.generate's
batched search does not depend on the batch). One batch decodes at a time, on its own thread.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ..clocks import AUDIO_HZ, FPS
from ..config import STREAMS
from ..decoding import max_new_tokens, ranking_scores
from ..errors import MavsrError
from ..rates import Rates, most_accurate_first
from ..transcription import Clip, EncoderInputs, Transcriber
from . import elastic


class Engine:
    """One served experiment: its transcriber, its pairs in accuracy order, its decode defaults."""

    def __init__(self, tr: Transcriber, fixed: Rates | None = None, beam: int | None = None) -> None:
        self.tr, self.name, self.modality = tr, tr.dec.exp.name, tr.modality
        self.pairs = most_accurate_first(tr.dec.trained)
        self.fixed = fixed  # the server's --rates when not auto
        self.beam = beam if beam is not None else tr.dec.cfg.decode.beam  # the server's --beam, else the config's
        self.scores = ranking_scores(tr.dec.exp)  # what `budget` ranks by, read once (decoding.pick_by_budget)

    def max_new_tokens(self, duration: float) -> int:
        return max_new_tokens(self.tr.dec.cfg.decode, [duration])

    def sample(self, seconds: float) -> Clip:
        """A clip to measure decode costs on: the recipe's first validation or test utterance whose
        media are there (real speech decodes to a real transcript's length), else random features
        of `seconds`."""
        recipe = self.tr.recipe
        for split in ("val", "test"):
            if split not in recipe.prepared_splits():
                continue
            for u in recipe.utterances(split)[:5]:
                media = recipe.resolve_media(u.video if "video" in STREAMS[self.modality] or not u.audio else u.audio)
                if media.is_file():
                    try:
                        return self.tr.clip(media)
                    except MavsrError:
                        continue
        dims, g = self.tr.dec.meta["dims"], torch.Generator().manual_seed(0)
        hz = {"audio": AUDIO_HZ, "video": FPS}
        return Clip({m: torch.randn(int(seconds * hz[m]), dims[m], generator=g) for m in STREAMS[self.modality]},
                    seconds, None)


@dataclasses.dataclass(eq=False)  # a request is itself: never compared by its tensors
class Job:
    engine: Engine
    clip: Clip
    rates: Rates | None  # named by the request; None: the server's --rates (or the controller)
    beam: int
    max_new_tokens: int
    arrived: float  # time.perf_counter() when the request came in
    encode_seconds: float = 0.0  # reading and encoding its upload (its share of a batched encode), on the prep thread
    inputs: EncoderInputs | None = None  # the upload as read, until it is encoded into `clip`
    future: asyncio.Future = None
    queued: float = 0.0  # time.perf_counter() when it joined the batcher's queue, encoded

    @property
    def key(self) -> tuple:
        return self.engine.name, self.rates.tag if self.rates else None, self.beam, self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class Done:
    text: str
    tokens_in: int
    rates: Rates
    batch: int  # utterances decoded together
    started: float  # perf_counter at the start of the batch's decode
    seconds: float  # the batch's decode time


class Batcher:
    def __init__(self, max_batch: int, wait_s: float, slo_s: float, on_batch=lambda job, n, r, s: None) -> None:
        self.max_batch, self.wait_s, self.slo_s, self.on_batch = max_batch, wait_s, slo_s, on_batch
        self.cost = elastic.CostModel()
        self.pending: collections.deque[Job] = collections.deque()
        self.preparing = 0  # admitted requests still being read and encoded
        self.prep_seconds = 0.0  # reading and encoding one request, averaged (elastic.SMOOTHING)
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mavsr-decode")

    def measure(self, engine: Engine, seconds: float, reps: int = 5) -> None:
        """Decode costs of every pair at the engine's beam (serve's --beam, else the experiment's), at batch 1
        and at a larger batch, before serving (blocking); one decode of each pair first, untimed, for the
        one-off costs. The pairs take turns, `reps` rounds, and each keeps its least time: another
        process's burst only ever adds time, and taking turns spreads a slow stretch over all pairs
        rather than one (CI saw a lone pair's three reps in a row hide a 30% cost gap)."""
        n2, clip = min(self.max_batch, 4), engine.sample(seconds)
        mnt = engine.max_new_tokens(clip.duration)
        sizes = (1, n2) if n2 > 1 else (1,)
        for r in engine.pairs:
            engine.tr.decode([clip], r, mnt, engine.beam)
        best = {(r.tag, n): math.inf for r in engine.pairs for n in sizes}
        for _ in range(reps):
            for r in engine.pairs:
                for n in sizes:
                    t0 = time.perf_counter()
                    engine.tr.decode([clip] * n, r, mnt, engine.beam)
                    best[r.tag, n] = min(best[r.tag, n], time.perf_counter() - t0)
        for r in engine.pairs:
            self.cost.fit(r, engine.beam, 1, best[r.tag, 1], n2, best[r.tag, sizes[-1]])

    def observe_prep(self, seconds: float) -> None:
        a = elastic.SMOOTHING if self.prep_seconds else 1.0
        self.prep_seconds = (1 - a) * self.prep_seconds + a * seconds

    async def submit(self, job: Job) -> Done:
        job.future = asyncio.get_running_loop().create_future()
        job.queued = time.perf_counter()
        self.pending.append(job)
        self._wake.set()
        return await job.future

    @property
    def queued(self) -> int:
        return len(self.pending) + self.preparing

    def _take(self) -> list[Job]:
        """The oldest request and those of its kind behind it, up to max_batch, in arrival order."""
        self.pending = collections.deque(j for j in self.pending if not j.future.cancelled())  # gone clients
        if not self.pending:
            return []
        key = self.pending[0].key
        batch = [j for j in self.pending if j.key == key][: self.max_batch]
        for j in batch:
            self.pending.remove(j)
        return batch

    def pick(self, batch: list[Job]) -> Rates:
        j = batch[0]
        if j.rates is not None or j.engine.fixed is not None:
            return j.rates or j.engine.fixed
        load = elastic.Load(len(batch), self.queued, time.perf_counter() - j.arrived, self.max_batch,
                            self.preparing, self.prep_seconds)
        return elastic.choose(j.engine.pairs, self.cost, j.beam, load, self.slo_s)[0]

    async def run(self) -> None:
        """Forever: wait for a request, give others wait_s to join it, decode the batch, answer. A
        request that queued while the last batch was decoding has had its wait_s, or part of it."""
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            left = self.wait_s - (time.perf_counter() - self.pending[0].queued)
            if len(self.pending) < self.max_batch and left > 0:
                await asyncio.sleep(left)
            batch = self._take()
            if not batch:
                continue
            try:
                await self._decode(batch)
            except Exception as e:  # noqa: BLE001  (the batch's requests get the error; the batcher goes on)
                for b in batch:
                    b.future.done() or b.future.set_exception(e)

    async def _decode(self, batch: list[Job]) -> None:
        rates, j = self.pick(batch), batch[0]
        t0 = time.perf_counter()
        texts, n_in = await asyncio.get_running_loop().run_in_executor(
            self._pool, j.engine.tr.decode, [b.clip for b in batch], rates, j.max_new_tokens, j.beam)
        dt = time.perf_counter() - t0
        self.cost.observe(rates, j.beam, len(batch), dt)
        self.on_batch(j, len(batch), rates, dt)
        for b, text, n in zip(batch, texts, n_in, strict=True):
            b.future.done() or b.future.set_result(Done(text, int(n), rates, len(batch), t0, dt))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
