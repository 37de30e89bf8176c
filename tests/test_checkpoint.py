"""The checkpoint format: bit packing, write/read round trips, auto-round's own files, broken files."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from signround_export.checkpoint.format import AWQ, GPTQ, GPTQ_V1, QuantConfig
from signround_export.checkpoint.packing import pack_awq, pack_bits, unpack_awq, unpack_bits, words_for
from signround_export.checkpoint.qweight import QuantWeight
from signround_export.checkpoint.read import read_checkpoint
from signround_export.checkpoint.write import write_checkpoint
from signround_export.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "autoround"
AUTOROUND = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576}


def random_qweight(rng, n, k, bits, group, sym, bias=False) -> QuantWeight:
    gs = k if group == -1 else group
    g = math.ceil(k / gs)
    maxq = 2**bits - 1
    q = rng.integers(0, maxq + 1, (n, k)).astype(np.uint8)
    q[0, 0], q[-1, -1] = 0, maxq
    if sym:
        zero = np.full((n, g), 2 ** (bits - 1), np.uint8)
    else:
        zero = rng.integers(0, maxq + 1, (n, g)).astype(np.uint8)
        zero[0, 0], zero[-1, -1] = 0, maxq  # the ends of the range must survive packing
    scale = (rng.uniform(1e-3, 0.1, (n, g)) * rng.choice([-1, 1], (n, g))).astype(np.float16).astype(np.float32)
    b = rng.normal(size=n).astype(np.float32) if bias else None
    return QuantWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=gs, sym=sym, bias=b)


def assert_same(a: QuantWeight, b: QuantWeight, name=""):
    for f in ("q", "zero", "scale"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{name}.{f}")
    assert (a.offset is None) == (b.offset is None), name
    if a.offset is not None:
        np.testing.assert_array_equal(a.offset, b.offset, err_msg=f"{name}.offset")
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym), name
    assert (a.bias is None) == (b.bias is None), name
    if a.bias is not None:
        np.testing.assert_array_equal(a.bias, b.bias)


def small_checkpoint(path: Path, bits=4, sym=True, group=32, fmt=None) -> Path:
    rng = np.random.default_rng(7)
    qweights = {f"model.layers.0.self_attn.{p}": random_qweight(rng, 48, 64, bits, group, sym)
                for p in ("q_proj", "k_proj")}
    tensors = {"model.embed_tokens.weight": rng.normal(size=(16, 64)).astype(np.float32),
               "model.norm.weight": np.ones(64, np.float32)}
    quant = QuantConfig(bits=bits, group_size=group, sym=sym, packing_format=fmt or (GPTQ_V1 if sym else GPTQ))
    return write_checkpoint(path, HF_CONFIG, quant, qweights, tensors)


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite model.safetensors after `edit(tensors)` changed the dict in place."""
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


# --- packing ---------------------------------------------------------------------------------


def test_pack_bits_known_words():
    # 4-bit: element j in bits 4j..4j+3 of the word
    assert pack_bits(np.arange(8, dtype=np.uint8), 4, 0).view(np.uint32).tolist() == [0x76543210]
    # 3-bit: element 10 straddles words 0 and 1 (its low 2 bits at 30..31, its high bit at bit 0)
    v = np.zeros(32, np.uint8)
    v[10] = 0b111
    assert pack_bits(v, 3, 0).view(np.uint32).tolist() == [0xC0000000, 0x1, 0]
    # element 21: low bit at 31 of word 1, high 2 bits at 0..1 of word 2
    v[:] = 0
    v[21] = 0b111
    assert pack_bits(v, 3, 0).view(np.uint32).tolist() == [0, 0x80000000, 0x3]
    # AWQ: nibble j holds element (0, 2, 4, 6, 1, 3, 5, 7)[j]
    assert pack_awq(np.arange(8, dtype=np.uint8)).view(np.uint32).tolist() == [0x75316420]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("count", [32, 40, 96, 7])
def test_pack_unpack_round_trip(bits, count):
    rng = np.random.default_rng(bits * 100 + count)
    v = rng.integers(0, 2**bits, (5, count)).astype(np.uint8)
    words = pack_bits(v, bits, axis=1)
    assert words.dtype == np.int32 and words.shape == (5, words_for(count, bits)) == (5, math.ceil(count * bits / 32))
    np.testing.assert_array_equal(unpack_bits(words, bits, count, axis=1), v)
    np.testing.assert_array_equal(unpack_bits(pack_bits(v.T, bits, axis=0), bits, count, axis=0), v.T)


def test_awq_round_trip_and_value_range():
    v = np.random.default_rng(0).integers(0, 16, (3, 24)).astype(np.uint8)
    np.testing.assert_array_equal(unpack_awq(pack_awq(v)), v)
    with pytest.raises(ValueError, match="4 bits"):
        pack_awq(np.full(8, 16, np.uint8))
    with pytest.raises(ValueError, match="3 bits"):
        pack_bits(np.full(32, 8, np.uint8), 3, 0)


# --- write / read round trips ----------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_round_trip(tmp_path, bits, sym, group):
    # K=576 with groups of 128 leaves a short last group (5 groups); N=40 is no multiple of 32, so the
    # 3-bit zero points end in a partly filled word.
    rng = np.random.default_rng(bits + 10 * sym + group)
    qweights = {"model.layers.0.self_attn.q_proj": random_qweight(rng, 40, 576, bits, group, sym, bias=True),
                "model.layers.0.mlp.down_proj": random_qweight(rng, 64, 128, bits, group, sym)}
    tensors = {"model.embed_tokens.weight": rng.normal(size=(10, 576)).astype(np.float32)}
    quant = QuantConfig(bits=bits, group_size=group, sym=sym, packing_format=GPTQ_V1 if sym else GPTQ, iters=3)
    ckpt = read_checkpoint(write_checkpoint(tmp_path / "ckpt", HF_CONFIG, quant, qweights, tensors))
    assert ckpt.qweights.keys() == qweights.keys()
    for name, qw in qweights.items():
        assert_same(qw, ckpt.qweights[name], name)
    if group == 128:
        assert ckpt.qweights["model.layers.0.self_attn.q_proj"].scale.shape == (40, 5)
    np.testing.assert_array_equal(ckpt.tensors["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert ckpt.quant.packing_format == (GPTQ_V1 if sym else GPTQ)
    assert not ckpt.quant.extra_config


def test_float_offsets_round_trip_beside_integer_zero_layers(tmp_path):
    rng = np.random.default_rng(5)
    with_offsets = random_qweight(rng, 40, 512, 4, 32, sym=False)
    with_offsets.zero[:] = 0
    with_offsets.offset = rng.uniform(0, 0.5, with_offsets.scale.shape).astype(np.float16).astype(np.float32)
    qweights = {"model.layers.0.mlp.down_proj": with_offsets,
                "model.layers.0.mlp.up_proj": random_qweight(rng, 40, 512, 4, 32, sym=False)}
    folder = write_checkpoint(tmp_path / "c", HF_CONFIG, QuantConfig(4, 32, False, GPTQ), qweights, {})
    ckpt = read_checkpoint(folder)
    for name, qw in qweights.items():
        assert_same(qw, ckpt.qweights[name], name)
    w = ckpt.qweights["model.layers.0.mlp.down_proj"]
    np.testing.assert_array_equal(w.dequantize(), w.q * w.scale[:, w.group_index()] - w.offset[:, w.group_index()])
    with safe_open(str(folder / "model.safetensors"), "np") as f:
        assert "model.layers.0.mlp.up_proj.offsets" not in f.keys()  # only the layers that have them
    edit_tensors(folder, lambda t: t.update({"model.layers.0.mlp.down_proj.offsets":
                                             t["model.layers.0.mlp.down_proj.offsets"][:, :5]}))
    with pytest.raises(CheckpointError, match="down_proj.offsets has shape"):
        read_checkpoint(folder)
    not_f16 = replace(with_offsets, offset=with_offsets.offset + np.float32(1e-7))
    with pytest.raises(ValueError, match="offsets are not float16 values"):
        write_checkpoint(tmp_path / "e", HF_CONFIG, QuantConfig(4, 32, False, GPTQ),
                         {"model.layers.0.mlp.down_proj": not_f16}, {})
    bad = replace(with_offsets, zero=np.ones_like(with_offsets.zero))
    with pytest.raises(ValueError, match="keeps its zero points at 0"):
        write_checkpoint(tmp_path / "d", HF_CONFIG, QuantConfig(4, 32, False, GPTQ), {"model.layers.0.mlp.down_proj": bad}, {})


def test_symmetric_weights_round_trip_in_plain_auto_round_packing(tmp_path):
    ckpt = read_checkpoint(small_checkpoint(tmp_path / "c", bits=4, sym=True, fmt=GPTQ))
    assert ckpt.quant.packing_format == GPTQ
    assert all(np.all(qw.zero == 8) for qw in ckpt.qweights.values())


def test_layout_and_config_on_disk(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (src / name).write_text("{}")
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    rng = np.random.default_rng(1)
    qw = random_qweight(rng, 40, 96, 4, 64, True)
    quant = QuantConfig(bits=4, group_size=64, sym=True, iters=200, tuning={"lr": 0.005, "nsamples": 128})
    out = write_checkpoint(tmp_path / "ckpt", HF_CONFIG | {"quantization_config": {"old": 1}}, quant,
                           {"model.layers.0.mlp.up_proj": qw}, {}, tokenizer_src_dir=src,
                           tuning_log={"blocks": [1, 2]})
    files = sorted(p.name for p in out.iterdir())
    assert files == ["additional_chat_templates", "chat_template.jinja", "config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json", "tuning_log.json"]
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["data_type"] == "int" and qc["packing_format"] == GPTQ_V1
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["iters"]) == (4, 64, True, 200)
    assert qc["block_name_to_quantize"] == "model.layers" and qc["quantizer"].startswith("signround-export ")
    assert "autoround_version" in qc and qc["tuning"] == {"lr": 0.005, "nsamples": 128} and "old" not in qc
    with safe_open(str(out / "model.safetensors"), "np") as f:
        p = "model.layers.0.mlp.up_proj"
        digests = {f"sha256:{t}": hashlib.sha256(f.get_tensor(t).tobytes()).hexdigest() for t in f.keys()}
        assert f.metadata() == {"format": "pt"} | digests and len(digests) == 3
        assert f.get_tensor(p + ".qweight").dtype == np.int32 and f.get_tensor(p + ".qweight").shape == (12, 40)
        assert f.get_tensor(p + ".qzeros").shape == (2, 5)  # 2 groups (K=96, last one short) x 40*4/32 words
        assert f.get_tensor(p + ".scales").dtype == np.float16 and f.get_tensor(p + ".scales").shape == (2, 40)
        assert np.all(unpack_bits(f.get_tensor(p + ".qzeros"), 4, 40, axis=1) == 7)  # zero 8 stored minus 1
    ckpt = read_checkpoint(out)
    assert ckpt.tuning_log == {"blocks": [1, 2]} and ckpt.quant.tuning == quant.tuning
    assert "quantization_config" not in ckpt.hf_config and ckpt.hf_config["hidden_size"] == 576


def test_per_layer_overrides_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    qweights = {
        "model.layers.0.self_attn.q_proj": random_qweight(rng, 64, 64, 4, 128, True),  # the default
        "model.layers.0.mlp.down_proj": random_qweight(rng, 64, 96, 8, 128, True),  # by the user's regex
        "model.layers.1.mlp.down_proj": random_qweight(rng, 64, 96, 8, 32, False),  # regex + its own group
        "model.layers.1.self_attn.v_proj": random_qweight(rng, 32, 64, 3, 32, False),  # no entry given
        "model.layers.1.self_attn.o_proj": random_qweight(rng, 64, 64, 2, -1, False),  # per channel
        "lm_head": random_qweight(rng, 16, 64, 4, 128, True),  # outside the blocks
    }
    tensors = {"model.layers.0.mlp.up_proj.weight": rng.normal(size=(96, 64)).astype(np.float32)}  # left float
    quant = QuantConfig(bits=4, group_size=128, sym=True, packing_format=GPTQ,
                        extra_config={".*mlp\\.down_proj.*": {"bits": 8}})
    out = write_checkpoint(tmp_path / "ckpt", HF_CONFIG, quant, qweights, tensors)
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    assert extra[".*mlp\\.down_proj.*"] == {"bits": 8}
    assert "model.layers.0.mlp.down_proj" not in extra  # the regex already says it
    assert extra["model.layers.1.mlp.down_proj"] == {"bits": 8, "group_size": 32, "sym": False}
    assert extra["model.layers.1.self_attn.v_proj"] == {"bits": 3, "group_size": 32, "sym": False}
    assert extra["model.layers.1.self_attn.o_proj"] == {"bits": 2, "group_size": 64, "sym": False}
    assert extra["lm_head"] == {"bits": 4, "group_size": 128, "sym": True, "data_type": "int"}
    assert extra["model.layers.0.mlp.up_proj"] == {"bits": 16, "data_type": "fp"}

    ckpt = read_checkpoint(out)
    assert ckpt.qweights.keys() == qweights.keys()
    for name, qw in qweights.items():
        assert_same(qw, ckpt.qweights[name], name)
    np.testing.assert_array_equal(ckpt.tensors["model.layers.0.mlp.up_proj.weight"],
                                  tensors["model.layers.0.mlp.up_proj.weight"])
    assert ckpt.quant.layer_scheme("model.layers.0.mlp.down_proj") == (8, 128, True)
    assert ckpt.quant.layer_scheme("model.layers.0.mlp.up_proj")[0] == 16


def test_layer_scheme_exact_name_before_regex():
    qc = QuantConfig(bits=4, group_size=128, sym=True, extra_config={
        ".*down_proj.*": {"bits": 8}, "model.layers.3.mlp.down_proj": {"bits": 2, "sym": False},
        "[unclosed": {"bits": 3}})
    assert qc.layer_scheme("model.layers.3.mlp.down_proj") == (2, 128, False)
    assert qc.layer_scheme("model.layers.4.mlp.down_proj") == (8, 128, True)
    assert qc.layer_scheme("model.layers.4.mlp.up_proj") == (4, 128, True)


def test_quant_config_json_round_trip():
    qc = QuantConfig(bits=3, group_size=-1, sym=False, packing_format=GPTQ, extra_config={"lm_head": {"bits": 8}},
                     iters=5, tuning={"lr": 0.01})
    d = json.loads(json.dumps(qc.to_json()))
    assert QuantConfig.from_json(d) == replace(qc, quantizer=d["quantizer"])
    hf = json.loads((FIXTURES / "w4_sym_g64" / "config.json").read_text())
    theirs = QuantConfig.from_json(hf["quantization_config"])
    assert theirs.autoround_version == "0.16.1" and theirs.quantizer is None and theirs.iters == 4
    assert theirs.tuning == {"amp": False}  # auto-round's own recorded arguments


def test_sharded_checkpoint_reads_like_one_file(tmp_path):
    one = small_checkpoint(tmp_path / "one")
    sharded = tmp_path / "sharded"
    shutil.copytree(one, sharded)
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = read_checkpoint(one), read_checkpoint(sharded)
    for name in a.qweights:
        assert_same(a.qweights[name], b.qweights[name], name)
    assert a.tensors.keys() == b.tensors.keys()
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        read_checkpoint(sharded)


def test_failed_write_leaves_the_old_checkpoint(tmp_path):
    out = small_checkpoint(tmp_path / "ckpt")
    bad = random_qweight(np.random.default_rng(0), 8, 64, 4, 32, True)
    bad.scale[0, 0] = 0.1  # not a float16 value
    with pytest.raises(ValueError, match="float16"):
        write_checkpoint(out, HF_CONFIG, QuantConfig(bits=4, group_size=32, sym=True),
                         {"model.layers.0.mlp.up_proj": bad}, {})
    assert len(read_checkpoint(out).qweights) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("problem, kwargs, match", [
    ("asym in v1", dict(sym=False, fmt=GPTQ_V1), "asymmetric"),
    ("awq", dict(fmt=AWQ), "cannot write packing_format"),
])
def test_writer_refuses(tmp_path, problem, kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_checkpoint(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_writer_refuses_columns_that_do_not_fill_words_and_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    qc = QuantConfig(bits=3, group_size=32, sym=False, packing_format=GPTQ)
    up = "model.layers.0.mlp.up_proj"
    with pytest.raises(ValueError, match="K=40"):
        write_checkpoint(tmp_path / "c", HF_CONFIG, qc, {up: random_qweight(rng, 8, 40, 3, 32, False)}, {})
    with pytest.raises(ValueError, match="both"):
        write_checkpoint(tmp_path / "c", HF_CONFIG, qc, {up: random_qweight(rng, 8, 64, 3, 32, False)},
                         {up + ".weight": np.zeros((8, 64), np.float32)})


# --- auto-round's own checkpoints ------------------------------------------------------------


def test_fixtures_are_there():
    record = json.loads((FIXTURES / "fixtures.json").read_text())
    assert set(record["fixtures"]) == set(AUTOROUND)
    assert {f["packing_format"] for f in record["fixtures"].values()} == {GPTQ_V1, GPTQ, AWQ}


@pytest.mark.parametrize("name", AUTOROUND)
def test_reads_autoround_checkpoint_as_autoround_does(name):
    folder = FIXTURES / name
    record = json.loads((FIXTURES / "fixtures.json").read_text())["fixtures"][name]
    ckpt = read_checkpoint(folder)
    assert ckpt.quant.packing_format == record["packing_format"]
    assert len(ckpt.qweights) == 14  # 7 linears x 2 layers; the tied lm_head stays float
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= ckpt.tensors.keys()
    expected = np.load(folder / "expected.npz")
    assert set(expected.files) == set(record["expected_modules"])
    for module in expected.files:
        qw = ckpt.qweights[module]
        assert qw.shape == expected[module].shape
        scale = np.abs(qw.scale[:, qw.group_index()])
        err = np.abs(qw.dequantize() - expected[module]) / scale
        assert err.max() <= 1e-6, f"{module}: differs from auto-round's dequantization by {err.max()} steps"
        if qw.sym:
            assert np.all(qw.zero == 2 ** (qw.bits - 1)), module
    asked = record["asked"]
    down = ckpt.qweights["model.layers.0.mlp.down_proj"]  # K=96: groups of 64 leave a short last group
    assert down.shape == (64, 96)
    assert down.scale.shape[1] == (1 if asked["group_size"] == -1 else math.ceil(96 / asked["group_size"]))


def test_autoround_extra_config_is_honoured():
    ckpt = read_checkpoint(FIXTURES / "w3_asym_g32")
    assert ckpt.qweights["model.layers.0.self_attn.v_proj"].bits == 2
    assert ckpt.qweights["model.layers.1.mlp.down_proj"].bits == 8
    assert ckpt.qweights["model.layers.1.mlp.down_proj"].sym  # auto-round made its 8-bit layer symmetric
    assert ckpt.qweights["model.layers.0.mlp.down_proj"].bits == 3


@pytest.mark.parametrize("name", AUTOROUND)
def test_our_writer_packs_like_autoround(tmp_path, name):
    """Written again by us, the integers are the same; in auto-round's own layouts, so are the bytes."""
    ckpt = read_checkpoint(FIXTURES / name)
    quant = ckpt.quant
    if quant.packing_format == AWQ:
        quant = QuantConfig(**{**quant.__dict__, "packing_format": GPTQ})
    out = write_checkpoint(tmp_path / name, ckpt.hf_config, quant, ckpt.qweights, ckpt.tensors)
    again = read_checkpoint(out)
    for module, qw in ckpt.qweights.items():
        assert_same(qw, again.qweights[module], module)
    if ckpt.quant.packing_format != AWQ:
        theirs = load_file(str(FIXTURES / name / "model.safetensors"))
        ours = load_file(str(out / "model.safetensors"))
        for key in theirs:
            if key.endswith((".qweight", ".qzeros", ".scales")):
                np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


# --- broken checkpoints ----------------------------------------------------------------------


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        read_checkpoint(tmp_path / "nope")
    out = small_checkpoint(tmp_path / "c")
    (out / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        read_checkpoint(out)


def test_float_model_is_not_a_checkpoint(tmp_path):
    out = small_checkpoint(tmp_path / "c")
    edit_config(out, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="no quantization_config"):
        read_checkpoint(out)


def read_all(folder):
    """read_checkpoint checks headers when it opens a folder; values (scales, zero points, g_idx, NaN) are
    checked when an entry is indexed: read every entry."""
    ckpt = read_checkpoint(folder)
    for name in ckpt.qweights:
        ckpt.qweights[name]
    for name in ckpt.tensors:
        ckpt.tensors[name]
    return ckpt


@pytest.mark.parametrize("key, value, match", [
    ("quant_method", "gptq", "only auto-round"),
    ("packing_format", "auto_round:llm_compressor", "packing_format 'auto_round:llm_compressor'"),
    ("data_type", "nv_fp", "only integer"),
    ("bits", 5, "5-bit"),
])
def test_config_it_cannot_read(tmp_path, key, value, match):
    out = small_checkpoint(tmp_path / "c")
    edit_config(out, lambda c: c["quantization_config"].__setitem__(key, value))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(out)


def test_unsupported_bits_in_extra_config(tmp_path):
    out = small_checkpoint(tmp_path / "c")
    edit_config(out, lambda c: c["quantization_config"].__setitem__(
        "extra_config", {"model.layers.0.self_attn.k_proj": {"bits": 7}}))
    with pytest.raises(CheckpointError, match="k_proj is 7-bit"):
        read_checkpoint(out)


@pytest.mark.parametrize("suffix", ["qzeros", "scales"])
def test_missing_tensor(tmp_path, suffix):
    out = small_checkpoint(tmp_path / "c")
    edit_tensors(out, lambda t: t.pop(f"model.layers.0.self_attn.q_proj.{suffix}"))
    with pytest.raises(CheckpointError, match=f"no model.layers.0.self_attn.q_proj.{suffix}"):
        read_checkpoint(out)


def test_missing_qweight(tmp_path):
    out = small_checkpoint(tmp_path / "c")
    edit_tensors(out, lambda t: t.pop("model.layers.0.self_attn.q_proj.qweight"))
    with pytest.raises(CheckpointError, match="q_proj.qweight is missing"):
        read_checkpoint(out)


@pytest.mark.parametrize("suffix, shape, match", [
    ("scales", (3, 48), r"q_proj.scales has shape \[3, 48\], expected \[2, 48\]"),
    ("qweight", (8, 40), r"q_proj.qweight has shape \[8, 40\]"),
    ("qzeros", (2, 5), r"q_proj.qzeros has shape \[2, 5\], expected \[2, 6\]"),
])
def test_wrong_shape(tmp_path, suffix, shape, match):
    out = small_checkpoint(tmp_path / "c")
    key = f"model.layers.0.self_attn.q_proj.{suffix}"
    edit_tensors(out, lambda t: t.__setitem__(key, np.ones(shape, t[key].dtype)))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(out)


@pytest.mark.parametrize("value, match", [(np.nan, "NaN or infinity"), (np.inf, "NaN or infinity"), (0.0, "zeros")])
def test_bad_scales(tmp_path, value, match):
    out = small_checkpoint(tmp_path / "c")

    def spoil(t):
        t["model.layers.0.self_attn.k_proj.scales"][1, 3] = value

    edit_tensors(out, spoil)
    with pytest.raises(CheckpointError, match=f"model.safetensors: model.layers.0.self_attn.k_proj: scales contain "
                                              f"{match}"):
        read_all(out)


def test_nan_in_float_tensor(tmp_path):
    out = small_checkpoint(tmp_path / "c")
    edit_tensors(out, lambda t: t["model.norm.weight"].__setitem__(0, np.nan))
    with pytest.raises(CheckpointError, match="model.norm.weight contains NaN"):
        read_all(out)


@pytest.mark.parametrize("cut", [1, 1000, 100_000])
def test_truncated_file(tmp_path, cut):
    out = small_checkpoint(tmp_path / "c")
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: max(len(data) - cut, 3)])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        read_checkpoint(out)


def test_corrupt_config_json(tmp_path):
    out = small_checkpoint(tmp_path / "c")
    (out / "config.json").write_text('{"bits": 4,')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_checkpoint(out)


def test_act_order_is_refused_and_trivial_g_idx_accepted(tmp_path):
    out = small_checkpoint(tmp_path / "c")
    key = "model.layers.0.self_attn.q_proj.g_idx"
    edit_tensors(out, lambda t: t.__setitem__(key, (np.arange(64) // 32).astype(np.int32)))
    read_all(out)
    edit_tensors(out, lambda t: t.__setitem__(key, (np.arange(64)[::-1] // 32).astype(np.int32)))
    with pytest.raises(CheckpointError, match="act-order"):
        read_all(out)


def test_symmetric_config_with_other_zero_points(tmp_path):
    out = small_checkpoint(tmp_path / "c", sym=False)
    edit_config(out, lambda c: c["quantization_config"].__setitem__("sym", True))
    with pytest.raises(CheckpointError, match="zero points are not 8"):
        read_all(out)


def test_writer_refuses_symmetric_weights_with_other_zero_points(tmp_path):
    qw = random_qweight(np.random.default_rng(0), 8, 64, 4, 32, False)
    qw.sym = True
    with pytest.raises(ValueError, match="symmetric but its zero points are not 8"):
        write_checkpoint(tmp_path / "c", HF_CONFIG, QuantConfig(bits=4, group_size=32, sym=True),
                         {"model.layers.0.mlp.up_proj": qw}, {})


def test_step_error_counts_groups_with_negative_scales():
    """Symmetric tuning can leave negative scales; an error there must not hide behind the sign."""
    from signround_export.checkpoint.qweight import QuantWeight

    qw = QuantWeight(np.full((1, 64), 3, np.uint8), np.array([[0.5, -0.25]], np.float32),
                     np.full((1, 2), 8, np.uint8), 4, 32, True)
    w = qw.dequantize()
    assert qw.step_error(w) == 0.0
    w[0, 40] += 0.125  # half a step in the negative-scale group
    assert qw.step_error(w) == pytest.approx(0.5)
