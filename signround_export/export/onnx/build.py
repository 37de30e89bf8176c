"""ONNX export for onnxruntime: the LLaMA decoder as fused contrib ops over MatMulNBits weights.

The graph, per decoder block i (x: the residual stream, float32 [batch, seq, hidden]):

    h       = SimplifiedLayerNormalization(x)                  (block 0; later blocks get h and x
    h, x    = SkipSimplifiedLayerNormalization(out, x)          from the previous block's output)
    qkv     = MatMulNBits_qkv(h)  (+ bias for qwen2; q, k, v stacked row after row, or one
              MatMulNBits each where their integers differ in layout; Phi-3's fused qkv_proj as stored)
    a, present.i.key, present.i.value
            = GroupQueryAttention(qkv, "", "", past_key_values.i.*, seqlens_k, total_seq_len, cos, sin)
              (qkv packed: GroupQueryAttention cuts it; where q, k, v are separate nodes, or families
              with q/k norms (qwen3) norm each head of q and k after a Split, it takes q, k, v)
              (rotary fused, half-split layout like HF's rotate_half; caches narrower than
              head_dim / 2 rotate only the first dimensions of each head: partial rotary)
    out     = MatMulNBits(a)
    h, x    = SkipSimplifiedLayerNormalization(out, x)
    gate, up = Split(MatMulNBits_gate_up(h))  (stacked the same way, or Phi-3's fused gate_up_proj)
    out     = MatMulNBits_down(silu(gate) * up)

then logits = head(SkipSimplifiedLayerNormalization(out, x)). Inputs and outputs use
onnxruntime-genai's names, and genai_config.json beside model.onnx lets onnxruntime-genai run the
folder unchanged. seqlens_k = sum(attention_mask) - 1 and total_seq_len = attention_mask's length,
as GroupQueryAttention wants them.

Gemma (gemma2, gemma3_text) changes the pieces, read from the family record and the config: every norm
weight is stored as 1 + weight (its RMSNorm scales by that, in float32 like SimplifiedLayerNormalization);
the embedding rows are multiplied by sqrt(hidden); the attention and MLP outputs get a norm of their own
(post_attention_layernorm, post_feedforward_layernorm) before the residual and the MLP reads
pre_feedforward_layernorm; the MLP's activation is FastGelu (GELU's tanh approximation);
GroupQueryAttention takes query_pre_attn_scalar's scale and the attention soft-capping (`softcap`);
layers with a local RoPE base read cos/sin caches of their own; the logits are soft-capped
(tanh(logits / cap) * cap).

The head is the checkpoint's: its integers when it quantized the lm_head, else float (a Gemm that
shares the embedding's initializer when the two are tied). lm_head_bits=4|8 rounds a float head to
nearest, the one place this exporter rounds anything; the report says so. A tied embedding then
reads the head's integers through GatherBlockQuantized, so the matrix is stored once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from signround_runtime.manifest import write_manifest
from tqdm import tqdm

from ...atomic import atomic_dir
from ...checkpoint.format import Checkpoint
from ...checkpoint.qweight import UNIFORM, QuantWeight, Scheme
from ...errors import ONNXExportError
from ...model.config import ModelConfig
from ...model.families import FUSED_GATE_UP, FUSED_QKV, check_linears
from ...model.folder import copy_tokenizer_files
from ...model.rope import rope_tables
from ...tune.quantizer import to_qweight
from .genai import genai_config
from .graph import FLOAT, INT32, INT64, MS, GraphBuilder, InitializerFile, tensor_info
from .matmulnbits import BLOCK_SIZES, grid_error, to_nbits
from .stacking import stack_key, stack_name, stack_rows

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 computes in float32, 4 quantizes activations to int8
HEAD_BITS = (4, 8, 16)  # lm_head_bits: 16 keeps a float head float
HEAD_GROUP = 32  # group of a head rounded here (lm_head_bits), as onnxruntime-genai's builder uses
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold more than 2 GB in one file
DATA_FILE = "model.onnx.data"


@dataclass
class ONNXExport:
    folder: Path
    layers: dict[str, int] = field(default_factory=dict)  # "W4 block 128 asym" -> count of MatMulNBits
    head: str = ""
    accuracy_level: int = 4
    bytes: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} x {k}" for k, n in sorted(self.layers.items()))
        weights = (f"MatMulNBits {kinds} (accuracy level {self.accuracy_level})" if kinds
                   else "float32 weights (no quantized layers)")
        return f"{self.folder}: {self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s; {weights}; head: {self.head}"


def export_onnx(ckpt: Checkpoint, out_dir, *, accuracy_level: int = 4, lm_head_bits: int | None = None,
                max_block: int = 32, external_bytes: int | None = None, progress: bool = False) -> ONNXExport:
    """Write the ONNX folder (model.onnx, genai_config.json, tokenizer files) atomically.

    accuracy_level: MatMulNBits' (0 exact float32 .. 4 int8 activations); lm_head_bits: 4 or 8 round a
    float head to nearest here (None or 16 keep it); max_block: the largest MatMulNBits block;
    external_bytes: initializers over this size stay in model.onnx.data (default EXTERNAL_DATA_BYTES, under
    protobuf's 2 GB), else model.onnx holds them. The checkpoint is read one layer at a time, its
    initializers written to model.onnx.data as they are made; progress: a bar over the blocks."""
    t0 = time.perf_counter()
    check_options(accuracy_level, lm_head_bits, max_block)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    check_linears(cfg.family, [*ckpt.qweights, *ckpt.tensors], ONNXExportError)
    check_attention(cfg)
    check_grids(ckpt)
    report = ONNXExport(folder=Path(out_dir), accuracy_level=accuracy_level)
    head_qw, report.head = plan_head(cfg, ckpt, lm_head_bits)
    with atomic_dir(out_dir) as tmp:
        data = InitializerFile(tmp / DATA_FILE)
        decoder = DecoderGraph(ckpt, cfg, report, data, accuracy_level=accuracy_level, max_block=max_block)
        model = decoder.build(head_qw, progress)
        limit = EXTERNAL_DATA_BYTES if external_bytes is None else external_bytes
        if decoder.g.initializer_bytes() > limit:
            data.close()
        else:
            data.inline(model.graph.initializer)
        write_folder(tmp, model, genai_config(cfg, ckpt), ckpt.path)
    report.bytes = sum(f.stat().st_size for f in Path(out_dir).iterdir())
    report.seconds = time.perf_counter() - t0
    return report


def check_grids(ckpt: Checkpoint) -> None:
    """Refuse, before writing anything, layers that quantization_config puts on a non-uniform grid."""
    on_grids = [n for n in ckpt.qweights if ckpt.quant.layer_grid(n) != UNIFORM]
    if on_grids:
        raise grid_error(on_grids, ckpt.quant.layer_grid(on_grids[0]))


def check_attention(cfg: ModelConfig) -> None:
    """What onnxruntime's GroupQueryAttention accepts (checked on onnxruntime 1.32): a head size that is a
    multiple of 16, and cos/sin caches whose width (rotary_dim / 2) is a multiple of 8."""
    if cfg.head_dim % 16:
        raise ONNXExportError(f"head size {cfg.head_dim} is not a multiple of 16, which onnxruntime's "
                              "GroupQueryAttention requires: this model cannot be exported to ONNX")
    if cfg.rotary_dim % 16:
        raise ONNXExportError(f"{cfg.rotary_dim} rotary dimensions per head (partial_rotary_factor "
                              f"{cfg.partial_rotary_factor}): onnxruntime's GroupQueryAttention needs a multiple of "
                              "16, so this model cannot be exported to ONNX")


def check_options(accuracy_level: int, lm_head_bits: int | None, max_block: int) -> None:
    if accuracy_level not in ACCURACY_LEVELS:
        raise ONNXExportError(f"accuracy_level {accuracy_level}: choose 0 (exact), 1, 2, 3 or 4 (int8 activations)",
                              param="accuracy_level")
    if lm_head_bits not in (None, *HEAD_BITS):
        raise ONNXExportError(f"lm_head_bits {lm_head_bits}: choose 4 or 8 to round a float head here, or "
                              "16 (or None) to keep the checkpoint's head", param="lm_head_bits")
    if max_block not in BLOCK_SIZES:
        raise ONNXExportError(f"max_block {max_block}: choose one of the MatMulNBits block sizes "
                              f"{', '.join(map(str, sorted(BLOCK_SIZES)))}", param="max_block")


def plan_head(cfg: ModelConfig, ckpt: Checkpoint, lm_head_bits) -> tuple[QuantWeight | None, str]:
    """The head's integers (the checkpoint's, or a float head rounded to lm_head_bits here) or None for a
    float head, and a sentence for the report."""
    if "lm_head" in ckpt.qweights:
        qw = ckpt.qweights["lm_head"]
        return qw, f"the checkpoint's W{qw.bits} integers"
    if lm_head_bits not in (4, 8):
        return None, "float32" + ("" if "lm_head.weight" in ckpt.tensors else ", shared with the embedding")
    w = ckpt.tensors["lm_head.weight" if "lm_head.weight" in ckpt.tensors else "model.embed_tokens.weight"]
    bias = ckpt.tensors.get("lm_head.bias")
    group = HEAD_GROUP if cfg.hidden_size % HEAD_GROUP == 0 else -1
    qw = to_qweight(torch.from_numpy(w), Scheme(lm_head_bits, group, True),
                    bias=None if bias is None else torch.from_numpy(bias))
    return qw, (f"float in the checkpoint, rounded to nearest here at W{lm_head_bits} group {qw.group_size} "
                "symmetric (--lm-head-bits)")


def local_window_size(window: int | None) -> int:
    """GroupQueryAttention's local_window_size for a sliding window of `window` positions (-1: none).
    Measured: from onnxruntime 1.24.1 the window counts the current token, so W matches transformers'
    t - W < s <= t; releases 1.20.0 to 1.23.2 would need W - 1 (runtime/pyproject.toml asks for 1.24.1)."""
    return -1 if window is None else window


def graph_io(cfg: ModelConfig) -> tuple[list, list]:
    """The graph's inputs and outputs by onnxruntime-genai's names: ids, mask, logits and each block's KV cache."""
    past = ["batch_size", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim]
    present = ["batch_size", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    inputs = [tensor_info("input_ids", INT64, ["batch_size", "sequence_length"]),
              tensor_info("attention_mask", INT64, ["batch_size", "total_sequence_length"])]
    outputs = [tensor_info("logits", FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(tensor_info(f"past_key_values.{i}.{kind}", FLOAT, past))
            outputs.append(tensor_info(f"present.{i}.{kind}", FLOAT, present))
    return inputs, outputs


def write_folder(folder: Path, model: onnx.ModelProto, genai: dict, source: Path) -> None:
    """model.onnx (its large initializers' bytes in model.onnx.data, already written, or in itself),
    genai_config.json and the tokenizer files of `source`; then sha256sums.txt, the digests of them all,
    which the runtime and `validate` check before loading (read back from the page cache: 0.13 s for
    SmolLM2-135M's 185 MB)."""
    onnx.save_model(model, str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
    copy_tokenizer_files(source, folder)
    write_manifest(folder)


@dataclass(frozen=True)
class Packed:
    """A weight's MatMulNBits initializers by name and what its node needs to know (the arrays are gone)."""
    names: list[str]  # B, scales[, zero_points]
    bits: int
    block: int
    k: int
    n: int


def _scheme(qw: QuantWeight, block: int) -> str:
    return f"W{qw.bits} block {block} {'sym' if qw.sym else 'asym'}"


class DecoderGraph:
    """The decoder of one checkpoint, written into a GraphBuilder in the order of the module docstring.

    Quantized weights are packed into MatMulNBits initializers once (`packed`: a tied embedding and
    head share them), and every MatMulNBits is counted in the report."""

    def __init__(self, ckpt: Checkpoint, cfg: ModelConfig, report: ONNXExport, data: InitializerFile | None = None,
                 *, accuracy_level: int, max_block: int):
        self.g = GraphBuilder(data)
        self.ckpt, self.cfg, self.report = ckpt, cfg, report
        self.accuracy_level, self.max_block = accuracy_level, max_block
        self.eps = float(cfg.rms_eps)
        self.packed: dict[str, Packed] = {}
        self.lengths: list[str] = []  # seqlens_k, total_seq_len: shared by every block
        self.rope: dict[bool, list[str]] = {}  # cos and sin caches, by ModelConfig.local_rope of a block
        self.shapes: dict[str, str] = {}  # Reshape targets, made once

    def build(self, head_qw: QuantWeight | None, progress: bool = False) -> onnx.ModelProto:
        inputs, outputs = graph_io(self.cfg)
        self.lengths = self.sequence_lengths()
        self.rope = {local: self.rope_caches(local)
                     for local in sorted({self.cfg.local_rope(i) for i in range(self.cfg.n_layers)})}
        x, embed = self.embedding(head_qw)
        if self.cfg.family.embed_scale:  # sqrt(hidden) rounded to float32, as transformers does
            x = self.g.op("Mul", [x, self.g.const("embed_scale", np.array(self.cfg.hidden_size ** 0.5, np.float32))])
        out = None
        for i in tqdm(range(self.cfg.n_layers), desc="onnx", unit="block", disable=not progress):
            out, x = self.block(i, out, x)
        h, _ = self.skip_norm(out, x, "model.norm.weight")
        logits = "logits" if self.cfg.final_softcap is None else "/logits_uncapped"
        if head_qw is not None:
            self.g.op("Identity", [self.matmul_nbits(h, "lm_head", head_qw)], outputs=[logits])
        else:
            self.float_head(h, embed, logits)
        if self.cfg.final_softcap is not None:
            self.softcap(logits, self.cfg.final_softcap, output="logits")
        return self.g.model("signround-llama", inputs, outputs, producer="signround-export")

    # -- what every block's attention reads

    def sequence_lengths(self) -> list[str]:
        """seqlens_k = sum(attention_mask) - 1 and total_seq_len = attention_mask's length, as int32."""
        g = self.g
        mask_sum = g.op("ReduceSum", ["attention_mask", g.const("axis_1", np.array([1], dtype=np.int64))], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, g.const("one_i64", np.array(1, dtype=np.int64))])], to=INT32)
        length = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const("index_1", np.array(1, dtype=np.int64))],
                      axis=0)
        return [seqlens_k, g.op("Cast", [length], to=INT32)]

    def rope_caches(self, local: bool = False) -> list[str]:
        """GroupQueryAttention's cos and sin caches [context_length, rotary_dim / 2] (longrope's graph stops
        at its original context, where the short factors end; local: of the local layers' RoPE base)."""
        cos, sin = rope_tables(self.cfg, self.cfg.context_length, local)
        suffix = "_local" if local else ""
        return [self.g.const("cos_cache" + suffix, cos), self.g.const("sin_cache" + suffix, sin)]

    # -- the pieces of the decoder, in graph order

    def embedding(self, head_qw: QuantWeight | None) -> tuple[str, str | None]:
        """x = the embedding rows of input_ids, and the float embedding's initializer for a float head to
        share (None when the embedding reads the head's integers)."""
        tied = "lm_head.weight" not in self.ckpt.tensors and "lm_head" not in self.ckpt.qweights
        if tied and head_qw is not None:
            # the head was rounded here from the tied embedding: packed now, the head reuses the initializers
            w = self.nbits_inputs("lm_head", head_qw)
            if w.k % w.block == 0:  # B viewed as [vocab, hidden * bits / 8] needs whole blocks per row
                return self.quantized_embedding(w), None
        embed = self.g.const("model.embed_tokens.weight", self.float_weight("model.embed_tokens.weight"))
        return self.g.op("Gather", [embed, "input_ids"], axis=0), embed

    def quantized_embedding(self, w: Packed) -> str:
        """Rows of the head's MatMulNBits integers, dequantized by GatherBlockQuantized: the file holds the
        matrix once."""
        g = self.g
        data = g.op("Reshape", [w.names[0], g.const("embed_data_shape", np.array([w.n, -1], dtype=np.int64))])
        self.report.head += "; the tied embedding reads the same integers (GatherBlockQuantized)"
        return g.op("GatherBlockQuantized", [data, "input_ids", *w.names[1:]], domain=MS, bits=w.bits,
                    block_size=w.block, gather_axis=0, quantize_axis=1)

    def block(self, i: int, out: str | None, x: str) -> tuple[str, str]:
        """Decoder block i on the previous block's output `out` (None for block 0) and the residual x:
        returns this block's output and the residual, to be summed by the next norm."""
        p = f"model.layers.{i}."
        h, x = self.skip_norm(out, x, p + "input_layernorm.weight")
        out = self.linear(self.attention(i, *self.attention_inputs(h, p)), p + "self_attn.o_proj")
        sandwich = self.cfg.family.sandwich_norms
        if sandwich:  # the attention output normed before the residual; the MLP's input norm is its own
            out = self.norm(out, p + "post_attention_layernorm.weight")
        h, x = self.skip_norm(out, x, p + ("pre_feedforward_layernorm.weight" if sandwich
                                           else "post_attention_layernorm.weight"))
        gate, up = self.gate_and_up(h, p)
        out = self.linear(self.g.op("Mul", [self.activation(gate), up]), p + "mlp.down_proj")
        return (self.norm(out, p + "post_feedforward_layernorm.weight") if sandwich else out), x

    def activation(self, gate: str) -> str:
        if self.cfg.activation == "gelu_pytorch_tanh":
            return self.g.op("FastGelu", [gate], domain=MS)  # GELU's tanh approximation
        return self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate])])  # silu

    def softcap(self, y: str, cap: float, output: str | None = None) -> str:
        """tanh(y / cap) * cap."""
        g = self.g
        c = g.const(f"softcap_{cap:g}", np.array(cap, dtype=np.float32))
        return g.op("Mul", [g.op("Tanh", [g.op("Div", [y, c])]), c], outputs=[output] if output else None)

    def norm_weight(self, name: str) -> np.ndarray:
        """A norm's weight as SimplifiedLayerNormalization multiplies by it: the family's offset added
        (Gemma's 1 + weight, summed in float32 as transformers does)."""
        w = self.float_weight(name)
        offset = self.cfg.family.norm_offset
        return w + np.float32(offset) if offset else w

    def norm(self, y: str, weight: str) -> str:
        """RMSNorm of y over its last axis."""
        w = self.g.const(weight, self.norm_weight(weight))
        return self.g.op("SimplifiedLayerNormalization", [y, w], axis=-1, epsilon=self.eps, stash_type=1)

    def attention_inputs(self, h: str, p: str) -> list[str]:
        """GroupQueryAttention's query, key and value of h. Where one node computes all three rows (the
        fused qkv_proj, or q, k, v stacked) and no per-head norm comes between, its output goes in packed
        as the query, key and value left empty: no Split node. Otherwise q, k, v, each head-normed where
        the family has qk_norm."""
        cfg = self.cfg
        fused = cfg.family.fused_qkv
        modules = [p + FUSED_QKV] if fused else [p + f"self_attn.{n}_proj" for n in "qkv"]
        packed = self.linear(h, modules[0]) if fused else self.stacked(h, modules)
        if packed is not None and not cfg.family.qk_norm:
            return [packed, "", ""]
        kv_rows = cfg.n_kv_heads * cfg.head_dim
        rows = [cfg.n_heads * cfg.head_dim, kv_rows, kv_rows]
        q, k, v = (self.split(packed, stack_name(modules), rows) if packed is not None
                   else [self.linear(h, m) for m in modules])
        if cfg.family.qk_norm:
            q = self.head_norm(q, p + "self_attn.q_norm.weight", cfg.n_heads)
            k = self.head_norm(k, p + "self_attn.k_norm.weight", cfg.n_kv_heads)
        return [q, k, v]

    def gate_and_up(self, h: str, p: str) -> list[str]:
        """The MLP's gate and up of h: two linears (stacked where they can be), or the fused gate_up_proj
        (gate rows first) and a Split."""
        if not self.cfg.family.fused_gate_up:
            return self.linears(h, [p + "mlp.gate_proj", p + "mlp.up_proj"])
        rows = self.cfg.intermediate_size
        return self.split(self.linear(h, p + FUSED_GATE_UP), p + FUSED_GATE_UP, [rows, rows])

    def split(self, y: str, name: str, rows: list[int]) -> list[str]:
        """y's last axis cut into pieces of these sizes."""
        sizes = self.g.const(name + ".split", np.array(rows, dtype=np.int64))
        return self.g.op("Split", [y, sizes], n_out=len(rows), axis=-1)

    def skip_norm(self, out: str | None, x: str, weight: str) -> tuple[str, str]:
        """RMSNorm of x + out and the sum x + out, fused in one node (without `out`: RMSNorm of x, and x)."""
        g = self.g
        if out is None:
            return self.norm(x, weight), x
        w = g.const(weight, self.norm_weight(weight))
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [out, x, w], n_out=4, domain=MS, epsilon=self.eps)
        return h, x

    def head_norm(self, y: str, weight: str, heads: int) -> str:
        """RMSNorm of each head of y [batch, seq, heads * head_dim] with weight [head_dim]."""
        g = self.g
        w = g.const(weight, self.norm_weight(weight))  # before the Reshape, as files written before had it
        per_head = g.op("Reshape", [y, self.shape(f"heads_{heads}", [0, 0, heads, self.cfg.head_dim])])
        h = g.op("SimplifiedLayerNormalization", [per_head, w], axis=-1, epsilon=self.eps, stash_type=1)
        return g.op("Reshape", [h, self.shape("heads_flat", [0, 0, -1])])

    def shape(self, name: str, dims: list[int]) -> str:
        """An int64 Reshape target (0 keeps the input's dimension), one initializer per name."""
        if name not in self.shapes:
            self.shapes[name] = self.g.const(name + "_shape", np.array(dims, dtype=np.int64))
        return self.shapes[name]

    def attention(self, i: int, q: str, k: str, v: str) -> str:
        """Block i's GroupQueryAttention: rotary fused, its KV cache in past_key_values.i.* / present.i.*."""
        cfg = self.cfg
        scale = cfg.attention_scale if cfg.attention_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
        extra = {} if cfg.attn_softcap is None else {"softcap": float(cfg.attn_softcap)}
        attn, _, _ = self.g.op(
            "GroupQueryAttention",
            [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", *self.lengths,
             *self.rope[cfg.local_rope(i)]],
            outputs=[f"/attn_{i}", f"present.{i}.key", f"present.{i}.value"], domain=MS,
            num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, scale=scale,
            do_rotary=1, rotary_interleaved=0, local_window_size=local_window_size(cfg.window(i)), **extra)
        return attn

    def float_head(self, h: str, embed: str | None, output: str = "logits") -> None:
        """logits = h @ W.T as a Gemm with transB, which reads the [vocab, hidden] matrix as it lies, so a
        tied head shares the embedding's initializer."""
        g, cfg, tensors = self.g, self.cfg, self.ckpt.tensors
        w = embed if "lm_head.weight" not in tensors else g.const("lm_head.weight", tensors["lm_head.weight"])
        bias = tensors.get("lm_head.bias")
        flat = g.op("Reshape", [h, g.const("flat_shape", np.array([-1, cfg.hidden_size], dtype=np.int64))])
        logits = g.op("Gemm", [flat, w] + ([g.const("lm_head.bias", bias)] if bias is not None else []), transB=1)
        ids_shape = g.op("Shape", ["input_ids"])
        shape = g.op("Concat", [ids_shape, g.const("vocab", np.array([cfg.vocab_size], dtype=np.int64))], axis=0)
        g.op("Reshape", [logits, shape], outputs=[output])

    # -- linears: MatMulNBits over the checkpoint's integers, MatMul over its float weights

    def linears(self, x: str, modules: list[str]) -> list[str]:
        """Linears that read the same input (gate, up): stacked and a Split where they can be, else one
        node each."""
        y = self.stacked(x, modules)
        if y is None:
            return [self.linear(x, m) for m in modules]
        return self.split(y, stack_name(modules), [self.ckpt.qweights[m].shape[0] for m in modules])

    def stacked(self, x: str, modules: list[str]) -> str | None:
        """Linears that read the same input as one MatMulNBits over their stacked rows, when their
        integers share one layout (decode measured about 8% faster than one MatMulNBits each,
        docs/benchmarks.md); None when they do not."""
        qws = [self.ckpt.qweights.get(m) for m in modules]
        if any(qw is None for qw in qws) or len({stack_key(qw) for qw in qws}) != 1:
            return None
        return self.matmul_nbits(x, stack_name(modules), stack_rows(qws), count=len(modules))

    def linear(self, x: str, module: str) -> str:
        if module in self.ckpt.qweights:
            return self.matmul_nbits(x, module, self.ckpt.qweights[module])
        g, tensors = self.g, self.ckpt.tensors
        w = self.float_weight(module + ".weight")  # a linear the checkpoint keeps in float
        y = g.op("MatMul", [x, g.const(module + ".weight_t", np.ascontiguousarray(w.T))])
        if module + ".bias" in tensors:
            y = g.op("Add", [y, g.const(module + ".bias", tensors[module + ".bias"])])
        return y

    def matmul_nbits(self, x: str, module: str, qw: QuantWeight, count: int = 1) -> str:
        """x @ dequant(qw).T (+ bias); `count`: how many of the checkpoint's linears it computes."""
        w = self.nbits_inputs(module, qw)
        y = self.g.op("MatMulNBits", [x, *w.names], domain=MS, K=w.k, N=w.n, bits=w.bits, block_size=w.block,
                      accuracy_level=self.accuracy_level)
        key = _scheme(qw, w.block)
        self.report.layers[key] = self.report.layers.get(key, 0) + count
        if qw.bias is not None:
            y = self.g.op("Add", [y, self.g.const(f"{module}.bias", qw.bias.astype(np.float32))])
        return y

    def nbits_inputs(self, module: str, qw: QuantWeight) -> Packed:
        """The MatMulNBits initializers of one weight (B, scales[, zero_points]), made once."""
        if module not in self.packed:
            w = to_nbits(qw, module, self.max_block)
            names = [self.g.const(f"{module}.B", w.b), self.g.const(f"{module}.scales", w.scales)]
            if w.zero_points is not None:
                names.append(self.g.const(f"{module}.zero_points", w.zero_points))
            self.packed[module] = Packed(names, w.bits, w.block, w.k, w.n)
        return self.packed[module]

    def float_weight(self, name: str) -> np.ndarray:
        if name not in self.ckpt.tensors:
            raise ONNXExportError(f"the checkpoint has no tensor {name}; it is incomplete: write it again")
        return self.ckpt.tensors[name]
