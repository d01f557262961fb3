from __future__ import annotations

import asyncio
import csv
import itertools
from pathlib import Path

import orjson
import pytest

from batchrunner.limiter import AdaptiveLimiter, ConcurrencyLimiter, RateLimiter
from tests.conftest import REPO, read_output, write_csv, write_job


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def busy(limiter: AdaptiveLimiter) -> AdaptiveLimiter:
    """As if every slot were taken: the bound is in use, so it may grow."""
    limiter._in_flight = 10**6
    return limiter


def test_fixed_limiter_bounds_holders() -> None:
    async def scenario() -> int:
        limiter = ConcurrencyLimiter(3)

        async def hold() -> None:
            async with limiter:
                await asyncio.sleep(0.001)

        await asyncio.gather(*(hold() for _ in range(20)))
        return limiter.statistics().peak_in_flight

    assert asyncio.run(scenario()) == 3


def test_a_slot_given_back_goes_to_the_first_waiter_without_leaking() -> None:
    async def scenario() -> None:
        limiter = ConcurrencyLimiter(1)
        order: list[str] = []

        async def hold(name: str, release: asyncio.Event) -> None:
            async with limiter:
                order.append(name)
                await release.wait()

        gates = {name: asyncio.Event() for name in "abcd"}
        tasks = {name: asyncio.create_task(hold(name, gates[name])) for name in "abcd"}
        await asyncio.sleep(0)
        assert order == ["a"]
        assert limiter.statistics().waiting == 3
        tasks["b"].cancel()  # gives up while waiting
        gates["a"].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["a", "c"]  # b left the queue; c was next
        assert limiter.statistics().in_flight == 1
        # granted, then cancelled before it could run: the slot goes on to the next
        gates["c"].set()
        await asyncio.sleep(0)  # c gives its slot back: d is granted it...
        tasks["d"].cancel()  # ...and cancelled before it runs
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert order == ["a", "c"]
        stats = limiter.statistics()
        assert (stats.in_flight, stats.waiting, stats.peak_in_flight) == (0, 0, 1)
        async with limiter:  # nothing leaked: the slot is free
            pass

    asyncio.run(scenario())


def test_a_bound_that_grows_lets_waiters_in_at_once() -> None:
    async def scenario() -> None:
        limiter = AdaptiveLimiter(1, 8, clock=FakeClock())
        started: list[int] = []

        async def hold(number: int) -> None:
            async with limiter:
                started.append(number)
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(hold(n)) for n in range(4)]
        await asyncio.sleep(0)
        assert started == [0]
        for _ in range(4):  # answers while requests wait: slow start raises the bound
            limiter.feedback(10.0, pushed_back=False)
        await asyncio.sleep(0)
        assert started == [0, 1, 2]  # bound 3: two more started, without a slot given back
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_slow_start_grows_fast_until_the_first_push_back() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = busy(AdaptiveLimiter(4, 64, clock=clock))
        for _ in range(4):
            limiter.feedback(10.0, pushed_back=False)
        assert limiter.limit == 6  # x1.5 in a round trip of 4 answers
        for _ in range(200):
            limiter.feedback(10.0, pushed_back=False)
        assert limiter.limit == 64  # capped by the maximum

    asyncio.run(scenario())


def test_push_back_cuts_once_per_round_trip() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = busy(AdaptiveLimiter(20, 64, clock=clock))
        limiter.feedback(10.0, pushed_back=False)  # round trip 10 ms
        limiter.feedback(10.0, pushed_back=True)
        after_first = limiter.limit
        assert after_first == 10  # 21, halved on leaving slow start
        limiter.feedback(10.0, pushed_back=True)  # the same wave: no second cut
        assert limiter.limit == after_first
        clock.now += 0.02
        limiter.feedback(10.0, pushed_back=True)
        assert limiter.limit < after_first
        assert limiter.decreases == 2

    asyncio.run(scenario())


def test_growth_is_additive_then_waits_below_the_ceiling_then_probes_gently() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = busy(AdaptiveLimiter(32, 64, clock=clock))
        limiter.feedback(10.0, pushed_back=True)  # leaves slow start: 16
        clock.now += 1.0
        limiter.feedback(10.0, pushed_back=True)  # ceiling 16, now 14.4
        answers = 0
        while limiter.limit < 15:
            limiter.feedback(10.0, pushed_back=False)
            answers += 1
        assert 5 <= answers <= 20  # about one per round trip of 14 answers
        for _ in range(1000):
            limiter.feedback(10.0, pushed_back=False)
        assert limiter.limit == 15  # within one of the ceiling: held for a second
        clock.now += 1.0
        answers = 0
        while limiter.limit < 16:
            limiter.feedback(10.0, pushed_back=False)
            answers += 1
        assert answers > 100  # then a probe, ten times slower than before

    asyncio.run(scenario())


def test_each_refused_probe_doubles_the_wait_and_an_accepted_one_lifts_the_ceiling() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = busy(AdaptiveLimiter(32, 64, clock=clock))
        limiter.feedback(10.0, pushed_back=True)  # 16, ceiling 32
        clock.now += 1.0
        limiter.feedback(10.0, pushed_back=True)  # 14.4, ceiling 16

        def wait_for_probe(limit: int) -> float:
            start = clock.now
            while limiter.limit < limit:
                limiter.feedback(10.0, pushed_back=False)
                clock.now += 0.01
            return clock.now - start

        waits = []
        for _ in range(4):
            waits.append(wait_for_probe(16))
            limiter.feedback(10.0, pushed_back=True)  # refused again at 16
        # each wait is the hold (1 s, then 2, 4, 8) plus the gentle creep to the ceiling
        assert [round(b - a, 1) for a, b in itertools.pairwise(waits)] == [1.0, 2.0, 4.0]
        wait_for_probe(16)
        wait_for_probe(18)  # the service took 17 and more: the ceiling is gone
        start = clock.now
        wait_for_probe(30)
        assert clock.now - start < 3  # additive again: one per round trip

    asyncio.run(scenario())


def test_an_unused_bound_does_not_grow() -> None:
    # The input is slower than the service, or the run is draining: nothing is learned by
    # raising a bound no request waits for.
    async def scenario() -> None:
        limiter = AdaptiveLimiter(4, 64, clock=FakeClock())
        for _ in range(100):
            async with limiter:
                limiter.feedback(10.0, pushed_back=False)
        assert limiter.limit == 4

        async def hold() -> None:
            async with limiter:
                await asyncio.sleep(0)
                limiter.feedback(10.0, pushed_back=False)

        await asyncio.gather(*(hold() for _ in range(40)))
        assert limiter.limit > 4  # requests waited: it grew

    asyncio.run(scenario())


def test_fast_refusals_do_not_make_real_answers_look_slow() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = busy(AdaptiveLimiter(16, 64, clock=clock))
        limiter.feedback(50.0, pushed_back=False)
        limiter.feedback(0.5, pushed_back=True)  # a 429 comes back at once
        clock.now += 1.0
        before = limiter.decreases
        for _ in range(20):
            limiter.feedback(50.0, pushed_back=False)
        assert limiter.decreases == before  # 50 ms is still the service's normal speed

    asyncio.run(scenario())


def test_a_round_trip_of_slow_answers_counts_as_push_back() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = AdaptiveLimiter(10, 64, clock=clock)  # not in use: it does not grow
        limiter.feedback(10.0, pushed_back=False)
        for _ in range(9):
            limiter.feedback(25.0, pushed_back=False)  # 2.5x the fastest: a queue
        assert limiter.decreases == 0  # not yet a whole round trip (10 answers) of them
        limiter.feedback(25.0, pushed_back=False)
        assert limiter.decreases == 1
        assert limiter.limit == 9  # a gentle cut, not the halving of a refusal

    asyncio.run(scenario())


def test_answers_slowed_now_and_then_by_a_busy_machine_do_not_shrink_the_bound() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = busy(AdaptiveLimiter(10, 64, clock=clock))
        for answer in range(200):
            clock.now += 0.002
            # most answers take 10 ms; every third is stalled 15 times longer
            limiter.feedback(150.0 if answer % 3 == 0 else 10.0, pushed_back=False)
        assert limiter.decreases == 0
        assert limiter.limit > 10

    asyncio.run(scenario())


def test_a_cut_for_slowness_leaves_no_ceiling_to_wait_below() -> None:
    async def scenario() -> None:
        clock = FakeClock()
        limiter = AdaptiveLimiter(8, 64, clock=clock)
        limiter.feedback(10.0, pushed_back=False)
        for _ in range(8):
            limiter.feedback(30.0, pushed_back=False)
        assert limiter.decreases == 1
        cut = limiter.limit
        busy(limiter)
        clock.now += 0.05
        for _ in range(200):  # fast again: it grows back past where it was cut, at once
            limiter.feedback(10.0, pushed_back=False)
        assert limiter.limit > cut + 2
        assert limiter.decreases == 1

    asyncio.run(scenario())


def test_rate_limiter_spaces_starts() -> None:
    async def scenario() -> list[float]:
        clock = FakeClock()
        limiter = RateLimiter(100.0, burst=1.0, clock=clock, sleep=clock.sleep)
        starts = []
        for _ in range(5):
            await limiter.acquire()
            starts.append(clock.now)
        return starts

    starts = asyncio.run(scenario())
    assert starts == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04])


def iris_rows(copies: int) -> list[list[str]]:
    with (REPO / "samples" / "iris.csv").open() as handle:
        reader = csv.reader(handle)
        next(reader)
        rows = [row[1:5] for row in reader]
    return rows * copies


def test_auto_concurrency_finds_the_capacity(invoke) -> None:
    data = write_csv(
        Path("d.csv"), ["sepal_length", "sepal_width", "petal_length", "petal_width"], iris_rows(8)
    )
    job = write_job(
        Path("auto.toml"),
        f'[input]\npath = "{data}"\n[service]\nurl = "embedded:iris"\n'
        "[service.embedded]\ncapacity = 16\nretry_after = 0.05\nlatency_ms = 5\n"
        '[batch]\nsize = 1\nconcurrency = "auto"\nmax_concurrency = 64\n',
    )
    result = invoke("run", str(job))
    assert result.exit_code == 0, result.stderr
    assert all(row["_status"] == "ok" for row in read_output("out/auto.parquet"))
    summary = orjson.loads(Path("out/auto.parquet.summary.json").read_bytes())
    assert summary["throttled"] / summary["requests"] < 0.05
    print(f"\n[auto] {summary['requests']} requests, {summary['throttled']} answered 429")


def test_concurrency_must_be_a_number_or_auto(invoke) -> None:
    write_csv(Path("d.csv"), ["x"], [(1,)])
    result = invoke("run", "--input", "d.csv", "--url", "embedded:iris", "--concurrency", "lots")
    assert result.exit_code == 2
    assert "batch.concurrency" in result.stderr
