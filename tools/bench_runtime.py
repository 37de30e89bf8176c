"""Prefill and decode speed of our ONNX export in the runtime against a GGUF file in llama.cpp, measured
by a harness that is neither engine's own generate loop.

    .venv/bin/python tools/bench_runtime.py --onnx out/bench-speed/w4g32s-onnx --gguf out/bench-speed/q4_0.gguf \
        [--prompts 32,256,1024] [--new 128] [--threads 1,2] [--rounds 5] [--json out/bench-speed/neutral.json]
    .venv/bin/python tools/bench_runtime.py --sizes models/smollm2-135m-instruct   # which files weigh the same

Why each choice is fair to both sides:
- The same token ids. The parent tokenizes the text once (the ONNX folder's tokenizer.json, no special
  tokens added) and hands each child the first P ids; neither engine tokenizes. The GGUF must hold the
  same vocabulary (its size is checked).
- A fresh process per measurement (load, warm-up, one timed run), so neither inherits the other's
  caches or allocator state. Rounds alternate the engines and flip their order every round (A B, B A,
  ...), so drift on a shared machine falls on both; each cell reports the median and the spread.
- The same threads: llama.cpp's n_threads and n_threads_batch, onnxruntime's intra-op threads; both
  keep their own default of spinning between steps.
- A warm-up before the timed run: the same prefill and 8 decode steps, untimed. It pages in llama.cpp's
  memory-mapped weights (onnxruntime reads its weights at load) and lets both allocate their buffers.
- The lowest-overhead API of each, and nothing else in the timed region. llama.cpp: `Llama.eval` of
  the whole prompt as one batch (n_batch = n_ubatch = P, as ours runs the prompt in one session run),
  then one `eval` per decoded token. Ours: the runtime's own step (Model._step: one session run
  through the IOBinding that holds every layer's KV buffer as both past and present, as generate()
  binds it), without generate()'s sampling and stop checks. Each timed region is the engine call
  alone: the greedy argmax (numpy over the last position's float32 logits, the same call for both)
  runs between the timed calls, so it is outside the timing for both, and so is making an empty
  cache (llama.cpp's at load, ours per run, as generate() does before its clock starts).
- Greedy decoding with no stop: the prompt's argmax, then --new single-token steps, so both run the
  same steps at the same positions; decode tok/s = new / the steps' summed time. The tokens chosen
  may differ where the two files' numbers differ (the JSON records how many agree from the start).
- The same context: each engine gets a cache of P + new positions (llama.cpp rounds its own up).
What is left as each engine ships it, and shows in the figures: llama.cpp's KV cache is float16 and
ours float32 (counted in each engine's roofline); llama.cpp computes the logits of the prompt's last
position only, our graph those of every prompt position (part of our prefill time);
--flash-attn picks llama.cpp's attention (off by default, as llama-cpp-python defaults).

Bytes read per decoded token, for the roofline: every stored tensor once, except lookup tables read one
row per token (the token embedding where a separate head exists or it is only gathered, and the RoPE
caches); a tied head is read whole as the head. Plus the KV cache: decode step j (0-based) attends to
P + j + 1 positions, keys and values of every layer, at the engine's element size; over the steps
that averages P + (new + 1) / 2 positions. Not counted: activations, the logits written, the new
position's KV written. The roofline is read bandwidth / bytes per token, the bandwidth measured here
with numpy summing a 1 GiB array on one thread.

Equal bytes (--sizes MODEL prints the table): weight bytes of candidate files computed from the
formats' layouts (MatMulNBits: per block of B weights B/2 bytes of 4-bit codes, a float32 scale and for
asym a 4-bit zero point; Q4_0: 18 bytes per 32 weights). On SmolLM2-135M (hidden 576, 30 layers,
vocabulary 49152, tied) llama-quantize's Q4_0 holds the linears at 18 bytes per 32 weights and the
tied embedding as Q8_0 (Q6_K's fallback for rows of 576): 89.9 MB of tensors (an 87.5 MiB file).
- At Q4_0's bytes: W4G64 symmetric exported with --max-block 64 and the 8-bit head, 91.7 MB (1.02x;
  its linears at 36 bytes per 64 weights, Q4_0's rate; the 8-bit head's float32 scales make the rest).
  W4G32 sym with the 8-bit head (the default export of the issue's 99.3 MiB folder) is 98.3 MB
  (1.09x); the same with --lm-head-bits 4 is 84.2 MB (0.94x), the smallest at group 32.
- At Q4_K_M's bytes: llama-quantize's Q4_K_M falls back to Q5_0 and Q8_0 on every row of 576 and
  holds 103.7 MB (a 100.6 MiB file). Ours nearest: W4G32 asym, or W4G128 asym with the default
  --max-block 32, each with the 8-bit head, 100.0 MB (0.96x).
On disk, beside its tensors, the GGUF holds 1.8 MB of vocabulary and our folder 5.8 MB (the RoPE
tables, 2.1 MB, and the tokenizer files): W4G32 sym with the 4-bit head is 89.9 MB on disk against
Q4_0's 91.7 MB, W4G64 sym with the 8-bit head 97.5 MB. What each costs (`signround validate CKPT --onnx
DIR --text wikitext-2 valid --tokens 2048`, round-to-nearest checkpoints, level 4, 2026-12-07): W4G32
sym, 8-bit head: perplexity 22.92 (reference 22.88), top-1 0.956, KL 3.6e-3; 4-bit head: 25.13, top-1
0.828, KL 8.5e-2 (fails validate); W4G64 sym, blocks of 64, 8-bit head: 23.92 (its reference 23.79),
top-1 0.960, KL 5.6e-3.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from common import TEXT, machine

WARMUP_STEPS = 8
ENGINES = ("llama.cpp", "ours")  # the table's column order; the GGUF in llama.cpp is the baseline


# -- what one decoded token reads ----------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One tensor of a file: its bytes, and for a lookup table the rows one token reads one of."""
    name: str
    nbytes: int
    rows: int = 0  # 0: read whole every token (a matrix); else a table read one row per token

    @property
    def read_per_token(self) -> int:
        return self.nbytes // self.rows if self.rows else self.nbytes


def weight_bytes_per_token(stored: list[Stored]) -> int:
    return sum(t.read_per_token for t in stored)


def kv_bytes_per_position(layers: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Keys and values of every layer at one position."""
    return 2 * layers * kv_heads * head_dim * element_bytes


def decode_bytes_per_token(weights: int, kv_per_position: int, prompt: int, new: int) -> float:
    """Mean bytes one of `new` decode steps after a prompt of `prompt` tokens reads: the weights, and
    the KV cache at the P + j + 1 positions step j attends to (mean P + (new + 1) / 2)."""
    return weights + kv_per_position * (prompt + (new + 1) / 2)


def roofline(bandwidth_gbs: float, bytes_per_token: float) -> float:
    """Decode tokens per second if every step only read its bytes at the measured bandwidth."""
    return bandwidth_gbs * 1e9 / bytes_per_token


def bandwidth_gbs() -> float:
    """Read bandwidth of one thread: numpy summing a 1 GiB array, the best of 5."""
    import numpy as np

    a = np.ones(2**27, dtype=np.float64)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


@dataclass(frozen=True)
class EngineFile:
    """One side of the comparison: the file, its size, and what a decode step reads from it."""
    engine: str
    path: str
    file_bytes: int  # on disk: the GGUF file, or every file of the ONNX folder
    weight_bytes: int  # all tensors
    weights_per_token: int
    kv_per_position: int
    context_length: int
    vocab_size: int

    def bytes_per_token(self, prompt: int, new: int) -> float:
        return decode_bytes_per_token(self.weights_per_token, self.kv_per_position, prompt, new)


def onnx_stored(folder: Path) -> list[Stored]:
    """model.onnx's initializers; one only gathered (the embedding) or a RoPE cache is a lookup table."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            users.setdefault(name, set()).add(node.op_type if i == 0 else f"{node.op_type}:{i}")
    stored = []
    for t in model.graph.initializer:
        if uses_external_data(t):
            size = int(next(e.value for e in t.external_data if e.key == "length"))
        else:
            size = len(t.raw_data)
        gathered = t.name in users and users[t.name] <= {"Gather"}
        table = gathered or t.name.startswith(("cos_cache", "sin_cache"))
        stored.append(Stored(t.name, size, int(t.dims[0]) if table else 0))
    return stored


def onnx_file(folder: Path) -> EngineFile:
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    d = config["decoder"]
    stored = onnx_stored(folder)
    return EngineFile("ours", str(folder), sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
                      sum(t.nbytes for t in stored), weight_bytes_per_token(stored),
                      kv_bytes_per_position(d["num_hidden_layers"], d["num_key_value_heads"], d["head_size"], 4),
                      int(config.get("context_length", 2048)), int(config["vocab_size"]))


def gguf_stored(reader) -> list[Stored]:
    """The file's tensors; the token embedding is a table when a separate output matrix exists."""
    names = {t.name for t in reader.tensors}
    return [Stored(t.name, int(t.n_bytes),
                   int(t.shape[-1]) if t.name == "token_embd.weight" and "output.weight" in names else 0)
            for t in reader.tensors]


def gguf_file(path: Path) -> EngineFile:
    """llama.cpp's KV cache is float16 by default (llama-cpp-python's type_k/type_v unset)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    arch = field("general.architecture")
    heads = int(field(f"{arch}.attention.head_count"))
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(field(f"{arch}.attention.key_length", int(field(f"{arch}.embedding_length")) // heads))
    stored = gguf_stored(reader)
    return EngineFile("llama.cpp", str(path), path.stat().st_size, sum(t.nbytes for t in stored),
                      weight_bytes_per_token(stored),
                      kv_bytes_per_position(int(field(f"{arch}.block_count")), kv_heads, head_dim, 2),
                      int(field(f"{arch}.context_length")), len(reader.fields["tokenizer.ggml.tokens"].data))


# -- equal bytes: candidate files from the formats' layouts ----------------------------------------


@dataclass(frozen=True)
class Shape:
    """A llama-family model's sizes, from its config.json."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c: dict) -> "Shape":
        heads = c["num_attention_heads"]
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], heads,
                   c.get("num_key_value_heads", heads), c.get("head_dim") or c["hidden_size"] // heads,
                   c["vocab_size"], bool(c.get("tie_word_embeddings", False)))

    def linears(self) -> dict[str, tuple[int, int]]:
        """[N, K] of every decoder-block linear, by its HF name."""
        h, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        per = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
        return {f"model.layers.{i}.{m}": nk for i in range(self.layers) for m, nk in per.items()}

    def norm_bytes(self) -> int:
        """float32 RMSNorm weights: two per layer and the final one (both formats store them so)."""
        return 4 * self.hidden * (2 * self.layers + 1)


def onnx_candidate_bytes(shape: Shape, bits: int, group: int, sym: bool, max_block: int, head_bits: int) -> int:
    """Weight bytes of `signround export onnx --max-block B --lm-head-bits H` of a W{bits}G{group} checkpoint:
    the linears, the head rounded at group 32 symmetric (a tied embedding gathers the head's rows) and
    the norms. Not counted: the RoPE tables and the tokenizer files beside the model."""
    from signround_export.export.onnx.build import HEAD_GROUP
    from signround_export.tune.costs import onnx_bytes

    body = sum(onnx_bytes(n, k, bits, group, sym, max_block) for n, k in shape.linears().values())
    head = onnx_bytes(shape.vocab, shape.hidden, head_bits, HEAD_GROUP, True, max_block)
    embedding = 0 if shape.tied else 4 * shape.vocab * shape.hidden
    return body + head + embedding + shape.norm_bytes()


def gguf_candidate_bytes(shape: Shape, ftype: str) -> int:
    """Weight bytes of llama-quantize's file type (Q4_0, Q4_K_M, ...): each linear's type from the mix,
    the head Q6_K; both fall back (types.py) where rows are not a multiple of 256, as llama.cpp does."""
    from signround_export.export.gguf.mixes import layer_type
    from signround_export.export.gguf.types import GGUF_TYPES, QK_K
    from signround_export.tune.costs import gguf_bytes

    gqa = shape.heads // shape.kv_heads
    body = sum(gguf_bytes(n, k, layer_type(ftype, name, k, shape.layers, gqa))
               for name, (n, k) in shape.linears().items())
    head_type = "Q6_K" if shape.hidden % QK_K == 0 else GGUF_TYPES["Q6_K"].fallback
    head = gguf_bytes(shape.vocab, shape.hidden, head_type)
    embedding = 0 if shape.tied else gguf_bytes(shape.vocab, shape.hidden, head_type)  # approximation: as the head
    return body + head + embedding + shape.norm_bytes()


ONNX_CANDIDATES = [  # (label, bits, group, sym, max_block, head_bits)
    ("ours W4G32 sym, 8-bit head", 4, 32, True, 32, 8),
    ("ours W4G32 sym, 4-bit head", 4, 32, True, 32, 4),
    ("ours W4G64 sym --max-block 64, 8-bit head", 4, 64, True, 64, 8),
    ("ours W4G64 sym --max-block 64, 4-bit head", 4, 64, True, 64, 4),
    ("ours W4G32 asym, 8-bit head", 4, 32, False, 32, 8),
    ("ours W4G128 asym (blocks of 32), 8-bit head", 4, 128, False, 32, 8),
    ("ours W4G128 asym --max-block 128, 8-bit head", 4, 128, False, 128, 8),
    ("ours W4G128 asym --max-block 128, 4-bit head", 4, 128, False, 128, 4),
]
GGUF_CANDIDATES = ["Q4_0", "Q4_K_M"]


def size_table(shape: Shape) -> str:
    """Every candidate's weight bytes against llama-quantize's files, and which of ours is nearest each."""
    theirs = {f: gguf_candidate_bytes(shape, f) for f in GGUF_CANDIDATES}
    mine = {label: onnx_candidate_bytes(shape, *c) for label, *c in ONNX_CANDIDATES}
    weights = sum(n * k for n, k in shape.linears().values()) + shape.vocab * shape.hidden * (1 if shape.tied else 2)
    lines = ["| file | weight bytes | MB | bits/weight | " + " | ".join(f"vs {f}" for f in theirs) + " |",
             "| --- " * (4 + len(theirs)) + "|"]
    for label, b in [(f"llama-quantize {f}", b) for f, b in theirs.items()] + list(mine.items()):
        lines.append(f"| {label} | {b} | {b / 1e6:.1f} | {8 * b / weights:.3f} | "
                     + " | ".join(f"{b / t:.3f}x" for t in theirs.values()) + " |")
    lines.append("")
    for f, t in theirs.items():
        label = min(mine, key=lambda m: abs(mine[m] / t - 1))
        lines.append(f"nearest to {f}: {label} ({mine[label] / t:.3f}x)")
    return "\n".join(lines)


# -- one measurement, in its own process ---------------------------------------------------------


@dataclass(frozen=True)
class Job:
    engine: str  # "ours" or "llama.cpp"
    path: str
    ids: list[int]
    new: int
    threads: int
    flash_attn: bool = False


@dataclass
class Calls:
    """An engine's calls for one greedy run. reset (untimed): an empty cache; prefill(ids) and
    step(token): the timed engine calls; logits(): the last position's float32 logits."""
    reset: Callable[[], None]
    prefill: Callable[[list[int]], None]
    step: Callable[[int], None]
    logits: Callable[[], Any]
    owner: Any  # the engine, alive while its calls are


def timed_run(calls: Calls, ids: list[int], steps: int) -> dict:
    """One greedy run: only prefill and each step are timed; the argmax between them is not."""
    import numpy as np

    calls.reset()
    t = time.perf_counter()
    calls.prefill(ids)
    prefill_s = time.perf_counter() - t
    tokens, decode_s = [], 0.0
    for _ in range(steps):
        tokens.append(int(np.argmax(calls.logits())))
        t = time.perf_counter()
        calls.step(tokens[-1])
        decode_s += time.perf_counter() - t
    return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens}


def ours(job: Job) -> Calls:
    """The runtime's model and its own step (Model._step, what Model.generate() runs): a cache bound once
    per run through one IOBinding, every layer's KV buffer as both past and present, as generate()
    binds it; the attention mask a view of one preallocated array (generate() grows its own)."""
    import numpy as np
    from signround_runtime import Model

    model = Model(job.path, threads=job.threads)
    total = len(job.ids) + job.new
    mask, zero = np.ones((1, total), dtype=np.int64), np.zeros(1, dtype=np.int64)
    state = {}

    def reset():
        state["io"], state["kv"] = model._bind_cache(1, total)

    def prefill(ids):
        state["pos"] = len(ids)
        state["last"] = model._step(np.array([ids], dtype=np.int64), mask[:, :len(ids)], state["io"],
                                    np.array([len(ids) - 1]))

    def step(token):
        state["pos"] += 1
        state["last"] = model._step(np.array([[token]], dtype=np.int64), mask[:, :state["pos"]], state["io"], zero)

    return Calls(reset, prefill, step, lambda: state["last"][0], model)


def llama(job: Job) -> Calls:
    """llama.cpp through llama-cpp-python: eval of the prompt as one batch, eval of each token; the
    logits read in place from the context (llama_get_logits_ith)."""
    import llama_cpp
    import numpy as np

    n = len(job.ids)
    llm = llama_cpp.Llama(job.path, n_ctx=n + job.new, n_batch=n, n_ubatch=n, n_threads=job.threads,
                          n_threads_batch=job.threads, flash_attn=job.flash_attn, verbose=False)
    vocab = llm.n_vocab()
    if max(job.ids) >= vocab:
        raise SystemExit(f"{job.path} has a vocabulary of {vocab}, the prompt has id {max(job.ids)}: "
                         "give the GGUF of the same model as the ONNX folder")

    def logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    return Calls(llm.reset, llm.eval, lambda token: llm.eval([token]), logits, llm)


def measure(job: Job) -> dict:
    """Load, warm up, one timed run; in the calling process (the harness runs it in a fresh one)."""
    t = time.perf_counter()
    calls = (ours if job.engine == "ours" else llama)(job)
    load_s = time.perf_counter() - t
    timed_run(calls, job.ids, WARMUP_STEPS)
    run = timed_run(calls, job.ids, job.new)
    return {**run, "load_s": load_s, "prefill_tps": len(job.ids) / run["prefill_s"],
            "decode_tps": job.new / run["decode_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_child(job: Job) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child"], input=json.dumps(asdict(job)), capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"{job.engine} on {job.path} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the matrix, its summary and its table -------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    prompt: int
    threads: int


def schedule(cells: list[Cell], rounds: int) -> list[tuple[int, Cell, str]]:
    """(round, cell, engine) in run order: every round runs every cell, both engines back to back,
    their order flipped every round."""
    order = []
    for r in range(rounds):
        engines = ENGINES if r % 2 == 0 else ENGINES[::-1]
        order += [(r, c, e) for c in cells for e in engines]
    return order


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def agreement(a: list[int], b: list[int]) -> int:
    """How many greedy tokens the two engines chose alike before they first differ."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def summarize(runs: list[dict], files: dict[str, EngineFile], new: int, bandwidth: float) -> list[dict]:
    """Per cell: each engine's prefill and decode (median, min, max), ours over llama.cpp's medians,
    and each engine's decode against its own roofline."""
    rows = []
    cells = sorted({(r["prompt"], r["threads"]) for r in runs})
    for prompt, threads in cells:
        row = {"prompt": prompt, "threads": threads}
        mine = [r for r in runs if (r["prompt"], r["threads"]) == (prompt, threads)]
        for engine in ENGINES:
            these = [r for r in mine if r["engine"] == engine]
            roof = roofline(bandwidth, files[engine].bytes_per_token(prompt, new))
            row[engine] = {"prefill_tps": spread([r["prefill_tps"] for r in these]),
                           "decode_tps": spread([r["decode_tps"] for r in these]),
                           "bytes_per_token": files[engine].bytes_per_token(prompt, new), "roofline_tps": roof}
            row[engine]["of_roofline"] = row[engine]["decode_tps"]["median"] / roof
        for what in ("prefill_tps", "decode_tps"):
            row[what.split("_")[0] + "_ratio"] = row["ours"][what]["median"] / row["llama.cpp"][what]["median"]
        firsts = {e: [r["tokens"] for r in mine if r["engine"] == e][0] for e in ENGINES}
        row["greedy_tokens_alike"] = agreement(firsts["llama.cpp"], firsts["ours"])
        rows.append(row)
    return rows


def fmt(s: dict) -> str:
    return f"{s['median']:.1f} ({s['min']:.1f}..{s['max']:.1f})"


def table(rows: list[dict]) -> str:
    """The markdown table: a row per prompt length x threads; tok/s as median (min..max)."""
    lines = ["| prompt | threads | prefill llama.cpp | prefill ours | prefill ratio | decode llama.cpp | decode ours "
             "| decode ratio | llama.cpp of roofline | ours of roofline |", "| --- " * 10 + "|"]
    for r in rows:
        a, b = r["llama.cpp"], r["ours"]
        lines.append(f"| {r['prompt']} | {r['threads']} | {fmt(a['prefill_tps'])} | {fmt(b['prefill_tps'])} | "
                     f"{r['prefill_ratio']:.2f}x | {fmt(a['decode_tps'])} | {fmt(b['decode_tps'])} | "
                     f"{r['decode_ratio']:.2f}x | {100 * a['of_roofline']:.0f}% | {100 * b['of_roofline']:.0f}% |")
    return "\n".join(lines)


def header(files: dict[str, EngineFile], args, bandwidth: float) -> str:
    lines = [f"{time.strftime('%Y-%m-%d')}, {machine()}; {args.rounds} round(s) alternating the engines (order "
             f"flipped each round), a fresh process per measurement; {args.new} greedy tokens; tok/s as median "
             f"(min..max); ratio = ours / llama.cpp; one-thread read bandwidth {bandwidth:.1f} GB/s"
             + ("; llama.cpp with flash attention" if args.flash_attn else ""), ""]
    for f in (files["llama.cpp"], files["ours"]):
        per = ", ".join(f"{f.bytes_per_token(p, args.new) / 1e6:.1f} MB at prompt {p}" for p in args.prompts)
        lines.append(f"- {f.engine}: {f.path}, {f.file_bytes / 1e6:.1f} MB on disk, {f.weight_bytes / 1e6:.1f} MB "
                     f"of tensors. Read per decoded token: weights {f.weights_per_token / 1e6:.1f} MB, KV cache "
                     f"{f.kv_per_position} B per position; in all {per}")
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 32,256") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__[__doc__.index("Equal bytes"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, help="our exported folder (signround export onnx)")
    ap.add_argument("--gguf", type=Path, help="llama.cpp's file of the same model")
    ap.add_argument("--prompts", type=int_list, default=[32, 256, 1024], help="prompt lengths in tokens (32,256,1024)")
    ap.add_argument("--new", type=int, default=128, help="greedy tokens decoded after each prompt (128)")
    ap.add_argument("--threads", type=int_list, default=[1, 2], help="thread counts (1,2)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    ap.add_argument("--text", type=Path, default=TEXT, help="text the prompt ids come from (wikitext-2 valid)")
    ap.add_argument("--flash-attn", action="store_true",
                    help="llama.cpp with flash attention (off: llama-cpp-python's default)")
    ap.add_argument("--bandwidth", type=float, help="read bandwidth in GB/s instead of measuring it")
    ap.add_argument("--json", type=Path, help="write every measurement and the summary here")
    ap.add_argument("--sizes", type=Path, metavar="MODEL",
                    help="print the weight bytes of candidate files of MODEL (an HF folder) and exit")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap


def check(args, files: dict[str, EngineFile]) -> None:
    """Refuse what would measure nothing or overrun a cache, naming the fix."""
    if args.new < 1 or args.rounds < 1:
        raise SystemExit("--new and --rounds must be at least 1")
    for f in files.values():
        if max(args.prompts) + args.new > f.context_length:
            raise SystemExit(f"prompt {max(args.prompts)} + {args.new} new tokens exceeds {f.path}'s context "
                             f"length {f.context_length}: give shorter --prompts or fewer --new")
    if files["ours"].vocab_size != files["llama.cpp"].vocab_size:
        raise SystemExit(f"the two files have vocabularies of {files['ours'].vocab_size} and "
                         f"{files['llama.cpp'].vocab_size} tokens: give two files of the same model")


def prompt_ids(folder: Path, text: Path, length: int) -> list[int]:
    """The first `length` ids of the text, as the runtime encodes it (no special tokens added)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    body = text.read_text()
    for chars in (8 * length, len(body)):
        ids = tok.encode(body[:chars], add_special_tokens=False).ids
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"{text} has only {len(ids)} tokens; the longest prompt needs {length}")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.child:
        print(json.dumps(measure(Job(**json.loads(sys.stdin.read())))))
        return
    if args.sizes:
        print(size_table(Shape.from_config(json.loads((args.sizes / "config.json").read_text()))))
        return
    if args.onnx is None or args.gguf is None:
        raise SystemExit("give --onnx FOLDER and --gguf FILE (or --sizes MODEL)")
    for p in (args.onnx, args.gguf):
        if not p.exists():
            raise SystemExit(f"{p} does not exist")
    files = {"ours": onnx_file(args.onnx), "llama.cpp": gguf_file(args.gguf)}
    check(args, files)
    ids = prompt_ids(args.onnx, args.text, max(args.prompts))
    cells = [Cell(p, t) for p in args.prompts for t in args.threads]
    runs = []
    for r, cell, engine in schedule(cells, args.rounds):
        path = args.onnx if engine == "ours" else args.gguf
        out = measure_in_child(Job(engine, str(path), ids[:cell.prompt], args.new, cell.threads, args.flash_attn))
        runs.append({"round": r, "engine": engine, **asdict(cell), **out})
        print(f"round {r + 1} prompt {cell.prompt} threads {cell.threads} {engine}: prefill "
              f"{out['prefill_tps']:.1f} decode {out['decode_tps']:.1f} tok/s", file=sys.stderr, flush=True)
    bandwidth = args.bandwidth or bandwidth_gbs()
    rows = summarize(runs, files, args.new, bandwidth)
    report = header(files, args, bandwidth) + "\n\n" + table(rows)
    print(report)
    if args.json:
        from importlib.metadata import version

        from signround_export.atomic import atomic_file

        record = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "bandwidth_gbs": bandwidth,
                  "versions": {p: version(p) for p in ("onnxruntime", "llama_cpp_python", "numpy")},
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "files": {k: asdict(f) for k, f in files.items()}, "cells": rows, "runs": runs, "table": report}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
