"""One worker thread that owns the Model's batch and runs the requests, continuously batched.

Requests wait in a bounded queue; when it is full the server answers 503 instead of letting latency
grow without limit. Between two decode steps the worker admits what waits, up to max_batch running
sequences: each is prefilled alone into a free row of the batch's KV buffers and sends its first
token at once, then decodes with the others at the next step (batch.py). Decoding on a CPU is bound
by reading the weights, so a step for 8 sequences costs little more than a step for 1, and a
request never waits for another's whole generation, only for the running step and the prefills
admitted before it. A sequence that ends (stop, length, cancelled, client gone) frees its row for
the next waiting request. Each request gets its text back as events on its own asyncio queue (the
worker hands them over with call_soon_threadsafe).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from .batch import PrefixCache, Sequence
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


@dataclass
class Running:
    """A request admitted to the batch: its sequence and the text sent so far."""

    job: Job
    seq: Sequence
    text: TextStream
    started: float


class Engine:
    def __init__(self, model: Model, max_queue: int = 16, max_batch: int = 8, prefix_cache_mb: float = 64):
        """prefix_cache_mb: the KV of recent prompts kept for reuse by prompts that start the same (0: off)."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be 0 (off) or positive, got {prefix_cache_mb}")
        self.model, self.max_batch = model, max_batch
        self.cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb else None
        self.batch = model.batch(max_batch, cache=self.cache)
        self.active: list[Running] = []  # in the batch
        self.largest_batch = 0
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.draining = False
        self.cut_at = float("inf")  # monotonic time after which the running generations are cut
        self.job_seconds = 1.0  # moving average of a request's time in the batch, for Retry-After
        self.thread = threading.Thread(target=self._work, name="signround-engine", daemon=True)
        self.thread.start()

    @property
    def running(self) -> list[Job] | None:
        """The requests in the batch, None when there are none."""
        return [r.job for r in list(self.active)] or None

    # -- called from the event loop --------------------------------------------------------------

    def submit(self, job: Job) -> None:
        if self.draining:
            raise ShuttingDown()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            wait = self.job_seconds * (self.jobs.qsize() // self.max_batch + 1)
            raise QueueFull(retry_after=int(min(60, max(1, round(wait))))) from None

    def drain(self, grace: float) -> None:
        """Shutdown, step one: take no new work, refuse what waits, give the running ones `grace` s."""
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
        stopping = False
        while not stopping or self.active:
            if not stopping:
                stopping = self._admit()
            if self.active:
                self._step()

    def _admit(self) -> bool:
        """Start what waits while rows are free (waiting for one request when none runs); True once the
        stop sign has come."""
        while len(self.active) < self.max_batch:
            try:
                job = self.jobs.get(block=not self.active)
            except queue.Empty:
                return False
            if job is None:
                return True
            if not job.cancelled.is_set():
                self._start(job)
        return False

    def _start(self, job: Job) -> None:
        try:
            seq = self.batch.join(job.prompt, job.max_tokens, job.sampling)
        except Exception as e:  # a bad request the checks missed: it goes to its client, the worker lives on
            job.emit("error", e)
            return
        run = Running(job, seq, TextStream(self.model, job.stop), time.monotonic())
        self.active.append(run)
        self.largest_batch = max(self.largest_batch, len(self.active))
        self._deliver_or_fail(run)

    def _step(self) -> None:
        try:
            self.batch.step()
        except Exception as e:  # every running request gets the error, and the batch starts afresh
            for run in list(self.active):
                run.job.emit("error", e)
                self._end(run)
            return
        for run in list(self.active):
            self._deliver_or_fail(run)

    def _deliver_or_fail(self, run: Running) -> None:
        try:
            self._deliver(run)
        except Exception as e:  # its client gets the error; the others and the worker go on
            run.job.emit("error", e)
            if run in self.active:
                self._end(run)

    def _deliver(self, run: Running) -> None:
        """Send the sequence's latest token as text; end it if it is done, cancelled, stopped or cut."""
        job, seq = run.job, run.seq
        if job.cancelled.is_set():
            self._end(run)  # nobody listens: no events
            return
        if seq.last is not None:
            piece = run.text.push(seq.last)
            if piece:
                job.emit("text", piece)
        reason = "stop" if run.text.stopped else seq.finish
        if reason is None and time.monotonic() > self.cut_at:
            reason = "length"  # the server's own limit, at shutdown
        if reason is None:
            return
        if piece := run.text.flush():
            job.emit("text", piece)
        job.emit("done", reason, len(run.text.ids))
        self._end(run)

    def _end(self, run: Running) -> None:
        self.batch.leave(run.seq)
        self.active.remove(run)
        self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.monotonic() - run.started)
