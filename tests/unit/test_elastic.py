"""The elastic controller of `mavsr serve` (serving/elastic.py): cheaper pairs as the queue grows,
the most accurate one when idle, and a cost model that follows what it measures."""

from mavsr_cli.rates import Rates, most_accurate_first
from mavsr_cli.serving import elastic

PAIRS = most_accurate_first([Rates(16, 5), Rates(4, 2), Rates(16, 2), Rates(4, 5)])


def costs(fixed=0.05, per_token=0.002) -> elastic.CostModel:
    """Decode cost rising with the LLM input tokens: a batch of n at a pair, fixed + n * tokens * per_token."""
    m = elastic.CostModel()
    for r in PAIRS:
        per = r.tokens_per_second() * 3 * per_token  # a 3 s clip
        m.fit(r, 1, 1, fixed + per, 4, fixed + 4 * per)
    return m


def test_pairs_go_from_the_least_compressed_to_the_most():
    assert [r.tag for r in PAIRS] == ["a4v2", "a4v5", "a16v2", "a16v5"]


def test_the_controller_picks_cheaper_pairs_as_the_queue_grows_and_the_best_when_idle():
    m, picked = costs(), []
    for waiting in (0, 2, 4, 8, 16, 32, 64, 0):
        load = elastic.Load(batch=min(waiting + 1, 8), waiting=max(waiting - 7, 0), waited=0.05, max_batch=8)
        picked.append(elastic.choose(PAIRS, m, 1, load, slo=1.0)[0])
    order = [PAIRS.index(r) for r in picked]
    assert order[0] == 0 and order[-1] == 0  # idle: the most accurate, and back to it once drained
    assert order[:-1] == sorted(order[:-1]) and order[-2] == len(PAIRS) - 1  # monotone; the cheapest at the peak
    assert len(set(order)) >= 3  # steps through intermediate pairs, not just best/worst


def test_a_pair_is_chosen_only_if_its_prediction_fits_the_headroom():
    m = costs()
    load = elastic.Load(batch=4, waiting=4, waited=0.1, max_batch=4)
    r, t = elastic.choose(PAIRS, m, 1, load, slo=1.0)
    assert t <= elastic.HEADROOM * 1.0
    more_accurate = PAIRS[: PAIRS.index(r)]
    assert more_accurate  # the load is one where the best pair misses
    for q in more_accurate:  # every better pair was predicted to miss
        assert elastic.predicted_latency(lambda n, q=q: m.seconds(q, 1, n), load) > elastic.HEADROOM
    # nothing fits: the fastest, with its (over-target) prediction
    r, t = elastic.choose(PAIRS, m, 1, elastic.Load(8, 500, 2.0, 8), slo=1.0)
    assert r == PAIRS[-1] and t > 1.0


def test_compression_that_buys_no_latency_is_not_taken():
    m = costs()
    # 30 requests still to be encoded at 0.3 s each: 9 s whatever the pair, so over the target at every pair
    load = elastic.Load(batch=1, waiting=30, waited=0.0, max_batch=8, preparing=30, prep=0.3)
    r, t = elastic.choose(PAIRS, m, 1, load, slo=1.0)
    assert r == PAIRS[0] and t > 1.0  # the queue is in the encoders: keep the accuracy
    r, _ = elastic.choose(PAIRS, m, 1, elastic.Load(8, 30, 0.0, 8, preparing=0, prep=0.1), slo=1.0)
    assert r == PAIRS[-1]  # the same queue waiting for the LLM: the most compressed pair


def test_the_prediction_drains_the_queue_in_full_batches():
    one = elastic.predicted_latency(lambda n: 1.0 + n, elastic.Load(batch=2, waiting=9, waited=0.5, max_batch=4))
    assert one == 0.5 + 3.0 + 2 * 5.0 + 2.0  # this batch, two full ones, one of 1
    two = elastic.predicted_latency(lambda n: 1.0 + n, elastic.Load(2, 9, 0.5, 4, preparing=9, prep=3.0))
    assert two == 0.5 + 9 * 3.0 + 2.0  # bound by the encoders: nine to encode, then the last one's decode


def test_the_cost_model_fits_two_batches_and_follows_measurements():
    m = elastic.CostModel()
    m.fit(Rates(4, 2), 1, 1, 0.3, 4, 0.6)
    m.fit(Rates(16, 5), 1, 1, 0.1, 4, 0.2)
    assert abs(m.seconds(Rates(4, 2), 1, 10) - 1.2) < 1e-9  # 0.2 + 0.1 * n
    for _ in range(30):  # the machine turns out twice as slow, seen on one pair only
        m.observe(Rates(4, 2), 1, 10, 2.4)
    assert abs(m.seconds(Rates(4, 2), 1, 10) - 2.4) < 0.01
    assert abs(m.seconds(Rates(16, 5), 1, 4) - 0.4) < 0.01  # the pair not picked follows too
    assert abs(m.seconds(Rates(4, 2), 8, 1) - 8 * m.seconds(Rates(4, 2), 1, 1)) < 1e-9  # an unmeasured beam
    before, guess = m.seconds(Rates(16, 5), 8, 1), m.seconds(Rates(4, 2), 8, 1)
    m.observe(Rates(4, 2), 8, 1, 2.0)  # its first batch: 2 s where about 8 x 0.6 s was guessed
    assert abs(m.seconds(Rates(4, 2), 8, 1) - 2.0) < 1e-9
    assert abs(m.seconds(Rates(16, 5), 8, 1) - before * 2.0 / guess) < 1e-9  # every pair at that beam alike
    assert m.seconds(Rates(16, 2), 1, 1) == 0.0  # never measured: no opinion


def test_retry_after_is_the_queue_drained_at_the_cheapest_pair():
    m = costs()
    assert elastic.retry_after(m, PAIRS, 1, 64, 8) >= 1
    assert elastic.retry_after(m, PAIRS, 1, 640, 8) > elastic.retry_after(m, PAIRS, 1, 64, 8)


def test_a_request_that_queued_during_a_decode_is_not_held_for_the_batch_wait_again():
    """--batch-wait-ms lets others join the oldest queued request: one that has already waited that long
    behind a decode goes at once (the batcher used to wait the whole wait_s after every decode)."""
    import asyncio
    import threading
    import time
    import types

    from mavsr_cli.serving.batcher import Batcher, Job

    wait_s, started, release = 2.0, [], threading.Event()

    def decode(clips, rates, mnt, beam):  # the decode thread's work: the first batch until released
        started.append(time.perf_counter())
        if len(started) == 1:
            release.wait(60)
        return ["x"] * len(clips), [1] * len(clips)

    engine = types.SimpleNamespace(name="t", fixed=None, tr=types.SimpleNamespace(decode=decode))

    async def scenario():
        b = Batcher(max_batch=4, wait_s=wait_s, slo_s=60.0)
        loop = asyncio.create_task(b.run())
        first = asyncio.create_task(b.submit(Job(engine, None, Rates(4, 2), 1, 4, time.perf_counter())))
        deadline = time.monotonic() + 60
        while not started:  # the first batch is decoding (after its wait_s)
            assert time.monotonic() < deadline, "the first batch never started"
            await asyncio.sleep(0.01)
        second = asyncio.create_task(b.submit(Job(engine, None, Rates(4, 2), 1, 4, time.perf_counter())))
        await asyncio.sleep(wait_s + 0.1)  # the second has waited its wait_s behind the decode
        t_release = time.perf_counter()
        release.set()
        await asyncio.wait_for(first, 60)
        done = await asyncio.wait_for(second, 60)
        loop.cancel()
        b.close()
        return t_release, done.started, len(started)

    t_release, t_second, decodes = asyncio.run(scenario())
    assert decodes == 2  # two batches: the second request was not in the first
    assert t_second - t_release < wait_s / 2  # at the end of the first decode, not wait_s after it
