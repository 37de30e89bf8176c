"""The lazy float weights (model/store.py): sharded bfloat16 / float16 folders tune to the same integers as
their float32 copies, tuning holds at most two blocks at a time, and damaged files and NaN are named."""

import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_tiny_model
from signround_export.cli import main
from signround_export.errors import ModelError
from signround_export.model.folder import INDEX
from signround_export.model.load import in_memory, load_float_model
from signround_export.model.store import TensorStore

TUNE = ["--iters", "2", "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--quiet"]
SECOND_SHARD = "model-00002-of-00002.safetensors"


def copy_folder(src, dst, state: dict, shards: list[list[str]] | None = None):
    """src's config and tokenizer with the weights `state`, in one file or in `shards` (names per shard,
    with the index that maps them)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copyfile(f, dst / f.name)
    if shards is None:
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    weight_map = {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(dst / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def split_in_block_0(names: list[str]) -> list[list[str]]:
    """Two shards, the first ending halfway through block 0 (its attention in one, its MLP in the other)."""
    cut = names.index("model.layers.0.mlp.down_proj.weight")
    return [names[:cut], names[cut:]]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("store") / "float32", layers=4)


def sharded(source, dst, dtype=torch.bfloat16):
    state = {n: t.to(dtype) for n, t in load_file(source / "model.safetensors").items()}
    return copy_folder(source, dst, state, split_in_block_0(sorted(state)))


@pytest.mark.parametrize("dtype, stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_sharded_half_precision_tunes_like_its_float32_copy(tmp_path, source, dtype, stored):
    half = sharded(source, tmp_path / "half", dtype)
    store = TensorStore(half)
    assert {h.dtype for h in store.headers.values()} == {stored}
    block0 = {h.file.name for n, h in store.headers.items() if n.startswith("model.layers.0.")}
    assert len(block0) == 2  # the block is split across the shards
    values = {n: t.to(dtype).float() for n, t in load_file(source / "model.safetensors").items()}
    full = copy_folder(source, tmp_path / "full", values)
    for folder in (half, full):
        assert main(["tune", str(folder), "--out", str(tmp_path / f"{folder.name}-q"), *TUNE]) == 0
    a, b = ((tmp_path / f"{f}-q" / "model.safetensors").read_bytes() for f in ("half", "full"))
    assert a == b


class Resident:
    """Counts, at every read through a TensorStore, how many decoder blocks have tensors still alive."""

    def __init__(self, monkeypatch):
        self.alive: list[tuple[int, weakref.ref]] = []
        self.reads, self.most = 0, 0
        read = TensorStore.__getitem__

        def counted(store, name):
            t = read(store, name)
            self.reads += 1
            if name.startswith("model.layers."):
                self.alive = [(i, r) for i, r in self.alive if r() is not None]
                self.alive.append((int(name.split(".")[2]), weakref.ref(t)))
                self.most = max(self.most, len({i for i, _ in self.alive}))
            return t

        monkeypatch.setattr(TensorStore, "__getitem__", counted)


@pytest.mark.parametrize("iters", ["0", "2"])
def test_tuning_holds_at_most_two_blocks(tmp_path, monkeypatch, source, iters):
    folder = sharded(source, tmp_path / "bf16")
    resident = Resident(monkeypatch)
    load_float_model(folder)
    assert resident.reads == 0  # names, dtypes and shapes come from the headers
    args = ["tune", str(folder), "--out", str(tmp_path / "q"), *TUNE, "--iters", iters]
    assert main(args) == 0
    assert resident.reads >= 4 * 9 and resident.most <= 2


def test_the_count_sees_a_model_read_whole(monkeypatch, source):
    resident = Resident(monkeypatch)
    whole = in_memory(load_float_model(source)[0])  # what tuning held before the store: every block at once
    assert resident.most == 4 and whole.cfg.n_layers == 4


def test_damaged_shards_are_named(tmp_path, source, capsys):
    folder = sharded(source, tmp_path / "bf16")
    data = (folder / SECOND_SHARD).read_bytes()
    (folder / SECOND_SHARD).write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match=f"{SECOND_SHARD} is truncated or corrupt"):
        load_float_model(folder)
    assert main(["tune", str(folder), "--out", str(tmp_path / "q"), *TUNE]) == 2
    assert f"{SECOND_SHARD} is truncated or corrupt" in capsys.readouterr().err

    overlap = sharded(source, tmp_path / "overlap")
    first = load_file(overlap / "model-00001-of-00002.safetensors")
    save_file(first | {"model.norm.weight": first["model.embed_tokens.weight"][0].clone()},
              str(overlap / "model-00001-of-00002.safetensors"))
    with pytest.raises(ModelError, match="tensor model.norm.weight is also in .* the shards overlap"):
        load_float_model(overlap)


def test_nan_is_named_when_read(tmp_path, source, capsys):
    folder = sharded(source, tmp_path / "bf16")
    state = load_file(folder / SECOND_SHARD)
    state["model.layers.2.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(folder / SECOND_SHARD))
    model, _, _ = load_float_model(folder)
    assert model.tensors["model.layers.2.mlp.gate_proj.weight"].dtype == torch.float32
    with pytest.raises(ModelError, match="tensor model.layers.2.mlp.up_proj.weight contains NaN"):
        model.tensors["model.layers.2.mlp.up_proj.weight"]
    assert main(["tune", str(folder), "--out", str(tmp_path / "q"), *TUNE]) == 2
    assert "model.layers.2.mlp.up_proj.weight contains NaN" in capsys.readouterr().err


def test_tensors_read_as_stored_or_converted(tmp_path, monkeypatch):
    """read_tensor reads every dtype a checkpoint or model holds, whole or a slice at a time into another
    dtype (READ_STEP made small so that a tensor spans several slices), and names a file that ends early."""
    from signround_export.model import folder

    monkeypatch.setattr(folder, "READ_STEP", 1000)
    torch.manual_seed(0)
    tensors = {"bf16": torch.randn(37, 61).bfloat16(), "f16": torch.randn(2500).half(), "f32": torch.randn(3, 4),
               "i32": torch.arange(-5, 2000, dtype=torch.int32), "u8": torch.arange(256, dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 8)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    headers = folder.file_headers(path)
    for name, t in tensors.items():
        assert torch.equal(folder.read_tensor(name, headers[name]), t), name
        assert torch.equal(folder.read_tensor(name, headers[name], dtype=torch.float32), t.float()), name

    data = path.read_bytes()
    path.write_bytes(data[: headers["bf16"].offset + 100])  # cut inside the first tensor, after the header check
    with pytest.raises(ModelError, match="truncated or corrupt.*ends inside tensor bf16"):
        folder.read_tensor("bf16", headers["bf16"], dtype=torch.float32)

    other = tmp_path / "u16.safetensors"  # a dtype safetensors holds and this tool does not read
    save_file({"u16": torch.zeros(4, dtype=torch.uint16)}, str(other))
    with pytest.raises(ModelError, match="tensor u16 has dtype U16, which this tool does not read; save it as one of BF16"):
        folder.read_tensor("u16", folder.file_headers(other)["u16"])
