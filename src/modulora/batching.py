"""The batching worker behind ``modulora serve``: one thread owns the model.

Requests become ``Job``s on a queue. The worker takes the first job, waits up to the
batching window for more (at most ``max_batch``), groups them by sampling settings
(and by whether they name a task), and runs one ``generate_batch`` per group, rows
of different tasks together. Each new token goes back to its request's event loop
with ``call_soon_threadsafe``, so the HTTP side never waits on generation; a job
whose request is gone ends its row at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from .generate import LoadedRun, Sampling, generate_batch

log = logging.getLogger("modulora.serve")


@dataclass(frozen=True)
class Done:
    tokens: int  # new tokens the row made (the end token not counted)


@dataclass(frozen=True)
class Failed:
    message: str


@dataclass
class Job:
    """One request's row: what to generate, and the asyncio queue its tokens go to."""

    prompt: list[int]
    task: str | None
    max_tokens: int
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the request is gone (or has its answer): skip it if not started

    def send(self, item: int | Done | Failed) -> None:
        """Hand ``item`` to the request's event loop (called from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class Call:
    """Other work on the model (scoring log-probs), run on the worker thread between
    batches; its result (or exception) resolves ``future`` on the request's loop."""

    fn: Callable[[], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def run(self) -> None:
        try:
            result, error = self.fn(), None
        except Exception as exc:  # handed to the request, which answers with an error
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self.loop.call_soon_threadsafe(self._resolve, result, error)

    def _resolve(self, result, error) -> None:
        if self.future.done():  # the request is gone
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


@dataclass
class Stats:
    """What the worker ran, for /health, tests and benchmarks (written under ``lock``)."""

    batches: int = 0
    requests: int = 0
    failed_batches: int = 0
    sizes: Counter = field(default_factory=Counter)  # batch size -> number of batches
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict:
        with self.lock:
            mean = self.requests / self.batches if self.batches else 0.0
            sizes = {str(k): v for k, v in sorted(self.sizes.items())}
            return dict(batches=self.batches, requests=self.requests, mean_batch_size=mean,
                        failed_batches=self.failed_batches, batch_sizes=sizes)  # fmt: skip


class Worker:
    """The one thread that runs the model: collects queued jobs into batches, generates."""

    def __init__(self, loaded: LoadedRun, max_batch: int = 8, batch_window_ms: float = 10.0):
        if max_batch < 1 or batch_window_ms < 0:
            raise ValueError("max_batch must be >= 1 and batch_window_ms >= 0")
        self.loaded, self.max_batch, self.window = loaded, max_batch, batch_window_ms / 1000
        self.jobs: queue.Queue[Job | Call | None] = queue.Queue()
        self.stats = Stats()
        self.thread = threading.Thread(target=self._run, name="modulora-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job | Call) -> None:
        self.jobs.put(job)

    async def call(self, fn: Callable[[], object]):
        """Run ``fn()`` on the model's thread, in turn with the batches; await its result."""
        loop = asyncio.get_running_loop()
        call = Call(fn, loop, loop.create_future())
        self.submit(call)
        return await call.future

    def stop(self) -> None:
        """Finish the batch being collected or run, then end the thread."""
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            if isinstance(first, Call):
                first.run()
                continue
            batch, deadline, stopping, calls = [first], time.monotonic() + self.window, False, []
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(deadline - time.monotonic(), 1e-6))
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if isinstance(job, Call):
                    calls.append(job)  # after this batch, in the order they came
                else:
                    batch.append(job)
            # a batch's rows either all name a task or none does (the run's own routing)
            groups: dict[tuple[Sampling, bool], list[Job]] = {}
            for job in batch:
                if not job.cancelled:
                    groups.setdefault((job.sampling, job.task is None), []).append(job)
            for group in groups.values():
                self._generate(group)
            for call in calls:
                call.run()
            if stopping:
                return

    def _generate(self, group: list[Job]) -> None:
        """One ``generate_batch`` call; an exception fails this group's requests only."""
        loaded = self.loaded
        tasks = None if group[0].task is None else [j.task for j in group]
        try:
            rows = generate_batch(
                loaded.model, loaded.tokenizer, [j.prompt for j in group], tasks,
                [j.max_tokens for j in group], group[0].sampling,
                on_token=lambda row, token: group[row].send(token) or group[row].cancelled,
            )  # fmt: skip
        except Exception as exc:
            log.exception("generation failed for a batch of %d", len(group))
            with self.stats.lock:
                self.stats.failed_batches += 1
            for job in group:
                job.send(Failed(f"generation failed: {type(exc).__name__}: {exc}"))
            return
        with self.stats.lock:
            self.stats.batches += 1
            self.stats.requests += len(group)
            self.stats.sizes[len(group)] += 1
        for job, row in zip(group, rows, strict=True):
            job.send(Done(len(row)))
