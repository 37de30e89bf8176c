"""Every input checked at the door: a config.json edited field by field (removed, null, 0, negative, of
the wrong type, a size off by a factor) in a tiny float model and a tiny checkpoint, run through
`signround export gguf` and `export onnx` in-process. Each run either exits 2 with one line naming the
field and writes nothing, or (a field that is genuinely optional) writes the very bytes the intact
folder gives. Damaged config.json files are named as such by every command."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import rtn_checkpoint, write_tiny_model
from signround_export.cli import main

MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim")
QUANT_FIELDS = ("bits", "group_size", "sym")
SIZES = {*MODEL_FIELDS, "bits", "group_size"}  # fields whose value off by a factor no longer matches the tensors
# (field, edit) runs that must succeed, with the intact folder's bytes: head_dim left out (or null) is
# hidden_size / num_attention_heads, which is what the tiny models have
SUCCEEDS = {("head_dim", "removed"), ("head_dim", "null")}
GONE = object()  # an edit that removes the key


def edits(field: str, value) -> dict[str, object]:
    """The edits of one field: edit name -> the new value (GONE: the key removed)."""
    out = {"removed": GONE, "null": None, "zero": 0, "string": str(value), "list": [value]}
    if isinstance(value, bool):  # the tiny checkpoint is asymmetric: its zero points say so
        return out | {"int": int(value), "negative": -1, "flipped": not value}
    out |= {"negative": -value, "bool": True}
    if field in SIZES:
        out |= {"doubled": value * 2, "halved": value // 2}
    return out


CASES = [("model", f, e) for f in MODEL_FIELDS for e in edits(f, 2)] + \
        [("checkpoint", f, e) for f in MODEL_FIELDS for e in edits(f, 2)] + \
        [("checkpoint", f, e) for f in QUANT_FIELDS for e in edits(f, False if f == "sym" else 4)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """An untied tiny model (so that lm_head is checked too) and its round-to-nearest checkpoint."""
    base = tmp_path_factory.mktemp("door")
    model = write_tiny_model(base / "model", tied=False)
    return {"model": model, "checkpoint": rtn_checkpoint(model, base / "checkpoint", bits=4, group_size=32)}


def export(kind: str, source: Path, out: Path, capsys) -> tuple[int, str]:
    rc = main(["export", kind, str(source), "--out", str(out), "--quiet"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def intact(sources, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Each source's exports as the intact folder gives them."""
    base = tmp_path_factory.mktemp("intact")
    outs = {}
    for name, folder in sources.items():
        for kind in ("gguf", "onnx"):
            outs[name, kind] = base / f"{name}.{kind}"
            assert main(["export", kind, str(folder), "--out", str(outs[name, kind]), "--quiet"]) == 0
    return outs


def edited(source: Path, parent: Path, edit) -> Path:
    """A copy of source in parent, of the same name (a GGUF file names its model after the folder), whose
    config.json is edit(config) (edit changes the dict in place)."""
    dest = shutil.copytree(source, parent / source.name)
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def same_output(a: Path, b: Path) -> bool:
    if a.is_file():
        return filecmp.cmp(a, b, shallow=False)
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def assert_refused(rc: int, err: str, out: Path, *named: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("signround ") and ": error: " in lines[0], err
    assert "Traceback" not in err
    for words in named:  # as words: "sym" is not named by "symmetric"
        assert re.search(rf"(?<!\w){re.escape(words)}(?!\w)", lines[0]), f"{words!r} not named in: {lines[0]}"
    written = list(out.parent.glob(out.name + "*"))  # nor a resume folder or a temporary beside it
    assert not written, f"{written} written on refusal"


@pytest.mark.parametrize("source, field, edit", CASES)
def test_config_field_edits(sources, intact, tmp_path, capsys, source, field, edit):
    def change(config):
        where = config["quantization_config"] if field in QUANT_FIELDS else config
        value = edits(field, where[field])[edit]
        if value is GONE:
            del where[field]
        else:
            where[field] = value

    folder = edited(sources[source], tmp_path / "in", change)
    for kind in ("gguf", "onnx"):
        out = tmp_path / f"out.{kind}"
        rc, err = export(kind, folder, out, capsys)
        if (field, edit) in SUCCEEDS:
            assert rc == 0, err
            assert same_output(out, intact[source, kind]), f"{kind} export differs from the intact folder's"
        else:
            assert_refused(rc, err, out, field)


@pytest.mark.parametrize("damage, said", [
    ('{"model_type": "llama", "hidden_size": ', "config.json is not valid JSON"),
    (b"\xff\xfe{}", "config.json is not valid JSON"),
    ("[1, 2]", "config.json holds a JSON list, not an object"),
    (None, "config.json"),
])
@pytest.mark.parametrize("command", ["export gguf", "export onnx", "tune", "eval", "validate"])
def test_damaged_config_json_is_named_by_every_command(sources, tmp_path, capsys, command, damage, said):
    source = "model" if command == "tune" else "checkpoint"
    folder = shutil.copytree(sources[source], tmp_path / "in")
    config = folder / "config.json"
    if damage is None:
        config.unlink()
    elif isinstance(damage, bytes):
        config.write_bytes(damage)
    else:
        config.write_text(damage)
    out = tmp_path / "out"
    args = {"export gguf": ["export", "gguf", str(folder), "--out", str(out)],
            "export onnx": ["export", "onnx", str(folder), "--out", str(out)],
            "tune": ["tune", str(folder), "--out", str(out), "--iters", "0"],
            "eval": ["eval", str(folder), "--window", "16", "--windows", "1", "--json", str(out)],
            "validate": ["validate", str(folder), "--report", str(out), "--tokens", "32", "--window", "16"]}[command]
    rc = main(args + ["--quiet"])
    assert_refused(rc, capsys.readouterr().err, out, said)


@pytest.mark.parametrize("command", ["tune", "eval", "validate"])
def test_other_commands_check_the_tensors_at_the_same_door(sources, tmp_path, capsys, command):
    source = "model" if command == "tune" else "checkpoint"
    folder = edited(sources[source], tmp_path / "in", lambda c: c.__setitem__("hidden_size", 128))
    out = tmp_path / "out"
    args = {"tune": ["tune", str(folder), "--out", str(out), "--iters", "0"],
            "eval": ["eval", str(folder), "--window", "16", "--windows", "1", "--json", str(out)],
            "validate": ["validate", str(folder), "--report", str(out), "--tokens", "32", "--window", "16"]}[command]
    rc = main(args + ["--quiet"])
    assert_refused(rc, capsys.readouterr().err, out, "model.embed_tokens.weight", "hidden_size = 128")


def test_a_config_of_other_weights_is_refused_before_any_write(sources, tmp_path, capsys):
    """Weights the config does not describe, beyond single fields: an untied config over tied weights lacks
    lm_head, and the refusal says why it is needed; kv heads that do not divide the heads."""
    tied = write_tiny_model(tmp_path / "tied", tied=True)
    folder = edited(tied, tmp_path / "in", lambda c: c.__setitem__("tie_word_embeddings", False))
    rc, err = export("gguf", folder, tmp_path / "out.gguf", capsys)
    assert_refused(rc, err, tmp_path / "out.gguf", "tie_word_embeddings false", "lm_head.weight")
    deep = {10**12: "num_hidden_layers is 1000000000000", 60000: "num_hidden_layers 60000 implies block 2"}
    for layers, said in deep.items():
        folder = edited(sources["checkpoint"], tmp_path / str(layers), lambda c: c.update(num_hidden_layers=layers))
        rc, err = export("gguf", folder, tmp_path / "deep.gguf", capsys)  # at once, not after listing every block
        assert_refused(rc, err, tmp_path / "deep.gguf", said)
    folder = edited(sources["model"], tmp_path / "kv", lambda c: c.__setitem__("num_key_value_heads", 3))
    rc, err = export("onnx", folder, tmp_path / "out.onnx", capsys)
    assert_refused(rc, err, tmp_path / "out.onnx", "num_key_value_heads must divide num_attention_heads")


def test_quantization_config_overrides_are_checked(sources, tmp_path, capsys):
    def override(config):
        config["quantization_config"]["extra_config"] = {"model.layers.0.mlp.down_proj": {"group_size": 0}}

    folder = edited(sources["checkpoint"], tmp_path / "in", override)
    rc, err = export("gguf", folder, tmp_path / "out.gguf", capsys)
    assert_refused(rc, err, tmp_path / "out.gguf", "extra_config['model.layers.0.mlp.down_proj']: group_size is 0")


@pytest.mark.parametrize("rope, named", [
    ({"rope_type": "linear", "factor": None}, "factor"),
    ({"rope_type": "llama3", "factor": "8", "low_freq_factor": 1, "high_freq_factor": 4}, "factor"),
    ({"rope_type": ["linear"]}, "rope_type"),
    ({"rope_type": "default", "rope_theta": 0}, "rope_theta"),
    ("linear", "rope_parameters"),
])
def test_rope_parameters_are_checked(sources, tmp_path, capsys, rope, named):
    folder = edited(sources["model"], tmp_path, lambda c: c.__setitem__("rope_parameters", rope))
    rc, err = export("onnx", folder, tmp_path / "out.onnx", capsys)
    assert_refused(rc, err, tmp_path / "out.onnx", named)
