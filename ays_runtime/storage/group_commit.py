"""Group commit: many small writes from the event loop, one transaction each batch.

A burst of runs dispatched or finished at once would otherwise be a transaction each, and a
commit is the expensive part (an fsync on SQLite, a round trip and a log flush on MySQL).
Callers `await submit(item)` as if they wrote alone; items submitted while a batch is being
written go into the next batch. The write function gets the items in submission order and
returns one answer per item; if it raises, every caller of that batch gets the exception (as
each would have, writing alone).

`Batcher` takes a coroutine function (e.g. one request for many results); `GroupCommit` runs a
blocking function (a transaction, file writes) in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class Batcher(Generic[Item, Answer]):
    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[Sequence[Answer]]],
        max_batch: int = 500,
    ) -> None:
        self._write = write
        self.max_batch = max_batch
        self._queue: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name="group-commit")
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Answer]]] = []
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    answers = await self._write([item for item, _ in batch])
                except Exception as err:  # handed to every caller of the batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                for (_, future), answer in zip(batch, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
        except asyncio.CancelledError:
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue.clear()
            raise


class GroupCommit(Batcher[Item, Answer]):
    def __init__(
        self, write: Callable[[Sequence[Item]], Sequence[Answer]], max_batch: int = 500
    ) -> None:
        async def in_thread(items: list[Item]) -> Sequence[Answer]:
            return await asyncio.to_thread(write, items)

        super().__init__(in_thread, max_batch)
