"""Micro-batching: concurrent requests share one model call.

Each request puts its input on a queue and awaits a future. One collector task takes the first waiting input, then
keeps taking inputs until the batch is full (``max_batch``) or the wait window (``max_wait_ms``) since the first
one has passed, stacks them and runs the model in a worker thread, so the event loop keeps accepting requests
while the model computes. Inputs that arrive while a batch computes form the next batch: under load the batches
fill without any waiting. One worker thread runs every model call (predictions and explanations alike), so the
model is never entered from two threads at once.

Other model work (an explanation: `MicroBatcher.run`) waits in the same queue, in turn, and runs alone: one queue
and one limit (``max_queue``) for everything that needs the model, so an overloaded server answers 503 to any of
it instead of piling up work nobody bounds.

A model that raises fails only the requests of that batch (each gets the exception); the collector goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vitlab.errors import VitlabError

log = logging.getLogger("vitlab.serve")


class QueueFull(VitlabError):
    """More requests wait than the queue holds: the server is overloaded."""


@dataclass(frozen=True)
class _Call:
    """Model work other than a batched prediction, waiting in the queue for its turn."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


class MicroBatcher:
    """``await batcher.submit(x)`` runs ``fn(torch.stack([x, ...]))`` on a batch of concurrent inputs and returns
    this input's row of the output.

    ``max_batch=1`` turns batching off (one model call per request). ``stats`` counts model calls and the inputs
    they took, so tests and benchmarks can see the batching.
    """

    def __init__(
        self, fn: Callable[[Tensor], Tensor], *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise VitlabError("max_batch and max_queue must be at least 1 and max_wait_ms at least 0")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.stats = {"calls": 0, "inputs": 0, "largest_batch": 0, "errors": 0}
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vitlab-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def _ensure_started(self) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._collect(self._queue), name="vitlab-batcher")
        return self._queue  # type: ignore[return-value]

    async def submit(self, x: Tensor) -> Tensor:
        return await self._enqueue(x)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run other model work (an explanation) on the model thread, alone, when its turn in the queue comes;
        `QueueFull` as for `submit`."""
        return await self._enqueue(_Call(fn, args))

    async def _enqueue(self, item: Tensor | _Call) -> Any:
        queue = self._ensure_started()
        if queue.qsize() >= self.max_queue:
            raise QueueFull(f"{queue.qsize()} requests are waiting for the model; try again shortly")
        future = asyncio.get_running_loop().create_future()
        queue.put_nowait((item, future))
        return await future

    async def _collect(self, queue: asyncio.Queue) -> None:
        carried = None  # a call met while filling a batch: it runs right after that batch, in its turn
        while True:
            first, carried = carried or await queue.get(), None
            if isinstance(first[0], _Call):
                await self._run_call(*first)
                continue
            batch, carried = await self._fill(queue, [first])
            live = [(x, f) for x, f in batch if not f.done()]  # a client that went away cancelled its future
            if live:
                await self._run_batch(live)

    async def _fill(self, queue: asyncio.Queue, batch: list) -> tuple[list, tuple | None]:
        """Take inputs until ``max_batch`` or the wait window closes; stop early at a call (returned to run next)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                    break
            else:
                item = queue.get_nowait()
            if isinstance(item[0], _Call):
                return batch, item
            batch.append(item)
        return batch, None

    async def _run_call(self, call: _Call, future: asyncio.Future) -> None:
        if future.done():  # the client went away while it waited
            return
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, call.fn, *call.args)
        except Exception as e:  # the caller answers for it (the server logs it and says 500)
            if not future.done():
                future.set_exception(e)
            return
        if not future.done():
            future.set_result(result)

    async def _run_batch(self, batch: list[tuple[Tensor, asyncio.Future]]) -> None:
        xs = torch.stack([x for x, _ in batch])  # (B, C, H, W)
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, xs)
        except Exception as e:  # the model's own error: fail this batch's requests, keep serving
            self.stats["errors"] += 1
            log.exception("model call on a batch of %d failed", len(batch))
            for _, f in batch:
                if not f.done():
                    f.set_exception(e)
            return
        self.stats["calls"] += 1
        self.stats["inputs"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        for (_, f), row in zip(batch, out):
            if not f.done():
                f.set_result(row)

    async def aclose(self) -> None:
        """Stop the collector (the server's shutdown); a later `submit` starts a new one."""
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
