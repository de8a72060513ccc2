"""farm.coalesce: what the API uses to queue the submits that arrive together in one director call."""

from __future__ import annotations

import asyncio

import pytest

from farm.coalesce import Coalescer


def test_calls_waiting_while_a_batch_is_out_go_together_and_each_gets_its_own_answer():
    calls: list[list[int]] = []

    async def batch(items: list[int]) -> list[int | Exception]:
        calls.append(items)
        await asyncio.sleep(0.01)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    async def main() -> list[int | Exception]:
        coalescer = Coalescer(batch, max_batch=8, in_flight=1)
        return await asyncio.gather(*(coalescer(i) for i in range(20)))

    answers = asyncio.run(main())
    assert [a if isinstance(a, int) else str(a) for a in answers] == [
        i * 10 if i % 2 == 0 else f"odd {i}" for i in range(20)]
    assert [len(c) for c in calls] == [8, 8, 4]  # all arrived at once: batches of max_batch
    assert sorted(i for c in calls for i in c) == list(range(20))


def test_a_slow_batch_does_not_hold_up_the_next_and_a_failure_is_its_callers_alone():
    async def batch(items: list[str]) -> list[str]:
        if "boom" in items:
            raise ConnectionError("the director is away")
        await asyncio.sleep(0.5 if "slow" in items else 0.01)
        return [s.upper() for s in items]

    async def main() -> tuple[list[object], float]:
        coalescer = Coalescer(batch, max_batch=64, in_flight=2)
        slow = asyncio.ensure_future(coalescer("slow"))
        await asyncio.sleep(0.005)  # the slow batch is out
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        quick: list[object] = []  # one at a time, beside the slow batch
        for s in ("a", "boom", "b"):
            try:
                quick.append(await coalescer(s))
            except ConnectionError as exc:
                quick.append(exc)
        took = loop.time() - t0
        return [*quick, await slow], took

    answers, took = asyncio.run(main())
    assert answers[0] == "A" and isinstance(answers[1], ConnectionError) and answers[2:] == ["B", "SLOW"]
    assert took < 0.3  # beside the 0.5 s batch, not behind it


def test_limits_are_checked():
    async def batch(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(batch, in_flight=0)


def test_a_lone_call_is_sent_at_once_and_later_ones_gather_behind_a_busy_sender():
    calls: list[list[int]] = []

    async def batch(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0.05)
        return items

    async def main() -> None:
        coalescer = Coalescer(batch, in_flight=1)
        first = asyncio.ensure_future(coalescer(0))
        await asyncio.sleep(0.01)
        assert calls == [[0]]  # not held back for company
        assert await asyncio.gather(first, *(coalescer(i) for i in range(1, 6))) == list(range(6))

    asyncio.run(main())
    assert calls == [[0], [1, 2, 3, 4, 5]]
