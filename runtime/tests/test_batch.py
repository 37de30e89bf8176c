"""Continuous batching (batch.py, engine.py): sequences join a running batch between steps, each in
a KV row of its own, and leave it; a request's output does not depend on what runs beside it; rows
are reused, buffers grow, a cancelled request frees its row; the prefix cache gives the same output."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from signround_runtime import Model, Sampling
from signround_runtime.batch import POSITION_STEP, PrefixCache
from signround_runtime.engine import Engine, Job

from conftest import rtn_checkpoint
from signround_export.checkpoint.read import read_checkpoint
from signround_export.export.onnx.build import export_onnx

GREEDY = Sampling()
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [200], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]


@pytest.fixture(scope="module")
def model(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("batch")
    ckpt = read_checkpoint(rtn_checkpoint(tiny_model, base / "ckpt", bits=4, group_size=32))
    export_onnx(ckpt, base / "onnx", accuracy_level=0)
    return Model(base / "onnx", threads=2)


def alone(model, prompt, n, sampling=GREEDY):
    return model.generate([prompt], n, sampling, stop_ids=set()).tokens[0]


def run_out(batch, seqs):
    """Step until every sequence in seqs has ended, each leaving as it ends."""
    while any(s in batch.running for s in seqs):
        for s in [s for s in batch.running if s.finish]:
            batch.leave(s)
        batch.step()
        for s in [s for s in batch.running if s.finish]:
            batch.leave(s)


def test_a_late_sequence_joins_between_steps_and_outputs_do_not_depend_on_company(model):
    seeded = Sampling(temperature=1.0, top_k=20, seed=5)
    want = [alone(model, p, 20) for p in PROMPTS] + [alone(model, PROMPTS[0], 20, seeded)]
    batch = model.batch(8, stop_ids=set())
    first = batch.join(PROMPTS[0], 20, GREEDY)
    for _ in range(5):
        batch.step()
    late = [batch.join(p, 20, GREEDY) for p in PROMPTS[1:]] + [batch.join(PROMPTS[0], 20, seeded)]
    assert all(len(s.tokens) == 1 for s in late) and len(first.tokens) == 6  # a first token while first runs
    batch.step()
    assert len(first.tokens) == 7 and all(len(s.tokens) == 2 for s in late)  # the next step runs them all
    run_out(batch, [first] + late)
    assert [s.tokens for s in [first] + late] == want
    assert batch.running == [] and batch.kv == []  # the buffers go with the last sequence


def test_rows_are_reused_and_the_last_row_moves_into_a_freed_one(model):
    batch = model.batch(2, stop_ids=set())
    a = batch.join(PROMPTS[1], 30, GREEDY)
    b = batch.join(PROMPTS[2], 4, GREEDY)
    for _ in range(3):
        batch.step()
    assert b.finish == "length" and batch.rows == 2
    buffers = batch.kv
    batch.leave(a)  # row 0 frees: b moves into it
    assert batch.running == [b]
    c = batch.join(PROMPTS[3], 4, GREEDY)  # takes row 1, in the same buffers
    assert batch.running == [b, c] and batch.kv is buffers
    with pytest.raises(RuntimeError, match="rows are taken"):
        batch.join(PROMPTS[0], 4, GREEDY)
    batch.leave(b)
    run_out(batch, [c])
    assert c.tokens == alone(model, PROMPTS[3], 4)


def test_buffers_grow_for_a_longer_joiner_and_keep_the_running_rows(model):
    batch = model.batch(4, stop_ids=set())
    short = batch.join(PROMPTS[0], 10, GREEDY)
    assert (batch.rows, batch.positions) == (1, POSITION_STEP)
    for _ in range(4):
        batch.step()
    long = batch.join(PROMPTS[3], 100, GREEDY)  # 12 + 100 positions: more than the buffers hold
    assert batch.rows == 2 and batch.positions == 2 * POSITION_STEP
    third = batch.join(PROMPTS[2], 5, GREEDY)
    assert batch.rows == 4  # rows double
    run_out(batch, [short, long, third])
    assert short.tokens == alone(model, PROMPTS[0], 10) and long.tokens == alone(model, PROMPTS[3], 100)
    assert third.tokens == alone(model, PROMPTS[2], 5)
    big = model.batch(1, stop_ids=set())
    big.join([1] * 300, model.context_length - 300, GREEDY)
    assert big.positions == model.context_length  # rounded up, never past the context
    with pytest.raises(ValueError, match="exceeds the context length"):
        model.batch(1).join([1] * 300, model.context_length - 299, GREEDY)


def test_prefix_reuse_gives_the_same_kv_and_tokens(model):
    system = [9, 8, 7, 6, 5, 4, 3, 2, 11, 12, 13, 14, 15, 16, 17, 18]
    one, two = system + [40, 41, 42], system + [50, 51]
    cache = PrefixCache(1 << 20)
    batch = model.batch(2, stop_ids=set(), cache=cache)
    a = batch.join(one, 12, GREEDY)
    assert a.reused == 0 and len(cache.entries) == 1
    b = batch.join(two, 12, GREEDY)
    assert b.reused == len(system) and cache.hits == 1
    fresh = model.batch(1, stop_ids=set())
    f = fresh.join(two, 12, GREEDY)
    # the row's KV after a prefill on the reused prefix, against a prefill of the whole prompt: measured
    # bit-identical here (onnxruntime 1.32, accuracy level 0); within float tolerance is what is asserted
    for mine, theirs in zip(batch.kv, fresh.kv):
        np.testing.assert_allclose(mine[1, :, : len(two)], theirs[0, :, : len(two)], rtol=1e-5, atol=1e-5)
    run_out(batch, [a, b])
    run_out(fresh, [f])
    assert a.tokens == alone(model, one, 12) and b.tokens == f.tokens == alone(model, two, 12)
    c = model.batch(1, stop_ids=set(), cache=cache).join(two, 12, GREEDY)  # the same prompt again
    assert c.reused == len(two) - 1 and c.tokens == f.tokens[:1]  # one token is left to prefill, for its logits


def test_prefix_cache_keeps_recent_prompts_within_its_bytes():
    kv = lambda n: [np.zeros((2, n + 7, 16), dtype=np.float32)] * 4  # noqa: E731  (512 bytes a token; rows longer)
    cache = PrefixCache(max_bytes=512 * 25)
    cache.add([1, 2, 3], kv(3))
    cache.add([1, 2, 3, 4, 5], kv(5))  # the first is a prefix of it: replaced
    assert list(cache.entries) == [(1, 2, 3, 4, 5)]
    cache.add([7] * 10, kv(10))
    assert cache.longest([1, 2, 3, 9])[0] == 3  # and (1, 2, 3, 4, 5) becomes the most recent
    cache.add([8] * 12, kv(12))  # over 25 tokens: the least recently used, [7] * 10, goes
    assert list(cache.entries) == [(1, 2, 3, 4, 5), (8,) * 12] and cache.bytes == 512 * 17
    assert cache.entries[(8,) * 12].shape == (4, 2, 12, 16)  # the prompt's positions only
    cache.add([6] * 30, kv(30))  # larger than the whole cache: not kept
    assert (6,) * 30 not in cache.entries and cache.bytes == 512 * 17
    cache.add([8] * 12, kv(12))  # kept already: only made the most recent
    assert list(cache.entries)[-1] == (8,) * 12 and cache.bytes == 512 * 17
    assert cache.longest([5, 5])[0] == 0 and cache.longest([1])[0] == 0  # one token is always left


def run_engine(engine, jobs_and_times):
    """Submit each job at its time (s after start); the monotonic times of each job's events."""

    async def main():
        loop = asyncio.get_running_loop()

        async def one(make, at):
            await asyncio.sleep(at)
            job = make(loop)
            engine.submit(job)
            events = []
            while True:
                e = await job.events.get()
                events.append((time.monotonic(), *e))
                if e[0] in ("done", "error"):
                    return job, events
                if e[0] == "text" and getattr(job, "cancel_after", None) == len(events):
                    job.cancel()
                    return job, events

        return await asyncio.gather(*(one(make, at) for make, at in jobs_and_times))

    return asyncio.run(main())


class SlowBatch:
    """The model, every decode step of its batch taking `delay` s more."""

    def __init__(self, model, delay):
        self.model, self.delay = model, delay

    def __getattr__(self, name):
        return getattr(self.model, name)

    def batch(self, max_rows, stop_ids=None, cache=None):
        batch = self.model.batch(max_rows, set(), cache)
        step = batch.step
        batch.step = lambda: (time.sleep(self.delay), step())[1]
        return batch


def test_a_late_request_streams_before_the_running_one_ends(model):
    engine = Engine(SlowBatch(model, 0.01), max_queue=4, max_batch=4)
    try:
        long = lambda loop: Job(PROMPTS[1], 200, GREEDY, [], loop)  # noqa: E731  (about 2 s)
        late = lambda loop: Job(PROMPTS[2], 8, GREEDY, [], loop)  # noqa: E731
        (_, first), (_, second) = run_engine(engine, [(long, 0), (late, 0.3)])
    finally:
        engine.stop()
    assert first[-1][1] == "done" and second[-1][1] == "done"
    assert second[-1][0] < first[-1][0] - 1.0  # the late one has finished long before the first
    assert "".join(e[2] for e in second if e[1] == "text") == model.decode(alone(model, PROMPTS[2], 8))
    assert engine.largest_batch == 2


def test_a_cancelled_request_frees_its_row_for_the_next(model):
    engine = Engine(SlowBatch(model, 0.01), max_queue=4, max_batch=1)
    try:
        def cancelled(loop):
            job = Job(PROMPTS[1], 400, GREEDY, [], loop)  # 4 s if it ran to the end
            job.cancel_after = 3
            return job

        waiting = lambda loop: Job(PROMPTS[0], 5, GREEDY, [], loop)  # noqa: E731
        t0 = time.monotonic()
        (_, gone), (_, served) = run_engine(engine, [(cancelled, 0), (waiting, 0.05)])
    finally:
        engine.stop()
    assert served[-1][1] == "done" and served[-1][0] - t0 < 2.0
    assert engine.batch.running == [] and engine.running is None


class FailingOnce:
    """The model, its batch's first decode step failing."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def batch(self, max_rows, stop_ids=None, cache=None):
        batch, failed = self.model.batch(max_rows, set(), cache), []
        step = batch.step

        def failing():
            if not failed:
                failed.append(True)
                raise RuntimeError("the step failed")
            step()

        batch.step = failing
        return batch


def test_a_failed_step_reaches_the_running_requests_and_the_worker_goes_on(model):
    engine = Engine(FailingOnce(model), max_queue=4, max_batch=4)
    try:
        make = lambda loop: Job(PROMPTS[0], 6, GREEDY, [], loop)  # noqa: E731
        (_, failed), = run_engine(engine, [(make, 0)])
        (_, served), = run_engine(engine, [(make, 0)])
    finally:
        engine.stop()
    assert failed[-1][1] == "error" and "the step failed" in str(failed[-1][2])
    assert served[-1][1] == "done" and engine.batch.running == [] and engine.batch.kv == []
    assert "".join(e[2] for e in served if e[1] == "text") == model.decode(alone(model, PROMPTS[0], 6))
