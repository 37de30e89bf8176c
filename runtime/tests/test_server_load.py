"""The server under load: 8 clients x 25 requests, chat and completion, streaming and not, some
clients hanging up mid-stream. No 5xx but a deliberate 503, no request left unanswered, every answer
equal to the runtime's own, and the process's threads and memory flat across the run."""

from __future__ import annotations

import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_server import CHAT, chat_ids, expected, folder, live, model  # noqa: E402,F401

CLIENTS, REQUESTS = 8, 25
TIMEOUT = 30  # seconds: an answer (or its first streamed byte) later than this counts as a hang
PROMPTS = ["The quick", "def f(x):", "Quantization", "rounding offsets"]
# Growth allowed from the warm-up to the end. Threads: the event loop's worker pool (anyio) starts a
# thread whenever all of its threads are busy and retires idle ones only after 10 s, so how many it
# holds after a run depends on how the calls overlapped; they are counted apart and may number at
# most one per client (each client has one call at a time) plus one. Every other thread of the
# process (uvicorn's, the engine's worker, onnxruntime's) must be exactly as many. Memory:
# allocator arenas and the tokenizer's caches settle within a few MB; a leak of a batch's cache or
# logits per request, 200 times, would pass this by far.
POOL_THREADS_ALLOWED = CLIENTS + 1
RSS_ALLOWED_MB = 24


HANG_UP_TOKENS = 480  # what a stream that is hung up asks for: left running, it makes 480 tokens


class Counted:
    """The model, counting the tokens of each sequence the server's batch runs."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def batch(self, max_rows, stop_ids=None, cache=None):
        batch = self.model.batch(max_rows, stop_ids, cache)
        leave = batch.leave

        def counted(seq):
            self.steps.append(len(seq.tokens))
            leave(seq)

        batch.leave = counted
        return batch


def threads_and_rss_mb() -> tuple[int, int, float]:
    """The process's threads other than the event loop's worker pool, the pool's, and the RSS in MB."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    pool = sum(t.name == "AnyIO worker thread" for t in threading.enumerate())
    return int(status["Threads"]) - pool, pool, int(status["VmRSS"].split()[0]) / 1024


def settled(app_server, seconds=10) -> bool:
    deadline = time.monotonic() + seconds
    while app_server.engine.running is not None or app_server.engine.jobs.qsize():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Tally:
    def __init__(self):
        self.statuses, self.hangs, self.wrong, self.hung_up = {}, [], [], 0

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1


def one_request(http: httpx.Client, k: int, i: int, want: dict, tally: Tally) -> None:
    """Request i of client k: completion or chat, whole or streamed, or a stream cut after one chunk."""
    shape = (k + i) % 5
    prompt = PROMPTS[(k + i) % len(PROMPTS)]
    chat = shape in (1, 3)
    body = ({"messages": CHAT} if chat else {"prompt": prompt}) | {"max_tokens": 8, "temperature": 0}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    ok = want["chat"] if chat else want[prompt]
    try:
        if shape in (0, 1):
            r = http.post(path, json=body)
            tally.status(r.status_code)
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                got = choice["message"]["content"] if chat else choice["text"]
                tally.wrong += [] if got == ok else [(k, i, got, ok)]
            return
        long = shape == 4  # long enough to still be running when the client hangs up
        streamed = {**body, "stream": True} | ({"max_tokens": HANG_UP_TOKENS} if long else {})
        with http.stream("POST", path, json=streamed) as r:
            tally.status(r.status_code)
            if r.status_code != 200:
                r.read()
                return
            pieces = []
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                if long:
                    tally.hung_up += 1
                    return  # leaving the block closes the connection mid-stream
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice["delta"].get("content", "") if chat else choice["text"])
            got = "".join(pieces)
            tally.wrong += [] if got == ok else [(k, i, got, ok)]
    except httpx.TimeoutException:
        tally.hangs.append((k, i))


def run_clients(base: str, requests: int, want: dict) -> Tally:
    tally = Tally()

    def client(k):
        with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            for i in range(requests):
                one_request(http, k, i, want, tally)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return tally


def test_eight_clients_with_hang_ups_no_errors_no_hangs_flat_threads_and_memory(model):  # noqa: F811
    want = {p: expected(model, model.encode(p), 8)[0] for p in PROMPTS}
    want["chat"] = expected(model, chat_ids(model), 8)[0]
    counted = Counted(model)
    with live(counted) as (base, _, app_server):
        warm = run_clients(base, 5, want)  # the worker pool's threads, allocator arenas, tokenizer caches
        assert settled(app_server) and warm.statuses.get(200) == CLIENTS * 5, warm.statuses
        gc.collect()
        threads0, pool0, rss0 = threads_and_rss_mb()
        t0 = time.monotonic()
        tally = run_clients(base, REQUESTS, want)
        seconds = time.monotonic() - t0
        assert settled(app_server), "the worker was still busy 10 s after every client had gone"
        gc.collect()
        threads1, pool1, rss1 = threads_and_rss_mb()
        largest_batch = app_server.engine.largest_batch

    answered = sum(tally.statuses.values())
    server_errors = {c: n for c, n in tally.statuses.items() if c >= 500 and c != 503}
    print(f"\n{CLIENTS}x{REQUESTS} requests in {seconds:.1f} s: {tally.statuses}, {tally.hung_up} hang-ups, "
          f"{len(tally.hangs)} hangs, largest batch {largest_batch}, longest sequence {max(counted.steps)} tokens; "
          f"threads {threads0} -> {threads1}, pool threads {pool0} -> {pool1}, "
          f"RSS {rss0:.1f} -> {rss1:.1f} MB")
    assert not tally.hangs, f"no answer within {TIMEOUT} s: {tally.hangs[:5]}"
    assert answered == CLIENTS * REQUESTS and not server_errors, tally.statuses
    assert tally.statuses.get(200, 0) >= CLIENTS * REQUESTS * 0.9, tally.statuses  # 503s only as a rare refusal
    assert tally.hung_up >= CLIENTS * REQUESTS // 5 * 0.9
    assert not tally.wrong, tally.wrong[:3]
    assert largest_batch > 1
    # a hung-up stream stops its generation, a few hundred steps of this tiny model later at most (the
    # event loop sees the closed socket while the worker runs on): few sequences run to the length that
    # only a hung-up stream asks for; left running, every hung-up one (a fifth of them) would
    full_length = sum(steps >= HANG_UP_TOKENS for steps in counted.steps)
    assert full_length <= len(counted.steps) // 10, sorted(counted.steps)[-12:]
    assert threads1 == threads0 and pool1 <= POOL_THREADS_ALLOWED, (threads0, threads1, pool0, pool1)
    assert rss1 <= rss0 + RSS_ALLOWED_MB, (rss0, rss1)
