"""An exported folder (model.onnx, genai_config.json, tokenizer.json) loaded for generation.

The KV cache is one preallocated buffer per layer and kind, [batch, kv_heads, max_len, head_dim],
bound through IOBinding as both the past input and the present output: GroupQueryAttention writes
each step's keys and values in place at every sequence's own length, so nothing is concatenated or
copied per token. Each prompt is prefilled alone into its row of the buffers, then all rows decode
together (batch.py); the attention mask tells each row's length (GroupQueryAttention's seqlens_k =
mask sum - 1).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .batch import Batch, PrefixCache
from .manifest import damaged
from .sampling import Sampling


class RuntimeModelError(ValueError):
    """A folder that is not a usable exported model, or a request it cannot serve."""


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each prompt, stop token excluded
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finish: list[str] = field(default_factory=list)  # "stop" or "length" per prompt

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps * len(self.tokens) / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


class Model:
    def __init__(self, folder, threads: int | None = None, verify: bool = True):
        """The folder's model, tokenizer and config. verify: check every file against the folder's
        sha256sums.txt first (manifest.py) and refuse a damaged one: measured 0.17 s more on a 0.8 s load
        of SmolLM2-135M's 185 MB folder, so it is on by default."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        config_path = self.folder / "genai_config.json"
        for need in ("model.onnx", "genai_config.json", "tokenizer.json"):
            if not (self.folder / need).is_file():
                raise RuntimeModelError(f"{self.folder} has no {need}: give a folder written by "
                                        "`signround export onnx`")
        problem = damaged(self.folder) if verify else None
        if problem is not None:
            raise RuntimeModelError(problem)
        try:
            config = json.loads(config_path.read_text())["model"]
            self.decoder = config["decoder"]
            self.layers = int(self.decoder["num_hidden_layers"])
            self.kv_heads = int(self.decoder["num_key_value_heads"])
            self.head_size = int(self.decoder["head_size"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RuntimeModelError(f"{config_path} is damaged ({e!r})") from None
        self.context_length = int(config.get("context_length", 2048))
        self.vocab_size = int(config.get("vocab_size", 0))
        eos = config.get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = int(config.get("pad_token_id") or 0)
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tconfig = self.folder / "tokenizer_config.json"
        self.tokenizer_config = json.loads(tconfig.read_text()) if tconfig.is_file() else {}

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.folder / "model.onnx"), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            raise RuntimeModelError(f"onnxruntime cannot load {self.folder / 'model.onnx'}: "
                                    f"{str(e).splitlines()[0][-200:]}") from None
        self._ort = ort
        width = {o.name: o.shape for o in self.session.get_outputs()}.get("logits", [None])[-1]
        if not isinstance(width, int):
            raise RuntimeModelError(f"{self.folder / 'model.onnx'} has no logits output of a fixed vocabulary size")
        self.logits_width = width
        self._logits = np.empty(0, dtype=np.float32)
        self._busy = threading.Lock()  # one run at a time: runs share the logits buffer

    # -- text ------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of text as written: the tokenizer's post-processor adds no BOS or EOS of its own."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict], **template_kwargs) -> str:
        """The chat template's text for messages, ending with the assistant's turn opened."""
        from .chat import render

        return render(self.folder, self.tokenizer_config, messages, **template_kwargs)

    def chat_ids(self, messages: list[dict], **template_kwargs) -> list[int]:
        """The prompt's token ids, as transformers' apply_chat_template(tokenize=True) makes them: the
        template writes the special tokens it wants (BOS included), so encoding adds none (no second BOS)."""
        return self.encode(self.chat_prompt(messages, **template_kwargs))

    # -- generation ------------------------------------------------------------------------------

    def batch(self, max_rows: int, stop_ids: set[int] | None = None, cache: PrefixCache | None = None) -> Batch:
        """Sequences that join and leave a running batch between steps (batch.py): what the server runs."""
        return Batch(self, max_rows, stop_ids, cache)

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int] = 128,
                 sampling: Sampling | list[Sampling] | None = None, stop_ids: set[int] | None = None,
                 on_step: Callable[[list[int | None]], Iterable[int] | None] | None = None) -> Generation:
        """New tokens for each prompt (token ids). max_new_tokens and sampling may differ per prompt (a
        list), each prompt sampling from its own seed. on_step gets every step's token per prompt (None
        for prompts that have finished) and may return the indices of prompts to end there ("stop")."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        samplings = sampling if isinstance(sampling, list) else [sampling or Sampling()] * len(prompts)
        self._check_request(prompts, limits, samplings)
        batch = self.batch(len(prompts), stop_ids)
        out = Generation(tokens=[], prompt_tokens=sum(map(len, prompts)))
        t0 = time.perf_counter()
        seqs = [batch.join(p, n, s) for p, n, s in zip(prompts, limits, samplings)]  # each prefilled alone
        out.prefill_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        while True:
            for b in (on_step([s.last for s in seqs]) if on_step else None) or ():
                seqs[b].finish = seqs[b].finish or "stop"
            for s in seqs:
                if s.finish and s in batch.running:
                    batch.leave(s)
                if s.finish:
                    s.last = None  # a finished sequence shows None from the next step on
            if not batch.running:
                break
            batch.step()
            out.decode_steps += 1
        out.decode_seconds = time.perf_counter() - t1
        out.tokens, out.finish = [s.tokens for s in seqs], [s.finish for s in seqs]
        return out

    def _check_request(self, prompts: list[list[int]], limits: list[int], samplings: list[Sampling]) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeModelError("every prompt needs at least one token")
        if len(limits) != len(prompts) or len(samplings) != len(prompts):
            raise RuntimeModelError("give one max_new_tokens and one sampling per prompt, or one for all")
        for s in samplings:
            s.check()
        if min(limits) < 1:
            raise RuntimeModelError(f"max_new_tokens must be at least 1, got {min(limits)}")
        if self.vocab_size and any(t < 0 or t >= self.vocab_size for p in prompts for t in p):
            raise RuntimeModelError(f"token ids must lie in 0..{self.vocab_size - 1}")
        longest = max(len(p) for p in prompts)
        if longest + max(limits) > self.context_length:
            raise RuntimeModelError(f"prompt of {longest} tokens plus {max(limits)} new ones exceeds "
                                    f"the context length {self.context_length}")

    def stream(self, prompt: list[int], max_new_tokens: int = 128, sampling: Sampling | None = None) -> Iterator[str]:
        """Text pieces of one prompt's reply as they are generated (whole characters only)."""
        import queue

        from .text import TextStream

        pieces: queue.Queue = queue.Queue()
        text = TextStream(self, stop=[])

        def on_step(tokens):
            if tokens[0] is not None:
                pieces.put(text.push(tokens[0]))

        result = {}

        def work():
            try:
                result["gen"] = self.generate([prompt], max_new_tokens, sampling, on_step=on_step)
                pieces.put(text.flush())
            except BaseException as e:  # handed to the consumer
                result["error"] = e
            pieces.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        while (piece := pieces.get()) is not None:
            if piece:
                yield piece
        thread.join()
        if "error" in result:
            raise result["error"]
        self.last_generation = result["gen"]

    # -- onnxruntime -----------------------------------------------------------------------------

    def logits(self, ids) -> np.ndarray:
        """float32 logits [T, vocab] at every position of one sequence of token ids, run at once from an
        empty cache: what validation compares with the PyTorch reference."""
        ids = np.asarray(ids, dtype=np.int64)[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), dtype=np.float32)
        for i in range(self.layers):
            for kind in ("key", "value"):
                feeds[self.decoder["inputs"][f"past_{kind}_names"] % i] = empty
        return self.session.run([self.decoder["outputs"]["logits"]], feeds)[0][0]

    def _bind_cache(self, batch: int, max_len: int):
        """Fresh KV buffers [batch, kv_heads, max_len, head_size] and their binding (_bind). The buffers
        are returned too: the binding points at their memory without keeping them alive."""
        shape = (batch, self.kv_heads, max_len, self.head_size)
        buffers = [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.layers)]
        return self._bind(buffers), buffers

    def _bind(self, buffers: list[np.ndarray]):
        """An IOBinding with each layer's KV buffer (key, value, layer after layer; contiguous arrays or
        views, whose memory onnxruntime uses in place) bound as both its past input and its present
        output; each run then binds only the tokens, the mask and the logits."""
        io = self.session.io_binding()
        names = self.decoder["inputs"], self.decoder["outputs"]
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                buf = self._ort.OrtValue.ortvalue_from_numpy(buffers[2 * i + j])
                io.bind_ortvalue_input(names[0][f"past_{kind}_names"] % i, buf)
                io.bind_ortvalue_output(names[1][f"present_{kind}_names"] % i, buf)
        return io

    def _step(self, ids: np.ndarray, mask: np.ndarray, io, positions: np.ndarray) -> np.ndarray:
        """One run; the logits [batch, vocab] at each sequence's position in ids."""
        # The logits land in a buffer of ours, reused across runs (fetching onnxruntime's outputs would
        # wrap every KV buffer too, and a fresh prompt-sized buffer costs page faults every prefill).
        with self._busy:
            size = ids.size * self.logits_width
            if self._logits.size < size:
                self._logits = np.empty(size, dtype=np.float32)
            logits = self._logits[:size].reshape(*ids.shape, self.logits_width)
            io.bind_cpu_input("input_ids", ids)
            io.bind_cpu_input("attention_mask", mask)
            io.bind_ortvalue_output("logits", self._ort.OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(io)
            return logits[np.arange(len(ids)), positions]  # a copy: the buffer is overwritten next run
