"""Group calls that arrive together into one call of a batch function (asyncio, one event loop).

The API queues storyboards this way: each submit is one director call and one store commit (an
fsync) on its own, most of a submit's cost past the HTTP layer; while calls are in flight, the submits
that arrive meanwhile wait and go together in the next one. No wait is added: a lone submit is sent at
once. Up to `in_flight` batches run at the same time (the API runs one: see deployments/app.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """`await coalescer(item)` -> the batch function's answer for that item. The batch function takes a
    list of items and returns one answer per item, in order; what it raises, every item of that batch
    raises."""

    def __init__(self, batch: Callable[[list[T]], Awaitable[list[R]]], *, max_batch: int = 64,
                 in_flight: int = 4) -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError("max_batch and in_flight must be at least 1")
        self._batch, self.max_batch, self.in_flight = batch, max_batch, in_flight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._sending = 0  # senders in their loop (counted down as one leaves it, before anyone else runs)
        self._senders: set[asyncio.Task[None]] = set()  # held: the event loop keeps only weak references

    async def __call__(self, item: T) -> R:
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, answer))
        if self._sending < self.in_flight:
            self._sending += 1
            sender = asyncio.create_task(self._send())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await answer

    async def _send(self) -> None:
        try:
            while self._waiting:
                group, self._waiting = self._waiting[:self.max_batch], self._waiting[self.max_batch:]
                try:
                    answers = await self._batch([item for item, _ in group])
                    if len(answers) != len(group):
                        raise RuntimeError(f"a batch of {len(group)} got {len(answers)} answers")
                except asyncio.CancelledError:  # the replica is going away: so are its callers
                    _refuse(group, RuntimeError("the API is shutting down"))
                    raise
                except Exception as exc:  # noqa: BLE001 - each caller of this batch gets it; the sender goes on
                    _refuse(group, exc)
                    continue
                for (_, answer), got in zip(group, answers, strict=True):
                    if not answer.done():  # its caller may have gone (a client that disconnected)
                        answer.set_result(got)
        finally:
            self._sending -= 1


def _refuse(group: list[tuple[T, asyncio.Future[R]]], exc: BaseException) -> None:
    for _, answer in group:
        if not answer.done():
            answer.set_exception(exc)
