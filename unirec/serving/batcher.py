"""An asyncio micro-batcher: requests that arrive together share one call of a batch function.

The batch function runs in one worker thread (the model is not run concurrently with itself, and
the event loop stays free to accept requests meanwhile). A batch is everything queued when the
worker is free (at most ``max_batch``). When the worker was idle, so the batch starts with a lone
request, it is topped up for at most ``max_wait_ms``; under load, requests queue up while the
previous batch runs and the next batch takes them all at once, without waiting: the worker is
never left idle while requests wait.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence


class MicroBatcher:
    """Collects jobs into batches for ``fn(jobs) -> results`` (one result or exception per job).

    on_batch(size, seconds): called after each batch (metrics).
    """

    def __init__(self, fn: Callable[[Sequence[Any]], List[Any]], max_batch: int = 64, max_wait_ms: float = 2.0,
                 on_batch: Optional[Callable[[int, float], None]] = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    def start(self) -> None:
        """Starts the batching task on the running event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="unirec-model")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stops the task; jobs still queued get a RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, job: Any) -> Any:
        """Queues ``job`` and returns its result (or raises its exception)."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((job, fut))
        return await fut

    async def _collect(self) -> list:
        q = self._queue
        idle = q.empty()  # nothing waited while the last batch ran: the load is light, top the batch up
        batch = [await q.get()]
        while len(batch) < self.max_batch and not q.empty():
            batch.append(q.get_nowait())
        if idle and len(batch) < self.max_batch and self.max_wait > 0:
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(q.get(), left))
                except asyncio.TimeoutError:
                    break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            batch = [(job, fut) for job, fut in batch if not fut.done()]  # drop requests already gone
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [job for job, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the batch function failed as a whole
                results = [exc] * len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)
            for (_, fut), res in zip(batch, results):
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
