"""Sequences decoding side by side, each in a row (a slot) of the batched KV buffers.

A sequence joins by a prefill of its prompt alone (batch 1), written straight into a free row: the
row is a contiguous [1, kv_heads, max_len, head_dim] view of each buffer, bound as past and present
of its own run. Every decode step then runs all rows at once; GroupQueryAttention writes each row's
token at that row's own length (attention mask sum - 1), so rows of any lengths step together. A
sequence that ends gives its row up: the last row moves into it, so the running rows stay 0..n-1
and a step binds only the [:n] views. The buffers grow (reallocated, the rows copied) when a joining
sequence needs more rows or positions than they hold, and are dropped when no sequence runs.

With a PrefixCache, the KV of recent prompts is kept: a prompt that starts like one of them gets the
common prefix's KV copied into its row and prefills only the rest on top of it (GroupQueryAttention
takes a prompt on a non-empty past at batch 1, each token placed after the past).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .sampling import Sampling, choose

POSITION_STEP = 64  # buffer lengths are rounded up to this, so a slightly longer joiner does not reallocate


@dataclass
class Sequence:
    """One prompt's decoding state."""

    prompt: list[int]
    limit: int  # new tokens at most
    sampling: Sampling
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)  # the new tokens, stop token excluded
    length: int = 0  # positions written in its KV row
    last: int | None = None  # the token of the latest step; None when it ended on a stop token
    finish: str | None = None  # "stop" or "length" once ended
    reused: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def need(self) -> int:
        """KV positions it can fill: the prompt and every new token but the last, which is never fed."""
        return len(self.prompt) + self.limit - 1

    def pick(self, logits: np.ndarray, stop_ids: set[int]) -> None:
        seen = np.asarray(self.prompt + self.tokens) if self.sampling.repetition_penalty != 1.0 else np.empty(0)
        tok = choose(logits, self.sampling, self.rng, seen)
        if tok in stop_ids:
            self.last, self.finish = None, "stop"
            return
        self.last = tok
        self.tokens.append(tok)
        if len(self.tokens) == self.limit:
            self.finish = "length"


class PrefixCache:
    """The KV of recent prompts, least recently used dropped first, within max_bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()  # [2 * layers, H, T, D]
        self.bytes = 0
        self.hits = self.reused_tokens = 0

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.bytes, "hits": self.hits,
                "reused_tokens": self.reused_tokens}

    def longest(self, prompt: list[int]) -> tuple[int, np.ndarray | None]:
        """The longest common prefix of prompt with a kept prompt, at most len(prompt) - 1 tokens (one is
        left to prefill, for its logits), and that entry's KV."""
        best, kv, key_best = 0, None, None
        ids = np.asarray(prompt)
        for key, value in self.entries.items():
            n = min(len(key), len(prompt) - 1)
            if n <= best:
                continue
            differ = np.flatnonzero(np.asarray(key[:n]) != ids[:n])
            common = int(differ[0]) if differ.size else n
            if common > best:
                best, kv, key_best = common, value, key
        if key_best is not None:
            self.entries.move_to_end(key_best)
            self.hits += 1
            self.reused_tokens += best
        return best, kv

    def add(self, prompt: list[int], rows: list[np.ndarray]) -> None:
        """Keep prompt's KV, copied from rows (each [kv_heads, positions, head_dim], key and value of every
        layer); kept prompts that are a prefix of it go (it answers for them too)."""
        key = tuple(prompt)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if sum(r[:, : len(prompt)].nbytes for r in rows) > self.max_bytes:
            return
        kv = np.stack([r[:, : len(prompt)] for r in rows])
        for old in [k for k in self.entries if len(k) <= len(key) and key[: len(k)] == k]:
            self.bytes -= self.entries.pop(old).nbytes
        self.entries[key] = kv
        self.bytes += kv.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1].nbytes


class Batch:
    """The running sequences of one model and their KV rows."""

    def __init__(self, model, max_rows: int, stop_ids: set[int] | None = None, cache: PrefixCache | None = None):
        self.model, self.max_rows, self.cache = model, max_rows, cache
        self.stop_ids = model.stop_ids if stop_ids is None else stop_ids
        self.running: list[Sequence] = []  # row i holds running[i]
        self.kv: list[np.ndarray] = []  # per layer, key then value: [rows, kv_heads, positions, head_dim]
        self._decode_io = None  # the binding of rows [:n], while n and the buffers stay

    @property
    def rows(self) -> int:
        return self.kv[0].shape[0] if self.kv else 0

    @property
    def positions(self) -> int:
        return self.kv[0].shape[2] if self.kv else 0

    def join(self, prompt: list[int], limit: int, sampling: Sampling) -> Sequence:
        """Prefill prompt into a free row and pick its first token (it may end there: see seq.finish)."""
        if len(self.running) >= self.max_rows:
            raise RuntimeError(f"all {self.max_rows} rows are taken: a sequence must leave first")
        if len(prompt) + limit > self.model.context_length:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {limit} new ones exceeds the context length "
                             f"{self.model.context_length}; shorten the prompt or ask for fewer tokens")
        seq = Sequence(list(prompt), limit, sampling, np.random.default_rng(sampling.seed))
        self._make_room(len(self.running) + 1, max([seq.need] + [s.need for s in self.running]))
        row = len(self.running)
        views = [buf[row: row + 1] for buf in self.kv]
        if self.cache is not None:
            seq.reused, kept = self.cache.longest(prompt)
            if seq.reused:
                for view, part in zip(views, kept):
                    view[0, :, : seq.reused] = part[:, : seq.reused]
        rest = np.asarray([prompt[seq.reused:]], dtype=np.int64)
        mask = np.ones((1, len(prompt)), dtype=np.int64)  # past + rest: GroupQueryAttention places rest after it
        logits = self.model._step(rest, mask, self.model._bind(views), np.array([rest.shape[1] - 1]))
        seq.length = len(prompt)
        if self.cache is not None:
            self.cache.add(prompt, [v[0] for v in views])
        self.running.append(seq)
        self._decode_io = None
        seq.pick(logits[0], self.stop_ids)
        return seq

    def step(self) -> None:
        """One decode step of every running sequence that has not ended: each gets its next token."""
        n = len(self.running)
        if n == 0:
            return
        if any(s.finish for s in self.running):
            raise RuntimeError("a sequence that has ended is still in its row: call leave() first")
        if self._decode_io is None:
            self._decode_io = self.model._bind([buf[:n] for buf in self.kv])
        lengths = np.array([s.length for s in self.running])
        ids = np.array([[s.last] for s in self.running], dtype=np.int64)
        mask = (np.arange(lengths.max() + 1)[None, :] <= lengths[:, None]).astype(np.int64)
        logits = self.model._step(ids, mask, self._decode_io, np.zeros(n, dtype=np.int64))
        for s, row in zip(self.running, logits):
            s.length += 1
            s.pick(row, self.stop_ids)

    def leave(self, seq: Sequence) -> None:
        """Free seq's row: the last row moves into it. The buffers go when no sequence is left."""
        row, last = self.running.index(seq), len(self.running) - 1
        if row != last:
            moved = self.running[last]
            for buf in self.kv:
                buf[row, :, : moved.length] = buf[last, :, : moved.length]
            self.running[row] = moved
        self.running.pop()
        self._decode_io = None
        if not self.running:
            self.kv = []

    def _make_room(self, rows: int, positions: int) -> None:
        """Buffers of at least rows x positions, the running rows copied over when they grow."""
        if rows <= self.rows and positions <= self.positions:
            return
        if rows > self.rows:  # doubled, so that joiners one by one reallocate log2(max_rows) times
            rows = max(rows, min(self.max_rows, 2 * self.rows))
        rows = max(rows, self.rows)
        positions = max(self.positions, min(self.model.context_length, -(-positions // POSITION_STEP) * POSITION_STEP))
        used = max((s.length for s in self.running), default=0)
        m = self.model
        grown = []
        for old in self.kv or [None] * (2 * m.layers):
            buf = np.zeros((rows, m.kv_heads, positions, m.head_size), dtype=np.float32)
            if old is not None:
                buf[: len(self.running), :, :used] = old[: len(self.running), :, :used]
            grown.append(buf)
        self.kv = grown
        self._decode_io = None
