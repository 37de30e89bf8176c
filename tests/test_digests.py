"""Files that detect their own corruption: a checkpoint's tensors, a GGUF file's tensors and an ONNX folder's
files carry sha256 digests, and every reader refuses a byte flipped inside tensor data, naming the tensor
or the file; --no-verify (verify=False) reads them as they are; a checkpoint without digests (written by
another tool) is read as before."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import rtn_checkpoint, write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.errors import CheckpointError, GGUFExportError
from signround_export.export.gguf import export_gguf
from signround_export.export.gguf.read import DIGESTS_KEY, check_digests, open_gguf, read_gguf_weights
from signround_export.export.onnx.build import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.folder import file_headers

FLIPS = 12  # per kind of file, at seeded random offsets


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("digests")
    return rtn_checkpoint(write_tiny_model(base / "model"), base / "ckpt")


@pytest.fixture(scope="module")
def gguf(ckpt) -> Path:
    path = ckpt.parent / "m.gguf"
    export_gguf(read_checkpoint(ckpt), path, tokenizer_pre_name="gpt-2")
    return path


@pytest.fixture(scope="module")
def onnx_dir(ckpt) -> Path:
    out = ckpt.parent / "onnx"
    export_onnx(read_checkpoint(ckpt), out, external_bytes=0)  # the initializers in model.onnx.data
    return out


def flipped(data: bytes, at: int, rng) -> bytes:
    """data with the byte at `at` changed (xor with a random non-zero value)."""
    out = bytearray(data)
    out[at] ^= int(rng.integers(1, 256))
    return bytes(out)


def tensor_flips(ranges: dict[str, tuple[int, int]], seed: int) -> list[tuple[str, int]]:
    """FLIPS (tensor, file offset) pairs inside the tensors' byte ranges [start, end), chosen by bytes."""
    rng = np.random.default_rng(seed)
    names = [n for n, (a, b) in ranges.items() if b > a]
    sizes = np.array([ranges[n][1] - ranges[n][0] for n in names], dtype=np.float64)
    picks = rng.choice(len(names), size=FLIPS, p=sizes / sizes.sum())
    return [(names[i], int(rng.integers(*ranges[names[i]]))) for i in picks]


def read_all(folder: Path, verify: bool = True) -> dict:
    c = read_checkpoint(folder, verify=verify)
    return {**{n: c.qweights[n].q for n in c.qweights}, **{n: c.tensors[n] for n in c.tensors}}


def checkpoint_ranges(path: Path) -> dict[str, tuple[int, int]]:
    from signround_export.checkpoint.shards import ITEM_BYTES

    headers = file_headers(path)
    return {n: (h.offset, h.offset + ITEM_BYTES[h.dtype] * int(np.prod(h.shape))) for n, h in headers.items()}


def test_checkpoint_carries_a_digest_of_every_tensor_and_reads_whole(ckpt):
    headers = file_headers(ckpt / "model.safetensors")
    assert headers and all(h.digest is not None and len(h.digest) == 64 for h in headers.values())
    read_all(ckpt)  # unflipped: every entry reads


def test_a_digest_missing_from_the_metadata_is_refused(ckpt, tmp_path):
    """A damaged header that loses one tensor's digest key does not leave that tensor unchecked."""
    data = (ckpt / "model.safetensors").read_bytes()
    key = b"sha256:model.norm.weight"
    assert data.count(key) == 1
    (tmp_path / "model.safetensors").write_bytes(data.replace(key, b"sha256:model.norm.weighs"))
    with pytest.raises(CheckpointError, match="metadata holds digests, but none for tensor model.norm.weight; the "
                                              "header is damaged"):
        file_headers(tmp_path / "model.safetensors", CheckpointError)


def test_checkpoint_flips_are_refused_by_tensor(ckpt, tmp_path):
    """A byte flipped anywhere in any tensor's data: reading that tensor is refused by name; --no-verify
    reads the damaged bytes (its other checks, NaN or zero points, may still refuse, but not the digest)."""
    original = (ckpt / "model.safetensors").read_bytes()
    rng = np.random.default_rng(1)
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    for tensor, at in tensor_flips(checkpoint_ranges(ckpt / "model.safetensors"), seed=0):
        (damaged / "model.safetensors").write_bytes(flipped(original, at, rng))
        with pytest.raises(CheckpointError, match=f"model.safetensors: tensor {tensor}: its bytes do not match the "
                                                  "digest written with it; the file is damaged"):
            read_all(damaged)
        try:
            read_all(damaged, verify=False)
        except CheckpointError as e:
            assert "digest" not in str(e)


def test_checkpoint_flip_through_the_cli(ckpt, tmp_path, capsys):
    """export gguf / onnx and eval end with one line and exit 2; --no-verify exports the file as it is."""
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    ranges = checkpoint_ranges(ckpt / "model.safetensors")
    tensor = "model.layers.0.mlp.down_proj.qweight"
    data = (ckpt / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(flipped(data, ranges[tensor][0] + 3, np.random.default_rng(2)))
    for argv in (["export", "gguf", str(damaged), "--out", str(tmp_path / "m.gguf"), "--tokenizer-pre", "gpt-2"],
                 ["export", "onnx", str(damaged), "--out", str(tmp_path / "onnx")],
                 ["eval", str(damaged), "--windows", "1", "--window", "16"]):
        assert main([*argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"tensor {tensor}: its bytes do not match the digest" in err, err
        assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "onnx").exists()
    assert main(["export", "gguf", str(damaged), "--out", str(tmp_path / "m.gguf"), "--tokenizer-pre", "gpt-2",
                 "--quiet", "--no-verify"]) == 0


def test_checkpoint_without_digests_reads_as_before(ckpt, tmp_path):
    """Rewritten by safetensors' save_file (as another tool would): no digests, the same values, and a
    flipped byte is not noticed (nothing can tell)."""
    plain = tmp_path / "plain"
    shutil.copytree(ckpt, plain)
    save_file(load_file(ckpt / "model.safetensors"), str(plain / "model.safetensors"), metadata={"format": "pt"})
    assert all(h.digest is None for h in file_headers(plain / "model.safetensors").values())
    want, got = read_all(ckpt), read_all(plain)
    assert want.keys() == got.keys() and all(np.array_equal(want[n], got[n]) for n in want)
    tensor = "model.layers.1.self_attn.q_proj.qweight"
    start = checkpoint_ranges(plain / "model.safetensors")[tensor][0]
    data = (plain / "model.safetensors").read_bytes()
    (plain / "model.safetensors").write_bytes(flipped(data, start, np.random.default_rng(3)))
    assert not np.array_equal(read_all(plain)[tensor.removesuffix(".qweight")], want[tensor.removesuffix(".qweight")])


def test_checkpoint_with_digests_loads_in_safetensors_and_transformers(ckpt):
    """The digests are metadata that safetensors' and transformers' loaders pass over."""
    from transformers.modeling_utils import load_state_dict

    arrays = load_file(ckpt / "model.safetensors")
    state = load_state_dict(str(ckpt / "model.safetensors"))
    assert arrays.keys() == state.keys() and all(np.array_equal(arrays[n], state[n].numpy()) for n in arrays)


def gguf_ranges(path: Path) -> dict[str, tuple[int, int]]:
    return {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in open_gguf(path).tensors}


def test_gguf_flips_are_refused_by_tensor(ckpt, gguf, tmp_path):
    assert len(open_gguf(gguf).fields[DIGESTS_KEY].contents()) == len(open_gguf(gguf).tensors)
    check_digests(gguf)  # unflipped: passes
    cfg = ModelConfig.from_hf(read_checkpoint(ckpt).hf_config)
    original, rng, damaged = gguf.read_bytes(), np.random.default_rng(4), tmp_path / "damaged.gguf"
    for tensor, at in tensor_flips(gguf_ranges(gguf), seed=5):
        damaged.write_bytes(flipped(original, at, rng))
        with pytest.raises(GGUFExportError, match=f"damaged.gguf: tensor {tensor}: its bytes do not match the digest"):
            check_digests(damaged)
        weights, _ = read_gguf_weights(damaged, cfg)  # unverified, the damaged bytes read as they are
        for name in weights:
            weights[name]


def test_onnx_flips_are_refused_by_file(onnx_dir, tmp_path):
    from signround_runtime import Model, RuntimeModelError
    from signround_runtime.manifest import MANIFEST

    names = [line.split("  ", 1)[1] for line in (onnx_dir / MANIFEST).read_text().splitlines()]
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= set(names)
    Model(onnx_dir, threads=1)  # unflipped: loads
    damaged = tmp_path / "damaged"
    shutil.copytree(onnx_dir, damaged)
    data = (onnx_dir / "model.onnx.data").read_bytes()
    rng = np.random.default_rng(6)
    for at in rng.integers(0, len(data), FLIPS):
        (damaged / "model.onnx.data").write_bytes(flipped(data, int(at), rng))
        with pytest.raises(RuntimeModelError, match="model.onnx.data: its bytes do not match its digest in "
                                                    f"{MANIFEST}; the file is damaged"):
            Model(damaged, threads=1)
        Model(damaged, threads=1, verify=False)  # loads the damaged weights as they are


def test_validate_and_the_runtime_cli_refuse_damaged_artifacts(ckpt, gguf, onnx_dir, tmp_path, capsys):
    from signround_runtime.cli import main as run_main

    bad_gguf, bad_onnx = tmp_path / "bad.gguf", tmp_path / "bad-onnx"
    tensor, (start, _) = next(iter(gguf_ranges(gguf).items()))
    bad_gguf.write_bytes(flipped(gguf.read_bytes(), start, np.random.default_rng(7)))
    shutil.copytree(onnx_dir, bad_onnx)
    config = bad_onnx / "genai_config.json"
    config.write_text(config.read_text() + " ")  # still valid JSON, but not the bytes exported
    cases = [(["validate", str(ckpt), "--gguf", str(bad_gguf), "--quiet"], f"bad.gguf: tensor {tensor}: its bytes"),
             (["validate", str(ckpt), "--onnx", str(bad_onnx), "--quiet"], "genai_config.json: its bytes do not")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert run_main([str(bad_onnx), "hi", "--max-new-tokens", "1", "--raw"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "genai_config.json: its bytes do not match its digest" in err, err
    assert run_main([str(bad_onnx), "hi", "--max-new-tokens", "1", "--raw", "--no-verify"]) == 0
