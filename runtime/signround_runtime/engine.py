"""One worker thread that owns the Model and runs queued requests in batches.

The Model allocates its KV cache per generate() call, so two generations must never overlap: a
single thread runs them in FIFO order. Whatever waits when a generation starts (up to max_batch
requests) runs as one batch: decoding on a CPU is bound by reading the weights, so a step for 8
sequences costs little more than a step for 1. Requests wait in a bounded queue; when it is full the server
answers 503 instead of letting latency grow without limit. Each request gets its text back as
events on its own asyncio queue (the worker hands them over with call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from .model import Model
from .sampling import Sampling
from .text import TextStream


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: its request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    def __init__(self):
        super().__init__("the server is shutting down; send the request again to another instance")


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    # Events: ("text", piece), ("done", finish_reason, completion_tokens), ("error", exception)
    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    def __init__(self, model: Model, max_queue: int = 16, max_batch: int = 8):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.held: Job | None = None  # taken from the queue but left for the next batch (context too small)
        self.largest_batch = 0
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.running: list[Job] | None = None
        self.draining = False
        self.cut_at = float("inf")  # monotonic time after which the running generation is cut
        self.job_seconds = 1.0  # moving average, for Retry-After
        self.thread = threading.Thread(target=self._work, name="signround-engine", daemon=True)
        self.thread.start()

    # -- called from the event loop --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.draining:
            raise ShuttingDown()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            wait = self.job_seconds * (self.jobs.qsize() + 1)
            raise QueueFull(retry_after=int(min(60, max(1, round(wait))))) from None

    def drain(self, grace: float) -> None:
        """Shutdown, step one: take no new work, refuse what waits, give the running one `grace` s."""
        self.draining = True
        self.cut_at = time.monotonic() + grace
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", ShuttingDown())

    def stop(self, timeout: float = 10.0) -> None:
        """Shutdown, step two: end the worker thread."""
        self.drain(grace=0.0)
        self.jobs.put(None)
        self.thread.join(timeout)

    # -- the worker thread -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job, self.held = self.held or self.jobs.get(), None
            if job is None:
                return
            batch = [job] if not job.cancelled.is_set() else []
            while len(batch) < self.max_batch and self.held is None:
                try:
                    more = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # stop: finish this batch first
                    self.jobs.put(None)
                    break
                if more.cancelled.is_set():
                    continue
                if batch and not self._fits(batch + [more]):
                    self.held = more
                    break
                batch.append(more)
            if not batch:
                continue
            self.running = batch
            self.largest_batch = max(self.largest_batch, len(batch))
            t0 = time.monotonic()
            try:
                self._run(batch)
            except Exception as e:  # a bad request the checks missed: it goes to its clients, the worker lives on
                for j in batch:
                    j.emit("error", e)
            finally:
                self.running = None
                self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.monotonic() - t0)

    def _fits(self, batch: list[Job]) -> bool:
        """The batch's cache (longest prompt + largest max_tokens) within the context."""
        return max(len(j.prompt) for j in batch) + max(j.max_tokens for j in batch) <= self.model.context_length

    def _run(self, batch: list[Job]) -> None:
        texts = [TextStream(self.model, j.stop) for j in batch]
        reasons: list[str | None] = [None] * len(batch)  # set when a sequence ends early

        def on_step(tokens):
            ended = []
            for b, (job, text, tok) in enumerate(zip(batch, texts, tokens)):
                if reasons[b] is not None:
                    continue
                if job.cancelled.is_set():
                    reasons[b] = "cancelled"
                elif tok is not None:
                    piece = text.push(tok)
                    if piece:
                        job.emit("text", piece)
                    if text.stopped:
                        reasons[b] = "stop"
                if reasons[b] is None and time.monotonic() > self.cut_at:
                    reasons[b] = "length"  # the server's own limit, at shutdown
                if reasons[b] is not None:
                    ended.append(b)
            return ended

        g = self.model.generate([j.prompt for j in batch], [j.max_tokens for j in batch],
                                [j.sampling for j in batch], on_step=on_step)
        for b, job in enumerate(batch):
            if reasons[b] == "cancelled":
                continue
            if piece := texts[b].flush():
                job.emit("text", piece)
            job.emit("done", reasons[b] or g.finish[b], len(texts[b].ids))
