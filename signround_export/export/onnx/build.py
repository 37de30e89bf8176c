"""ONNX export for onnxruntime: the LLaMA decoder as fused contrib ops over MatMulNBits weights.

The graph, per decoder block i (x: the residual stream, float32 [batch, seq, hidden]):

    h       = SimplifiedLayerNormalization(x)                  (block 0; later blocks get h and x
    h, x    = SkipSimplifiedLayerNormalization(out, x)          from the previous block's output)
    q, k, v = Split(MatMulNBits_qkv(h))  (+ bias for qwen2; q, k, v stacked row after row, or one
              MatMulNBits each where their integers differ in layout)
    a, present.i.key, present.i.value
            = GroupQueryAttention(q, k, v, past_key_values.i.*, seqlens_k, total_seq_len, cos, sin)
              (rotary fused, half-split layout like HF's rotate_half)
    out     = MatMulNBits(a)
    h, x    = SkipSimplifiedLayerNormalization(out, x)
    gate, up = Split(MatMulNBits_gate_up(h))  (stacked the same way)
    out     = MatMulNBits_down(silu(gate) * up)

then logits = head(SkipSimplifiedLayerNormalization(out, x)). Inputs and outputs use
onnxruntime-genai's names, and genai_config.json beside model.onnx lets onnxruntime-genai run the
folder unchanged. seqlens_k = sum(attention_mask) - 1 and total_seq_len = attention_mask's length,
as GroupQueryAttention wants them.

The head is the checkpoint's: its integers when it quantized the lm_head, else float (a Gemm that
shares the embedding's initializer when the two are tied). --lm-head-bits 4|8 rounds a float head to
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

from ...checkpoint.format import Checkpoint
from ...checkpoint.qweight import QuantWeight
from ...errors import ONNXExportError
from ...fileio import atomic_dir
from ...model.config import ModelConfig
from ...model.folder import config_token_id, copy_tokenizer_files
from ...model.rope import rope_tables
from .matmulnbits import to_nbits
from .stacking import stack_key, stack_name, stack_rows

OPSET = 17
IR_VERSION = 8  # the IR of opset 17; onnx writes its newest IR by default, which older onnxruntime refuses
MS = "com.microsoft"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot hold more than 2 GB in one file
HEAD_GROUP = 32  # group of a head rounded here (--lm-head-bits), as onnxruntime-genai's builder uses


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


class GraphBuilder:
    """Nodes and initializers with unique names; op() returns the output names."""

    def __init__(self):
        self.nodes, self.initializers, self.count = [], [], 0

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs=None, **attrs):
        from onnx import helper

        self.count += 1
        name = f"/{op_type}_{self.count}"
        outputs = outputs or [f"{name}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


def _scheme(qw: QuantWeight, block: int) -> str:
    return f"W{qw.bits} block {block} {'sym' if qw.sym else 'asym'}"


def export_onnx(ckpt: Checkpoint, out_dir, *, accuracy_level: int = 4, lm_head_bits: int | None = None,
                max_block: int = 32) -> ONNXExport:
    """Write the ONNX folder (model.onnx, genai_config.json, tokenizer files) atomically."""
    import onnx
    from onnx import TensorProto, helper

    t0 = time.perf_counter()
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ONNXExportError(f"--accuracy-level {accuracy_level}: choose 0 (exact), 1, 2, 3 or 4 (int8 activations)")
    if lm_head_bits not in (None, 4, 8, 16):
        raise ONNXExportError(f"--lm-head-bits {lm_head_bits}: choose 4, 8 or 16")
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    if cfg.head_dim % 16:
        raise ONNXExportError(f"head size {cfg.head_dim} is not a multiple of 16, which onnxruntime's "
                              "GroupQueryAttention requires")
    report = ONNXExport(folder=Path(out_dir), accuracy_level=accuracy_level)
    g = GraphBuilder()
    tensors = ckpt.tensors

    def float_weight(name: str) -> np.ndarray:
        if name not in tensors:
            raise ONNXExportError(f"the checkpoint has no tensor {name}; it is incomplete")
        return tensors[name]

    packed: dict[str, tuple[list[str], object]] = {}

    def nbits_inputs(module: str, qw: QuantWeight):
        """The MatMulNBits initializers of one weight (B, scales[, zero_points]), made once."""
        if module not in packed:
            try:
                w = to_nbits(qw, module, max_block)
            except ValueError as e:
                raise ONNXExportError(str(e)) from None
            names = [g.const(f"{module}.B", w.b), g.const(f"{module}.scales", w.scales)]
            if w.zero_points is not None:
                names.append(g.const(f"{module}.zero_points", w.zero_points))
            packed[module] = names, w
        return packed[module]

    def matmul_nbits(x: str, module: str, qw: QuantWeight, count: int = 1) -> str:
        names, w = nbits_inputs(module, qw)
        y = g.op("MatMulNBits", [x, *names], domain=MS, K=w.k, N=w.n, bits=w.bits, block_size=w.block,
                 accuracy_level=accuracy_level)
        key = _scheme(qw, w.block)
        report.layers[key] = report.layers.get(key, 0) + count
        if qw.bias is not None:
            y = g.op("Add", [y, g.const(f"{module}.bias", qw.bias.astype(np.float32))])
        return y

    def linears(x: str, modules: list[str]) -> list[str]:
        """Linears that read the same input (q, k, v; gate, up). When their integers share one layout they
        run as one MatMulNBits over their stacked rows and a Split: decode measured about 8% faster
        than one MatMulNBits each (docs/benchmarks.md). Otherwise one each."""
        qws = [ckpt.qweights.get(m) for m in modules]
        if any(qw is None for qw in qws) or len({stack_key(qw) for qw in qws}) != 1:
            return [linear(x, m) for m in modules]
        name = stack_name(modules)
        y = matmul_nbits(x, name, stack_rows(qws), count=len(modules))
        return g.op("Split", [y, g.const(name + ".split", np.array([qw.shape[0] for qw in qws]))],
                    n_out=len(modules), axis=-1)

    def linear(x: str, module: str) -> str:
        if module in ckpt.qweights:
            return matmul_nbits(x, module, ckpt.qweights[module])
        w = float_weight(module + ".weight")  # a linear the checkpoint keeps in float
        y = g.op("MatMul", [x, g.const(module + ".weight_t", np.ascontiguousarray(w.T))])
        if module + ".bias" in tensors:
            y = g.op("Add", [y, g.const(module + ".bias", tensors[module + ".bias"])])
        return y

    # inputs and the attention bookkeeping GroupQueryAttention wants
    kv_shape = ["batch_size", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
    present_shape = ["batch_size", cfg.n_kv_heads, "total_sequence_length", cfg.head_dim]
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present_shape))
    mask_sum = g.op("ReduceSum", ["attention_mask", g.const("axis_1", np.array([1], dtype=np.int64))], keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [mask_sum, g.const("one_i64", np.array(1, dtype=np.int64))])],
                     to=TensorProto.INT32)
    total_len = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]),
                                              g.const("index_1", np.array(1, dtype=np.int64))], axis=0)],
                     to=TensorProto.INT32)
    cos, sin = rope_tables(cfg, cfg.max_positions)
    cos, sin = g.const("cos_cache", cos), g.const("sin_cache", sin)

    head_qw, report.head = plan_head(cfg, ckpt, lm_head_bits)
    tied = "lm_head.weight" not in tensors and "lm_head" not in ckpt.qweights
    shared = tied and head_qw is not None
    if shared:
        names, w = nbits_inputs("lm_head", head_qw)  # packed once: the head below uses the same initializers
        shared = w.k % w.block == 0  # B viewed as [vocab, hidden * bits / 8] needs whole blocks per row
    if shared:
        # the head was rounded here from the tied embedding: the embedding reads the same integers, so
        # the file holds the matrix once
        data = g.op("Reshape", [names[0], g.const("embed_data_shape", np.array([w.n, -1], dtype=np.int64))])
        x = g.op("GatherBlockQuantized", [data, "input_ids", *names[1:]], domain=MS, bits=w.bits,
                 block_size=w.block, gather_axis=0, quantize_axis=1)
        embed = None
        report.head += "; the tied embedding reads the same integers (GatherBlockQuantized)"
    else:
        embed = g.const("model.embed_tokens.weight", float_weight("model.embed_tokens.weight"))
        x = g.op("Gather", [embed, "input_ids"], axis=0)
    out = None
    eps = float(cfg.rms_eps)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        ln1 = g.const(p + "input_layernorm.weight", float_weight(p + "input_layernorm.weight"))
        if out is None:
            h = g.op("SimplifiedLayerNormalization", [x, ln1], axis=-1, epsilon=eps, stash_type=1)
        else:
            h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [out, x, ln1], n_out=4, domain=MS, epsilon=eps)
        q, k, v = linears(h, [p + f"self_attn.{n}_proj" for n in "qkv"])
        attn, _, _ = g.op("GroupQueryAttention", [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                                  seqlens_k, total_len, cos, sin],
                          outputs=[f"/attn_{i}", f"present.{i}.key", f"present.{i}.value"], domain=MS,
                          num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, scale=1.0 / math.sqrt(cfg.head_dim),
                          do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        out = linear(attn, p + "self_attn.o_proj")
        ln2 = g.const(p + "post_attention_layernorm.weight", float_weight(p + "post_attention_layernorm.weight"))
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", [out, x, ln2], n_out=4, domain=MS, epsilon=eps)
        gate, up = linears(h, [p + "mlp.gate_proj", p + "mlp.up_proj"])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        out = linear(act, p + "mlp.down_proj")
    norm = g.const("model.norm.weight", float_weight("model.norm.weight"))
    h = g.op("SkipSimplifiedLayerNormalization", [out, x, norm], n_out=4, domain=MS, epsilon=eps)[0]
    if head_qw is not None:
        g.op("Identity", [matmul_nbits(h, "lm_head", head_qw)], outputs=["logits"])
    else:
        float_head(g, cfg, ckpt, h, embed)

    graph = helper.make_graph(g.nodes, "signround-llama", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="signround-export")
    model.ir_version = IR_VERSION
    total = sum(t.ByteSize() for t in g.initializers)
    with atomic_dir(out_dir) as tmp:
        onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=total > EXTERNAL_DATA_BYTES,
                        all_tensors_to_one_file=True, location="model.onnx.data")
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(cfg, ckpt), indent=2) + "\n")
        copy_tokenizer_files(ckpt.path, tmp)
    report.bytes = sum(f.stat().st_size for f in Path(out_dir).iterdir())
    report.seconds = time.perf_counter() - t0
    return report


def plan_head(cfg: ModelConfig, ckpt: Checkpoint, lm_head_bits) -> tuple[QuantWeight | None, str]:
    """The head's integers (the checkpoint's, or a float head rounded to lm_head_bits here) or None for a
    float head, and a sentence for the report."""
    import torch

    from ...checkpoint.qweight import Scheme
    from ...tune.quantizer import to_qweight

    if "lm_head" in ckpt.qweights:
        qw = ckpt.qweights["lm_head"]
        return qw, f"the checkpoint's W{qw.bits} integers"
    if lm_head_bits not in (4, 8):
        return None, "float32" + ("" if "lm_head.weight" in ckpt.tensors else ", shared with the embedding")
    w = ckpt.tensors.get("lm_head.weight", ckpt.tensors["model.embed_tokens.weight"])
    bias = ckpt.tensors.get("lm_head.bias")
    group = HEAD_GROUP if cfg.hidden_size % HEAD_GROUP == 0 else -1
    qw = to_qweight(torch.from_numpy(w), Scheme(lm_head_bits, group, True),
                    bias=None if bias is None else torch.from_numpy(bias))
    return qw, (f"float in the checkpoint, rounded to nearest here at W{lm_head_bits} group {qw.group_size} "
                "symmetric (--lm-head-bits)")


def float_head(g: GraphBuilder, cfg: ModelConfig, ckpt: Checkpoint, h: str, embed: str | None) -> None:
    """logits = h @ W.T as a Gemm with transB, which reads the [vocab, hidden] matrix as it lies, so a
    tied head shares the embedding's initializer."""
    weight = ckpt.tensors.get("lm_head.weight")
    w = embed if weight is None else g.const("lm_head.weight", weight)
    bias = ckpt.tensors.get("lm_head.bias")
    flat = g.op("Reshape", [h, g.const("flat_shape", np.array([-1, cfg.hidden_size], dtype=np.int64))])
    gemm_inputs = [flat, w] + ([g.const("lm_head.bias", bias)] if bias is not None else [])
    logits = g.op("Gemm", gemm_inputs, transB=1)
    ids_shape = g.op("Shape", ["input_ids"])
    shape = g.op("Concat", [ids_shape, g.const("vocab", np.array([cfg.vocab_size], dtype=np.int64))], axis=0)
    g.op("Reshape", [logits, shape], outputs=["logits"])


def genai_config(cfg: ModelConfig, ckpt: Checkpoint) -> dict:
    """onnxruntime-genai's genai_config.json for this graph."""
    eos = config_token_id(ckpt.path, ckpt.hf_config, "eos")
    pad = config_token_id(ckpt.path, ckpt.hf_config, "pad")
    return {
        "model": {
            "bos_token_id": config_token_id(ckpt.path, ckpt.hf_config, "bos"),
            "context_length": cfg.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers,
                "num_key_value_heads": cfg.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": cfg.model_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": cfg.max_positions, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
