"""Checkpoint I/O that never holds the whole model: the streaming safetensors writer, sharded checkpoints
(written, indexed and read back like one file), the lazy reader, and the resume store whose finished
blocks become the checkpoint's shards (a run stopped mid-shard resumes to the same bytes)."""

import gc
import hashlib
import json
import math
import sys
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import signround_export as sr
from signround_export.checkpoint import shards
from signround_export.checkpoint.format import GPTQ, QuantConfig
from signround_export.checkpoint.read import read_checkpoint
from signround_export.checkpoint.shards import SafetensorsWriter, TensorSpec, parse_size
from signround_export.checkpoint.write import write_checkpoint
from signround_export.errors import CheckpointError, TuneError
from signround_export.model import store
from signround_export.model.folder import file_headers

sys.path.insert(0, str(Path(__file__).parent))
from residency import Resident  # noqa: E402
from test_checkpoint import HF_CONFIG, assert_same, random_qweight  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")
TUNE = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, progress=False)


def test_streaming_writer_gives_save_files_bytes(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"b.scales": rng.normal(size=(3, 5)).astype(np.float16),
              "a.qweight": rng.integers(-9, 9, (4, 5), np.int32),
              "norm": rng.normal(size=7).astype(np.float32), "zz": rng.integers(0, 9, 13, np.uint8),
              "empty": np.zeros((0, 4), np.float32), "u": rng.integers(0, 9, 3).astype(np.uint32),
              "big": rng.integers(0, 9, 2).astype(np.int64), "d": rng.normal(size=(2, 2))}
    digests = {f"sha256:{n}": hashlib.sha256(a.tobytes()).hexdigest() for n, a in arrays.items()}
    save_file(arrays, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"} | digests)
    names = list(arrays)[::-1]  # any order of writing gives the same file
    with SafetensorsWriter(tmp_path / "ours.safetensors", {n: TensorSpec.of(a) for n, a in arrays.items()},
                           metadata={"format": "pt"}) as w:
        for n in names:
            w.write(n, arrays[n])
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    n = int.from_bytes(ref[:8], "little")
    # save_file orders the metadata keys by a hash map: the same header as JSON, the same length and data
    assert ours[:8] == ref[:8] and json.loads(ours[8 : 8 + n]) == json.loads(ref[8 : 8 + n])
    assert ours[8 + n :] == ref[8 + n :]
    assert file_headers(tmp_path / "ours.safetensors")["d"].digest == digests["sha256:d"]


def test_streaming_writer_refuses_what_its_header_does_not_say(tmp_path):
    specs = {"a": TensorSpec("F32", (2, 3)), "b": TensorSpec("I32", (4,))}
    with pytest.raises(CheckpointError, match="a is float16 \\[2, 3\\], but the header says F32"):
        with SafetensorsWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", np.zeros((2, 3), np.float16))
    w = SafetensorsWriter(tmp_path / "y.safetensors", specs)
    w.write("a", np.zeros((2, 3), np.float32))
    with pytest.raises(CheckpointError, match="1 tensors were never written"):
        w.close()


def test_shard_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(4096) == 4096
    assert parse_size("1.5 mb") == 1_500_000
    for bad in ("five", "0", "3 XB"):
        with pytest.raises(CheckpointError, match="`shard_size`"):
            parse_size(bad)


def random_model(blocks: int, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    qweights = {f"model.layers.{i}.{lin}": random_qweight(rng, 48, 64, 4, 32, False, bias=lin.endswith("q_proj"))
                for i in range(blocks) for lin in LINEARS}
    tensors = {f"model.layers.{i}.input_layernorm.weight": rng.normal(size=64).astype(np.float32)
               for i in range(blocks)}
    tensors |= {"model.embed_tokens.weight": rng.normal(size=(40, 64)).astype(np.float32),
                "model.norm.weight": rng.normal(size=64).astype(np.float32)}
    return qweights, tensors


def layer_bytes(qw) -> int:
    n, k = qw.shape
    g = math.ceil(k / qw.group_size)
    bias = 4 * n if qw.bias is not None else 0
    return k * qw.bits // 8 * n + g * math.ceil(n * qw.bits / 32) * 4 + g * n * 2 + bias


def test_sharded_checkpoint_reads_back_like_one_file(tmp_path):
    qweights, tensors = random_model(4)
    quant = QuantConfig(4, 32, False, GPTQ)
    one = write_checkpoint(tmp_path / "one", HF_CONFIG, quant, qweights, tensors)
    block = sum(layer_bytes(qweights[f"model.layers.0.{lin}"]) for lin in LINEARS) + 64 * 4
    many = write_checkpoint(tmp_path / "many", HF_CONFIG, quant, qweights, tensors, shard_size=block)
    files = sorted(p.name for p in many.glob("*.safetensors"))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (one / "model.safetensors.index.json").exists() and [p.name for p in one.glob("*.safetensors")] == [
        "model.safetensors"]
    index = json.loads((many / "model.safetensors.index.json").read_text())
    sizes = {f: sum(int(np.prod(h["shape"], dtype=np.int64)) * {"F32": 4, "F16": 2, "I32": 4}[h["dtype"]]
                    for n, h in header_of(many / f).items() if n != "__metadata__") for f in files}
    assert index["metadata"] == {"total_size": sum(sizes.values())}
    assert set(index["weight_map"].values()) == set(files)
    for name in qweights:  # a layer's tensors are never split across shards
        assert len({f for t, f in index["weight_map"].items() if t.rpartition(".")[0] == name}) == 1
    units = {f: {t.rpartition(".")[0] if t.rpartition(".")[0] in qweights else t
                 for t, g in index["weight_map"].items() if g == f} for f in files}
    assert all(sizes[f] <= block or len(units[f]) == 1 for f in files)  # only a unit larger than the size passes it

    a, b = read_checkpoint(one), read_checkpoint(many)
    assert list(a.qweights) == list(b.qweights) and set(a.tensors) == set(b.tensors)
    for name in a.qweights:
        assert_same(a.qweights[name], b.qweights[name], name)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name], b.tensors[name])
    again = write_checkpoint(tmp_path / "again", b.hf_config, b.quant, b.qweights, b.tensors)
    assert (again / "model.safetensors").read_bytes() == (one / "model.safetensors").read_bytes()


def header_of(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def test_writer_holds_at_most_two_blocks(tmp_path):
    qweights, tensors = random_model(6)
    held_q, held_t = Resident(qweights), Resident(tensors)
    write_checkpoint(tmp_path / "c", HF_CONFIG, QuantConfig(4, 32, False, GPTQ), held_q, held_t, shard_size="40KB")
    assert held_q.peak_blocks <= 2 and held_t.peak_blocks <= 2
    assert held_q.resident_now() == 0


def test_reader_reads_an_entry_when_indexed(tmp_path, monkeypatch):
    qweights, tensors = random_model(3)
    out = write_checkpoint(tmp_path / "c", HF_CONFIG, QuantConfig(4, 32, False, GPTQ), qweights, tensors,
                           shard_size="30KB")
    reads = []
    real = store.read_tensor
    monkeypatch.setattr(store, "read_tensor", lambda name, *a, **k: reads.append(name) or real(name, *a, **k))
    ckpt = read_checkpoint(out)
    assert reads == [] and len(ckpt.qweights) == 9 and "model.layers.2.mlp.down_proj" in ckpt.qweights
    assert ckpt.qweights.shape("model.layers.2.mlp.down_proj") == (48, 64)
    assert ckpt.tensors.shape("model.embed_tokens.weight") == (40, 64) and reads == []
    ckpt.qweights["model.layers.1.self_attn.q_proj"]
    assert sorted(reads) == [f"model.layers.1.self_attn.q_proj.{s}" for s in ("bias", "qweight", "qzeros", "scales")]
    held = Resident(ckpt.qweights)
    for name in held:  # a consumer that takes one entry at a time holds one block at a time
        held[name].dequantize()
    assert held.peak_blocks == 1


def test_value_errors_come_when_the_entry_is_read(tmp_path):
    qweights, tensors = random_model(2)
    tensors["model.norm.weight"][3] = np.nan
    out = write_checkpoint(tmp_path / "c", HF_CONFIG, QuantConfig(4, 32, False, GPTQ), qweights, tensors)
    ckpt = read_checkpoint(out)  # headers are fine
    ckpt.tensors["model.embed_tokens.weight"]
    with pytest.raises(CheckpointError, match="model.norm.weight contains NaN"):
        ckpt.tensors["model.norm.weight"]


def sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors" or p.name.endswith("index.json")}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    from conftest import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=4)


@pytest.fixture(scope="module")
def sharded_run(deep_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "ckpt"
    result = sr.quantize(deep_model, out, shard_size="60KB", **TUNE)
    return out, result


def test_tuned_checkpoint_in_shards_reads_like_one_file(deep_model, sharded_run, tmp_path):
    out, result = sharded_run
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").is_file()
    assert not out.with_name("ckpt.progress").exists()
    one = sr.quantize(deep_model, tmp_path / "one", **TUNE).checkpoint
    a, b = read_checkpoint(one), read_checkpoint(out)
    assert list(a.qweights) == list(b.qweights) and set(a.tensors) == set(b.tensors)
    for name in a.qweights:
        assert_same(a.qweights[name], b.qweights[name], name)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name], b.tensors[name])
    assert set(result.tuning.qweights) == set(b.qweights)


def test_run_stopped_mid_shard_resumes_to_the_same_bytes(deep_model, sharded_run, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    progress = tmp_path / "ckpt.progress"
    writes = 0
    real = shards.SafetensorsWriter.write

    def failing(self, name, array):
        nonlocal writes
        writes += 1
        if self.path.name.startswith(".model-00003") and writes > 3:
            raise KeyboardInterrupt("stopped mid-shard")
        real(self, name, array)

    monkeypatch.setattr(shards.SafetensorsWriter, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        sr.quantize(deep_model, out, shard_size="60KB", **TUNE)
    monkeypatch.undo()
    assert not out.exists()
    left = sorted(p.name for p in progress.iterdir())
    assert "model-00001-of-" in " ".join(left) and not any(n.startswith(".") for n in left)  # no half shard
    in_shards = {n for f in progress.glob("model-*.safetensors") for n in file_headers(f)}
    pruned = [f"block_{i:03d}" for i in range(4) if f"block_{i:03d}.safetensors" not in left]
    assert pruned and all(f"{b}.json" in left for b in pruned)  # a block the first shards hold is no second copy
    for f in progress.glob("block_*.safetensors"):
        assert not file_headers(f).keys() <= in_shards, f.name

    result = sr.quantize(deep_model, out, shard_size="60KB", **TUNE)
    assert result.tuning.resumed_blocks == 4
    assert sha(out) == sha(sharded_run[0])
    assert not progress.exists()


def test_resume_with_another_shard_size_is_refused(deep_model, tmp_path, monkeypatch):
    from signround_export.tune import pipeline

    def stop(*a, **k):
        raise KeyboardInterrupt("stopped before the checkpoint")

    monkeypatch.setattr(pipeline, "write_staged_checkpoint", stop)
    with pytest.raises(KeyboardInterrupt):
        sr.quantize(deep_model, tmp_path / "ckpt", shard_size="60KB", **TUNE)
    monkeypatch.undo()
    with pytest.raises(TuneError, match="different settings \\(shard_size\\)"):
        sr.quantize(deep_model, tmp_path / "ckpt", shard_size="1GB", **TUNE)


def counting_rtn(real):
    """rtn_block that records, at each call, how many blocks' QuantWeights are alive."""
    alive, peaks = Counter(), []

    def rtn_block(p, linears, i, config):
        qws = real(p, linears, i, config)
        for qw in qws.values():
            alive[i] += 1
            weakref.finalize(qw, alive.subtract, [i])
        gc.collect()
        peaks.append(sum(1 for v in alive.values() if v > 0))
        return qws

    return rtn_block, peaks


def test_tune_hands_finished_blocks_to_the_store(deep_model, tmp_path, monkeypatch):
    from signround_export.model.load import load_float_model
    from signround_export.tune import signround
    from signround_export.tune.config import TuneConfig
    from signround_export.tune.resume import ResumeStore

    model = load_float_model(deep_model)[0]
    config = TuneConfig(bits=4, group_size=32, iters=0)
    real = signround.rtn_block
    stored, peaks = counting_rtn(real)
    monkeypatch.setattr(signround, "rtn_block", stored)
    result = signround.tune(model, None, config, ResumeStore(tmp_path / "p"), progress=False)
    assert max(peaks) <= 2 and len(result.qweights) == 4 * len(model.cfg.family.linears)
    held, peaks = counting_rtn(real)
    monkeypatch.setattr(signround, "rtn_block", held)
    signround.tune(model, None, config, progress=False)  # without a store, every block is kept in memory
    assert max(peaks) == 4


def test_run_stopped_after_its_shards_resumes_to_the_same_bytes(deep_model, sharded_run, tmp_path, monkeypatch):
    from signround_export.checkpoint import write

    def stop(*a, **k):
        raise KeyboardInterrupt("stopped before config.json")

    monkeypatch.setattr(write, "write_files", stop)
    with pytest.raises(KeyboardInterrupt):
        sr.quantize(deep_model, tmp_path / "ckpt", shard_size="60KB", **TUNE)
    monkeypatch.undo()
    progress = tmp_path / "ckpt.progress"
    assert not (tmp_path / "ckpt").exists() and (progress / "model.safetensors.index.json").is_file()
    assert not list(progress.glob("block_*.safetensors"))  # every block is in a shard: no second copy
    result = sr.quantize(deep_model, tmp_path / "ckpt", shard_size="60KB", **TUNE)
    assert result.tuning.resumed_blocks == 4 and sha(tmp_path / "ckpt") == sha(sharded_run[0])
