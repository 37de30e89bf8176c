"""Fixtures of both test suites (tests/ and runtime/tests/): tiny random LLaMA-family models with real
shapes, built in the test session (nothing downloaded), and the default model where it is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent
DEFAULT_MODEL = REPO / "models" / "smollm2-135m-instruct"
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a few bits; "
    "rounding offsets and clipping ranges are tuned block by block with signed gradient descent. "
    "def f(x): return x * 2  # numbers 0123456789 and symbols ()[]{}<>=+-*/.,:;!?'\"\n"
)


def make_tokenizer(vocab_size: int = 320):  # above 256 bytes: BPE merges, which llama.cpp needs
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TOKENIZER_TEXT] * 20, trainer=trainer)
    return tok


def write_tiny_model(folder: Path, *, hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2,
                     tied=True, model_type="llama", seed=0, vocab_size=320, extra=None, tokenizer=None) -> Path:
    """A random HF model folder: config.json, model.safetensors, tokenizer.json. extra: more config keys
    (head_dim, use_sliding_window, ...); tokenizer: a tokenizers.Tokenizer to use (its size is the model's
    vocabulary) instead of a byte-level BPE of vocab_size tokens."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or make_tokenizer(vocab_size)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    cfg = AutoConfig.for_model(
        model_type, vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=10000.0,
        **(extra or {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # the default init is tiny; wider weights give outliers like a trained model
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
                p[torch.rand_like(p) < 0.01] *= 6
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # per-head norms: not all ones
                p.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The n tokens a model's PyTorch forward picks greedily after prompt (no KV cache)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def assert_greedy_decode_equals_reference(ckpt_dir: Path, onnx_dir: Path, new_tokens: int = 32) -> None:
    """The checkpoint's ONNX export (accuracy level 0) decodes greedily, with its KV cache, the tokens the
    PyTorch reference picks: through the runtime, and through onnxruntime-genai under the folder's
    genai_config.json model type."""
    runtime = pytest.importorskip("signround_runtime")
    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.export.onnx import export_onnx
    from signround_export.model.load import reference_from_checkpoint

    ckpt = read_checkpoint(ckpt_dir)
    export_onnx(ckpt, onnx_dir, accuracy_level=0)
    prompt = [5, 17, 42, 99, 3, 250]
    ids = prompt + reference_greedy(reference_from_checkpoint(ckpt), prompt, new_tokens)
    got = runtime.Model(onnx_dir, threads=2).generate([prompt], max_new_tokens=new_tokens, stop_ids=set())
    assert got.tokens[0] == ids[len(prompt):]
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][len(prompt):] == ids[len(prompt):]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not (DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip(f"{DEFAULT_MODEL} is not built (run `make setup`)")
    return DEFAULT_MODEL


def rtn_checkpoint(model_dir: Path, out: Path, *, bits=4, group_size=32, sym=False, quant_lm_head=False) -> Path:
    """A round-to-nearest checkpoint (iters 0) of a model folder, written by the real CLI in-process."""
    from signround_export.cli import main

    args = ["tune", str(model_dir), "--out", str(out), "--iters", "0", "--bits", str(bits),
            "--group-size", str(group_size), "--sym" if sym else "--asym", "--quiet"]
    if quant_lm_head:
        args.append("--quant-lm-head")
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def default_checkpoint_w4(default_model, tmp_path_factory) -> Path:
    """The default model at W4G128 asymmetric, round to nearest: the real-model checkpoint exporters test on."""
    return rtn_checkpoint(default_model, tmp_path_factory.mktemp("smollm2-w4") / "ckpt", bits=4, group_size=128)
