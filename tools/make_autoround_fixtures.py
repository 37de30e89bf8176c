"""Build the auto-round checkpoint fixtures in tests/fixtures/autoround/ with auto-round itself.

Each fixture is the folder auto-round 0.16 writes with format "auto_round" for a tiny random LLaMA
(2 layers, vocab 64, hidden 64, intermediate 96, 4 heads, 2 kv heads, tied embeddings), plus
`expected.npz`: {module name: float32 weight [N, K]} as auto-round's own inference code dequantizes
it from the packed tensors (its torch QuantLinear, or its AWQ unpacking, run in float32). To keep the
fixtures small, expected.npz holds layer 0's seven modules and every module named in extra_config;
layer 1 repeats layer 0's shapes. tests/test_checkpoint.py proves our reader gives the same weights.
`fixtures.json` records what auto-round chose for each.

| fixture     | asked for                          | auto-round wrote     | covers                          |
| ----------- | ---------------------------------- | -------------------- | ------------------------------- |
| w4_sym_g64  | 4-bit symmetric, group 64          | auto_round:auto_gptq | zero stored minus 1; K=96 makes |
|             |                                    |                      | a short last group              |
| w4_asym_g32 | 4-bit asymmetric, group 32         | auto_round:auto_awq  | AWQ nibble order, along N       |
| w3_asym_g32 | 3-bit asymmetric, group 32; layer  | auto_round           | 3-bit words, extra_config (it   |
|             | 0 v_proj 2-bit, layer 1 down 8-bit |                      | made the 8-bit layer symmetric) |
| w2_asym_g64 | 2-bit asymmetric, group 64         | auto_round           | 2-bit, short last group         |
| w8_sym_gm1  | 8-bit symmetric, per channel (-1)  | auto_round:auto_gptq | 8-bit, one group per row        |

auto-round 0.16.1 refuses 8-bit asymmetric as the default scheme of this format (vLLM serves W8 GPTQ
weights symmetric only; AR_ALLOW_W8_ASYM=1 would skip the check), so W8 is symmetric here.

auto-round is not a dependency of the project. The fixtures are committed; to rebuild them, in a
throwaway virtualenv outside the repository (torch first and pinned, or pip pulls a CUDA build):

    python3 -m venv /tmp/ar-venv
    /tmp/ar-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/ar-constraints.txt
    /tmp/ar-venv/bin/pip install auto-round==0.16.1 -c /tmp/ar-constraints.txt
    HF_HUB_OFFLINE=1 /tmp/ar-venv/bin/python tools/make_autoround_fixtures.py   # about a minute

Nothing is downloaded: the model is random and the calibration samples are random token ids.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "autoround"

FIXTURES = {
    "w4_sym_g64": dict(bits=4, group_size=64, sym=True),
    "w4_asym_g32": dict(bits=4, group_size=32, sym=False),
    "w3_asym_g32": dict(bits=3, group_size=32, sym=False, layer_config={
        "model.layers.1.mlp.down_proj": {"bits": 8},
        "model.layers.0.self_attn.v_proj": {"bits": 2},
    }),
    "w2_asym_g64": dict(bits=2, group_size=64, sym=False),
    "w8_sym_gm1": dict(bits=8, group_size=-1, sym=True),
}


def tiny_tokenizer():
    """A 64-token character-level tokenizer (auto-round insists on one; calibration uses token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "<>" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "0123456789"
    vocab = {"<unk>": 0, "<eos>": 1} | {c: i + 2 for i, c in enumerate(chars[:62])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama(folder: Path) -> None:
    """A seeded random 2-layer LLaMA saved as an HF folder with its tokenizer."""
    from transformers import LlamaForCausalLM, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():  # wider than the default init, with a few outliers, like trained weights
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
                p[torch.rand_like(p) < 0.01] *= 6
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)


def quantize(src: Path, out: Path, spec: dict) -> None:
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 64, (1, 16), generator=gen) for _ in range(4)]
    ar = AutoRound(model, tokenizer=tokenizer, bits=spec["bits"], group_size=spec["group_size"], sym=spec["sym"],
                   layer_config=spec.get("layer_config"), dataset=calib, nsamples=4, seqlen=16, batch_size=2,
                   iters=4, device_map="cpu", seed=0, enable_torch_compile=False)
    with tempfile.TemporaryDirectory() as tmp:
        ar.quantize_and_save(tmp, format="auto_round")
        written = [c.parent for c in Path(tmp).rglob("config.json")]  # it adds a subfolder named after the scheme
        assert len(written) == 1, written
        shutil.move(str(written[0]), str(out))


def autoround_dequantized(folder: Path) -> dict[str, np.ndarray]:
    """Weights [N, K] as auto-round's own inference code dequantizes them, computed in float32."""
    from auto_round.export.export_to_awq.utils import dequantize_gemm
    from auto_round_extension.torch import qlinear_torch, qlinear_torch_zp
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    fmt = cfg["packing_format"]
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    extra = cfg.get("extra_config", {})
    out = {}
    for key in sorted(k for k in state if k.endswith(".qweight")):
        name = key[: -len(".qweight")]
        if not (name.startswith("model.layers.0.") or name in extra):
            continue
        over = extra.get(name, {})
        bits = over.get("bits", cfg["bits"])
        group = over.get("group_size", cfg["group_size"])
        scales = state[name + ".scales"].float()
        n = scales.shape[1]
        if fmt == "auto_round:auto_awq":
            k = state[key].shape[0]
            group = k if group == -1 else group
            w = dequantize_gemm(state[key], state[name + ".qzeros"], scales, bits, group)  # [K, N]
        else:
            k = state[key].shape[0] * 32 // bits
            cls = qlinear_torch_zp.QuantLinear if fmt == "auto_round:auto_gptq" else qlinear_torch.QuantLinear
            layer = cls(bits, group, k, n, bias=False)
            layer.qweight, layer.qzeros, layer.scales = state[key], state[name + ".qzeros"], scales
            if k % group:
                # Its plain path repeats each scale `group` times and fails on a short last group;
                # its act-order path indexes scales by g_idx and handles one (here K >= N, as it needs).
                assert k >= n, name
                layer.register_buffer("g_idx", torch.arange(k, dtype=torch.int32) // group)
            w = layer(torch.eye(k)).reshape(k, n)  # x = I: the output is the dequantized weight, transposed
        out[name] = w.t().contiguous().numpy().astype(np.float32)
    return out


def main() -> int:
    import auto_round

    OUT.mkdir(parents=True, exist_ok=True)
    record = {"auto_round_version": auto_round.__version__, "fixtures": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "float"
        tiny_llama(src)
        for name, spec in FIXTURES.items():
            out = OUT / name
            shutil.rmtree(out, ignore_errors=True)
            quantize(src, out, spec)
            expected = autoround_dequantized(out)
            np.savez_compressed(out / "expected.npz", **expected)
            qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
            record["fixtures"][name] = {"asked": spec, "packing_format": qcfg["packing_format"],
                                        "extra_config": qcfg.get("extra_config", {}),
                                        "expected_modules": sorted(expected)}
            print(f"{name}: {qcfg['packing_format']}", file=sys.stderr)
    (OUT / "fixtures.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
