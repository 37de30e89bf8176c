"""One worker thread that owns the Model and runs queued requests one at a time.

The Model allocates its KV cache per generate() call, so two generations must never overlap: a
single thread runs them in FIFO order. Requests wait in a bounded queue; when it is full the server
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


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: its request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    def __init__(self):
        super().__init__("the server is shutting down; send the request again to another instance")


class _Cancelled(Exception):
    """Raised from on_step to end a generation whose client has gone."""


class _Finished(Exception):
    """Raised from on_step to end a generation early (a stop sequence, or the shutdown deadline)."""

    def __init__(self, reason: str):
        self.reason = reason


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


class TextStream:
    """Token ids in, text pieces out: whole characters only, and stop sequences cut.

    Text that could be the start of a stop sequence is held back until it is clear it is not one,
    so a client never sees part of a stop sequence."""

    def __init__(self, model: Model, stop: list[str]):
        self.model, self.stop = model, stop
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.sent = 0  # how much of self.text has been handed out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.model.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        self.text = text
        if not self.stop:
            return self._take(len(text))
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = text[: min(hits)]
            return self._take(len(self.text))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def flush(self) -> str:
        """The rest, at the end: held-back text, and bytes that never formed a whole character."""
        if not self.stopped:
            self.text = self.model.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent: max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece


class Engine:
    def __init__(self, model: Model, max_queue: int = 16):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.model = model
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.running: Job | None = None
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
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            self.running = job
            t0 = time.monotonic()
            try:
                self._run(job)
            except Exception as e:  # a bad request the checks missed: it goes to its client, the worker lives on
                job.emit("error", e)
            finally:
                self.running = None
                self.job_seconds = 0.8 * self.job_seconds + 0.2 * (time.monotonic() - t0)

    def _run(self, job: Job) -> None:
        text = TextStream(self.model, job.stop)

        def on_step(tokens):
            if job.cancelled.is_set():
                raise _Cancelled()
            if tokens[0] is not None:
                piece = text.push(tokens[0])
                if piece:
                    job.emit("text", piece)
                if text.stopped:
                    raise _Finished("stop")
            if time.monotonic() > self.cut_at:
                raise _Finished("length")  # the server's own limit, at shutdown

        try:
            g = self.model.generate([job.prompt], job.max_tokens, job.sampling, on_step=on_step)
            reason = g.finish[0]
        except _Cancelled:
            return
        except _Finished as f:
            reason = f.reason
        if piece := text.flush():
            job.emit("text", piece)
        job.emit("done", reason, len(text.ids))
