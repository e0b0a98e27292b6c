"""A micro-batcher: requests that arrive together share one call of a batch function.

The batch function runs in one model thread (the model is not run concurrently with itself, and the
event loop stays free to accept requests meanwhile). The event loop hands a job over by appending it
to a deque and notifying a condition variable; the model thread takes everything queued (at most
``max_batch``), runs it, and hands the whole batch's results back with one
``call_soon_threadsafe``. Under load, requests queue up while the previous batch runs and the next
batch takes them all at once, so batches form without waiting. A lone request (``inline``: nothing
running or queued, and the model idle for longer than its last batch took, i.e. requests come
slower than the model answers them) runs in the caller's thread instead, without the two thread
hand-offs; the event loop waits for it, as the next request would have waited for that batch, and
the requests that arrived meanwhile find the model just busy and queue as usual. ``max_wait_ms`` > 0
still tops a batch that starts with an idle worker up for that long (fewer, larger batches at a
latency cost; off by default).

Bounds: :meth:`MicroBatcher.submit` raises :class:`QueueFull` at once (so that the caller can answer
429 rather than queue without bound) while ``max_queue`` jobs wait, or when a new job would be
answered later than ``max_latency_ms`` after the first job of its batch came: it waits for the rest
of the running batch, for the full batches queued ahead of it and for its own batch, each timed by
:class:`BatchCost` (a fixed plus a per-job time, fitted to the recent batches). Under overload this
admits the jobs that come late in the running batch and refuses the early ones, which would wait for
all of it, and it shrinks the batches as the machine slows down, so that the accepted jobs are
answered in about ``max_latency_ms`` whatever the load; a bound on the queue's length or on its head's
age alone lets the latency grow with the batch time. While the oldest queued job has waited
``max_latency_ms`` (a batch overran its estimate) new jobs are refused too. A job not answered
within ``timeout_ms`` of its submission raises :class:`DeadlineExceeded` (the model thread skips
jobs whose deadline has passed before it starts them).
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any, Callable, List, Optional, Sequence


class QueueFull(Exception):
    """A new job is refused: ``max_queue`` jobs wait already, or it would be answered too late."""


class DeadlineExceeded(Exception):
    """A job was not answered within its deadline."""


class MicroBatcher:
    """Collects jobs into batches for ``fn(jobs) -> results`` (one result or exception per job).

    on_batch(size, seconds): called after each batch (metrics), in the thread that ran it.
    inline: run a lone job in the caller's thread (see the module docstring; not with max_wait_ms).
    max_queue: jobs waiting at most; max_latency_ms: longest expected time from a job's arrival (or
    its batch's first job's) to its answer before new jobs are refused (see the module docstring);
    timeout_ms: each job's deadline (each None = no bound).
    """

    def __init__(self, fn: Callable[[Sequence[Any]], List[Any]], max_batch: int = 64, max_wait_ms: float = 0.0,
                 on_batch: Optional[Callable[[int, float], None]] = None, max_queue: Optional[int] = None,
                 timeout_ms: Optional[float] = None, max_latency_ms: Optional[float] = None, inline: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if timeout_ms is not None and timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {timeout_ms}")
        if max_latency_ms is not None and max_latency_ms <= 0:
            raise ValueError(f"max_latency_ms must be > 0, got {max_latency_ms}")
        self.max_latency = None if max_latency_ms is None else max_latency_ms / 1000.0
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.on_batch, self.max_queue = on_batch, max_queue
        self.timeout = None if timeout_ms is None else timeout_ms / 1000.0
        self._jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stopping = False
        self._last_batch_seconds = 0.0  # how long the last batch took
        self.inline = inline
        self._running = False           # a batch is running (in the model thread, or inline)
        self._idle_since = 0.0          # monotonic time the last batch ended
        self._started = 0.0             # monotonic time the running batch started
        self._running_size = 0          # jobs in the running batch
        self._cost = BatchCost()        # seconds a batch of n jobs takes, fitted to the recent batches

    @property
    def queued(self) -> int:
        """Jobs waiting for the model thread (not counting the batch it is running)."""
        return len(self._jobs)

    def full(self) -> Optional[str]:
        """Why a job submitted now would be refused (None: it would be queued)."""
        n = len(self._jobs)
        if self.max_queue is not None and n >= self.max_queue:
            return f"{n} requests are queued already"
        if self.max_latency is None or not (n or self._running):
            return None  # the model is idle: a new job starts at once
        now = time.monotonic()
        if n:
            try:
                waited = now - self._jobs[0][3]
            except IndexError:  # the model thread took the last one meanwhile
                return None
            if waited >= self.max_latency:  # the model is slower than its last batch said
                return f"the oldest queued request has waited {waited * 1000:.0f} ms"
        # A new job joins the last batch in the queue (or starts one), after the running batch and the full
        # batches ahead of it. That batch is answered when those are done and it has run (each timed by the
        # fit of the recent batches); every job in it, the oldest first, waits for it all.
        cost = self._cost
        ahead, pos = divmod(n, self.max_batch)
        left = max(0.0, self._started + cost(self._running_size) - now) if self._running else 0.0
        try:
            head_age = now - self._jobs[ahead * self.max_batch][3] if pos else 0.0
        except IndexError:  # the model thread took some meanwhile
            return None
        expected = head_age + left + ahead * cost(self.max_batch) + cost(pos + 1)
        if expected > self.max_latency:
            return (f"{n} requests are queued; with a new one, the last of them would be answered "
                    f"{expected * 1000:.0f} ms after it came")
        return None

    def start(self) -> None:
        """Starts the model thread; results are delivered on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="unirec-model", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stops the model thread after its current batch; jobs still queued get a RuntimeError."""
        with self._cv:
            self._stopping = True
            left = list(self._jobs)
            self._jobs.clear()
            self._cv.notify()
        for _, fut, _, _ in left:
            if not fut.done():
                fut.set_exception(RuntimeError("server shutting down"))
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    async def submit(self, job: Any) -> Any:
        """Queues ``job`` and returns its result (or raises its exception, QueueFull, DeadlineExceeded)."""
        if self._thread is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = self._loop
        fut = loop.create_future()
        now = time.monotonic()
        deadline = None if self.timeout is None else now + self.timeout
        with self._cv:
            why = self.full()
            if why is not None:
                raise QueueFull(why)
            # idle for longer than a batch takes: requests come slower than the model answers them
            alone = (self.inline and self.max_wait == 0 and not self._running and not self._jobs
                     and now - self._idle_since >= self._last_batch_seconds)
            if alone:
                self._running, self._started, self._running_size = True, now, 1
            else:
                self._jobs.append((job, fut, deadline, now))
                self._cv.notify()
        if alone:
            return self._run_inline(job)
        if deadline is None:
            return await fut
        timer = loop.call_later(self.timeout, _expire, fut, self.timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    def _run_inline(self, job: Any) -> Any:
        """Runs a lone job in the caller's thread (the event loop, blocked meanwhile: requests that arrive
        meanwhile wait for it as they would for the model thread's batch, and then queue as usual)."""
        t0 = time.perf_counter()
        try:
            result = self.fn([job])[0]
        except Exception as exc:  # noqa: BLE001 - the batch function failed as a whole
            result = exc
        finally:
            seconds = time.perf_counter() - t0
            self._done(seconds, 1)
        if self.on_batch is not None:
            self.on_batch(1, seconds)
        if isinstance(result, BaseException):
            raise result
        return result

    def _take(self) -> Optional[list]:
        """The next batch (None when stopping); blocks while there is nothing to do."""
        with self._cv:
            idle = not self._jobs  # nothing waited while the last batch ran: the load is light
            while (not self._jobs or self._running) and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            if idle and self.max_wait > 0:
                end = time.monotonic() + self.max_wait
                while len(self._jobs) < self.max_batch and not self._stopping:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            n = min(len(self._jobs), self.max_batch)
            self._running, self._started, self._running_size = True, time.monotonic(), n
            return [self._jobs.popleft() for _ in range(n)]

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            # requests already answered (deadline passed) are not run
            batch = [b for b in batch if b[2] is None or b[2] > now]
            if not batch:
                self._done(None, 0)
                continue
            t0 = time.perf_counter()
            try:
                results = self.fn([b[0] for b in batch])
            except Exception as exc:  # noqa: BLE001 - the batch function failed as a whole
                results = [exc] * len(batch)
            seconds = time.perf_counter() - t0
            self._done(seconds, len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)
            try:
                self._loop.call_soon_threadsafe(_deliver, [b[1] for b in batch], results)
            except RuntimeError:  # the loop is closed: nobody waits for these any more
                return


    def _done(self, seconds: Optional[float], size: int) -> None:
        """A batch of ``size`` jobs ended after ``seconds`` (None: it ran nothing); wakes the model thread
        for the jobs queued meanwhile (an inline batch ended)."""
        with self._cv:
            self._running, self._idle_since = False, time.monotonic()
            if seconds is not None:
                self._last_batch_seconds = seconds
                self._cost.add(size, seconds)
            if self._jobs:
                self._cv.notify()


class BatchCost:
    """Seconds a batch of n jobs takes, ``a + b n``, fitted by least squares to the recent batches
    (exponentially weighted, ``decay`` per batch, so that it follows the machine as it slows down or
    speeds up). A batch has a fixed cost (the model's per-call work) besides its per-job cost, so the
    time per job of a batch of one says little about a batch of 64. Batches all of one size give
    a = their time, b = 0 until other sizes come."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.w = self.s = self.t = self.ss = self.st = 0.0  # weighted count and sums of n, T, n^2, n T
        self.a = self.b = 0.0

    def add(self, n: int, seconds: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.s, self.t = d * self.s + n, d * self.t + seconds
        self.ss, self.st = d * self.ss + n * n, d * self.st + n * seconds
        mean_n, mean_t = self.s / self.w, self.t / self.w
        var = self.ss / self.w - mean_n * mean_n
        slope = (self.st / self.w - mean_n * mean_t) / var if var > 0.25 else 0.0
        self.b = max(slope, 0.0)
        self.a = max(mean_t - self.b * mean_n, 0.0)

    def __call__(self, n: int) -> float:
        return self.a + self.b * n


def _deliver(futures, results) -> None:
    for fut, res in zip(futures, results):
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


def _expire(fut: asyncio.Future, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded(f"not answered within {timeout * 1000:g} ms"))
