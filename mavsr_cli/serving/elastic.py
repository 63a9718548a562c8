"""The elastic controller: which trained rate pair decodes the next batch, so that latency stays under
the target. Pure functions and a small cost model; the batcher calls them, the tests call them alone.

Accuracy order: the least compressed pair first (more LLM input tokens, lower WER: docs/method.md, Table 1).
Cost: seconds to decode a batch of n at a pair, `fixed + per_item * n`, measured at start-up on each
pair and then corrected by every batch decoded (an exponential average of measured / predicted).
"""

from __future__ import annotations

import dataclasses
import math

from ..rates import Rates

HEADROOM = 0.8  # plan for this share of the target: the estimate is a mean, the target a 95th percentile
SMOOTHING = 0.3  # weight of the newest batch in the cost correction
WORTH = 0.1  # over the target, a more compressed pair is taken only if predicted this much faster


@dataclasses.dataclass
class Cost:
    fixed: float  # seconds per batch whatever its size
    per_item: float  # seconds per utterance in it

    def seconds(self, n: int) -> float:
        return self.fixed + self.per_item * n


class CostModel:
    """Decode seconds per (rate tag, beam): each pair's cost relative to the others from start-up
    measurements, times one speed factor that every decoded batch corrects (the machine's load moves
    all pairs together, and a pair the controller no longer picks must not keep a stale cost). A beam
    not measured at start-up costs the measured one's times a factor per beam: the beam ratio until
    the first batch at that beam is decoded, then what that batch showed (for every pair alike)."""

    def __init__(self) -> None:
        self.costs: dict[tuple[str, int], Cost] = {}
        self.scale = 1.0  # measured / predicted, averaged over the batches decoded
        self.beam_factor: dict[int, float] = {}  # an unmeasured beam's cost / the measured beam's

    def fit(self, rates: Rates, beam: int, n1: int, s1: float, n2: int, s2: float) -> None:
        """From two measured batches of n1 and n2 utterances (n2 > n1)."""
        per = max((s2 - s1) / (n2 - n1), 0.0) if n2 > n1 else 0.0
        self.costs[(rates.tag, beam)] = Cost(max(s1 - per * n1, 0.0), per)

    def _measured(self, rates: Rates, beam: int) -> tuple[Cost, float] | None:
        """(the cost measured for this pair at this beam or the nearest, the factor to this beam)."""
        if (rates.tag, beam) in self.costs:
            return self.costs[(rates.tag, beam)], 1.0
        known = [b for t, b in self.costs if t == rates.tag]
        if not known:
            return None
        near = min(known, key=lambda b: abs(b - beam))
        return self.costs[(rates.tag, near)], self.beam_factor.get(beam, beam / near)

    def seconds(self, rates: Rates, beam: int, n: int) -> float:
        m = self._measured(rates, beam)
        return 0.0 if m is None else self.scale * m[0].seconds(n) * m[1]

    def observe(self, rates: Rates, beam: int, n: int, seconds: float) -> None:
        m = self._measured(rates, beam)
        if m is None or m[0].seconds(n) <= 0:
            return
        base = m[0].seconds(n)
        if (rates.tag, beam) not in self.costs and beam not in self.beam_factor:  # its first batch at this beam
            self.beam_factor[beam] = seconds / (self.scale * base)
            return
        self.scale = (1 - SMOOTHING) * self.scale + SMOOTHING * seconds / (base * m[1])


@dataclasses.dataclass(frozen=True)
class Load:
    """What the batcher sees when a batch is about to be decoded."""

    batch: int  # utterances in this batch
    waiting: int  # requests behind it (queued, or still being read and encoded)
    waited: float  # seconds the oldest request of the batch has already spent in the server
    max_batch: int  # the batcher's largest batch
    preparing: int = 0  # of the waiting, those still to be read and encoded (each its share of the prep thread)
    prep: float = 0.0  # seconds to read and encode one request (measured)


def predicted_latency(seconds_for, load: Load) -> float:
    """From the oldest request's arrival until the last request now in the server is answered, if every
    batch ran at one pair: an upper bound on any of their latencies. The oldest's wait, then whichever
    is longer of this batch plus the queue behind it drained in full batches, and the requests still
    to be encoded (their shares of the prep thread, at any pair) with the last one's decode.
    `seconds_for(n)`: one batch of n."""
    full, rest = divmod(load.waiting, load.max_batch)
    decode = seconds_for(load.batch) + full * seconds_for(load.max_batch) + (seconds_for(rest) if rest else 0.0)
    encode = load.preparing * load.prep + seconds_for(1)
    return load.waited + max(decode, encode)


def choose(pairs: list[Rates], cost: CostModel, beam: int, load: Load, slo: float,
           headroom: float = HEADROOM) -> tuple[Rates, float]:
    """(pair, its predicted latency): the most accurate pair (rates.most_accurate_first order in `pairs`) whose
    predicted latency is within headroom * slo. When none is, the most accurate of those predicted
    within WORTH of the fastest: compression that buys no latency (the queue is in the encoders)
    costs accuracy for nothing."""
    predicted = [(r, predicted_latency(lambda n, r=r: cost.seconds(r, beam, n), load)) for r in pairs]
    for r, t in predicted:
        if t <= headroom * slo:
            return r, t
    fastest = min(t for _, t in predicted)
    return next((r, t) for r, t in predicted if t <= fastest * (1 + WORTH))


def retry_after(cost: CostModel, pairs: list[Rates], beam: int, queued: int, max_batch: int) -> int:
    """Whole seconds a refused client should wait: the queue drained at the cheapest pair."""
    per_batch = min(cost.seconds(r, beam, max_batch) for r in pairs)
    return max(1, math.ceil(per_batch * math.ceil(queued / max_batch)))
