"""A seeded corpus of damaged inputs, each of which must end in a clear refusal or a provably right result.

Made once per module from a tiny checkpoint, its GGUF file and its ONNX folder: truncations at random
offsets, bytes flipped in the safetensors and GGUF headers and in tensor data, every config.json field
that tests/test_door.py does not already edit removed, set to null, 0, a negative, a wrong type. The
damaged checkpoints go through `export gguf` and `export onnx` (a sample also through `eval` and
`validate`), the damaged GGUF files through the GGUF reader (a sample through `validate --gguf`), the
damaged ONNX folders through signround_runtime.Model (a sample through `validate --onnx`), all in-process.

A refusal is the project's error: exit 2 with one line (cli.main), GGUFExportError, RuntimeModelError, and
nothing written. A result is provably right when it is the intact input's: byte-identical exports, the same
tensors, types and metadata read from a GGUF file, the same files loaded from an ONNX folder. Any other
exit, any other exception (a traceback) or a result unlike the intact input's fails, naming the case."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import rtn_checkpoint, write_tiny_model
from signround_export.cli import main
from tests.test_door import GONE, MODEL_FIELDS, QUANT_FIELDS, assert_refused, same_output

SEED = 19
TRUNCATIONS = 16  # per file, at seeded random offsets
HEADER_FLIPS = 24  # per file, inside its header (safetensors JSON, GGUF metadata)
DATA_FLIPS = 16  # per file, inside its tensor data
SAMPLE = 6  # cases of each kind also run through eval / validate
# config.json edits whose export legitimately differs from the intact one (a default the config tables
# give, no such special token, another token id or name): right when the GGUF file holds the intact
# file's tensors byte for byte and the ONNX folder loads in the runtime
LEGIT = {("rms_norm_eps", "removed"), ("max_position_embeddings", "removed"), ("_name_or_path", "string"),
         *((f"{key}_token_id", edit) for key in ("bos", "eos", "pad") for edit in ("removed", "null", "zero")),
         ("eos_token_id", "list")}


# -- the corpus -------------------------------------------------------------------------------------

def truncations(data: bytes, rng) -> list[tuple[str, bytes]]:
    return [(f"truncated at {at}", data[:at]) for at in sorted(set(rng.integers(0, len(data), TRUNCATIONS).tolist()))]


def flips(data: bytes, start: int, end: int, count: int, where: str, rng) -> list[tuple[str, bytes]]:
    """count copies of data, each with one byte in [start, end) xor-ed with a random non-zero value."""
    out = []
    for at in rng.integers(start, end, count).tolist():
        damaged = bytearray(data)
        damaged[at] ^= int(rng.integers(1, 256))
        out.append((f"{where} byte {at} flipped", bytes(damaged)))
    return out


def safetensors_corpus(data: bytes, rng) -> list[tuple[str, bytes]]:
    header_end = 8 + int.from_bytes(data[:8], "little")
    return (truncations(data, rng) + flips(data, 0, header_end, HEADER_FLIPS, "header", rng)
            + flips(data, header_end, len(data), DATA_FLIPS, "data", rng))


def gguf_corpus(path: Path, rng) -> list[tuple[str, bytes]]:
    from signround_export.export.gguf.read import open_gguf

    data = path.read_bytes()
    data_start = min(int(t.data_offset) for t in open_gguf(path).tensors)
    return (truncations(data, rng) + flips(data, 0, data_start, HEADER_FLIPS, "metadata", rng)
            + flips(data, data_start, len(data), DATA_FLIPS, "data", rng))


def value_edits(value) -> dict[str, object]:
    """Edit name -> new value (GONE: the key removed) for any config.json value."""
    out = {"removed": GONE, "null": None, "zero": 0, "negative": -1, "string": "x", "list": [value], "dict": {}}
    if isinstance(value, str):
        out["string"] = value + "x"
    elif isinstance(value, bool):
        out["flipped"] = not value
    elif isinstance(value, (int, float)) and value:
        out |= {"negative": -value, "string": str(value), "bool": True}
    return {k: v for k, v in out.items() if v is GONE or v != value or type(v) is not type(value)}


def config_paths(config: dict) -> list[tuple[str, ...]]:
    """Every key path of config.json (nested objects included) that test_door does not already edit."""
    done = {(f,) for f in MODEL_FIELDS} | {("quantization_config", f) for f in QUANT_FIELDS}
    paths = []
    for key, value in config.items():
        paths.append((key,))
        if isinstance(value, dict):
            paths += [(key, *sub) for sub in config_paths(value)]
    return [p for p in paths if p not in done]


def with_edit(config: dict, path: tuple[str, ...], value) -> dict:
    config = json.loads(json.dumps(config))
    where = config
    for key in path[:-1]:
        where = where[key]
    if value is GONE:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return config


# -- the intact inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> dict[str, Path]:
    """An untied tiny checkpoint (lm_head checked too), its exports through the CLI, and an ONNX folder
    whose initializers are in model.onnx.data."""
    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.export.onnx.build import export_onnx

    base = tmp_path_factory.mktemp("fuzz")
    ckpt = rtn_checkpoint(write_tiny_model(base / "model", tied=False), base / "ckpt", bits=4, group_size=32)
    out = {"ckpt": ckpt, "gguf": base / "ckpt.gguf", "onnx": base / "ckpt.onnx"}
    for kind in ("gguf", "onnx"):
        assert main(["export", kind, str(ckpt), "--out", str(out[kind]), "--quiet"]) == 0
    out["eval"] = base / "eval.json"
    assert main(["eval", str(ckpt), "--window", "16", "--windows", "1", "--json", str(out["eval"]), "--quiet"]) == 0
    out["onnx_data"] = base / "onnx-data"
    export_onnx(read_checkpoint(ckpt), out["onnx_data"], external_bytes=0)
    return out


# -- running one case -------------------------------------------------------------------------------

def run_all(corpus: str, entries: list[tuple], check) -> Counter:
    """check(*entry) for every (case name, ...) entry, which returns "refused" or "right"; one failure
    message per case that ends otherwise (an assertion of check, or any exception: a traceback). The
    counts are printed (shown with -s)."""
    counts, failures = Counter(), []
    for entry in entries:
        try:
            counts[check(*entry)] += 1
        except AssertionError as e:
            failures.append(f"{corpus}: {entry[0]}: {str(e).splitlines()[0][:300]}")
        except Exception as e:  # a traceback: the bug this test exists to find
            failures.append(f"{corpus}: {entry[0]}: {type(e).__name__}: {str(e)[:300]}")
    print(f"\n{corpus}: {len(entries)} cases, " + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))
    assert not failures, f"{len(failures)} of {len(entries)} cases failed:\n" + "\n".join(failures)
    return counts


def cli(argv, capsys) -> tuple[int, str]:
    rc = main([*map(str, argv), "--quiet"])
    return rc, capsys.readouterr().err


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def export_outcome(kind: str, folder: Path, out: Path, want: Path, legit: bool, capsys) -> str:
    remove(out)
    rc, err = cli(["export", kind, folder, "--out", out], capsys)
    if rc != 0:
        assert_refused(rc, err, out)
        return "refused"
    same = same_output(out, want)
    if not same:
        assert legit, f"export {kind} exit 0, but its output differs from the intact checkpoint's"
        assert_loads_like(kind, out, want)
    remove(out)
    return "right"


def assert_loads_like(kind: str, out: Path, want: Path) -> None:
    """A GGUF file holding want's tensors byte for byte; an ONNX folder the runtime loads."""
    if kind == "gguf":
        from signround_export.export.gguf.read import check_digests, open_gguf

        check_digests(out)
        got, intact = ({t.name: (t.tensor_type, t.data.tobytes()) for t in open_gguf(p).tensors} for p in (out, want))
        assert got == intact, "the GGUF file's tensors differ from the intact export's"
    else:
        from signround_runtime import Model

        Model(out, threads=1)


# -- the tests --------------------------------------------------------------------------------------

def checkpoint_cases(intact) -> list[tuple[str, str, bytes, tuple | None]]:
    """(case name, file name in the checkpoint, its damaged bytes, (field path, edit) of a config edit)."""
    rng = np.random.default_rng(SEED)
    ckpt = intact["ckpt"]
    cases = [(f"model.safetensors {what}", "model.safetensors", data, None)
             for what, data in safetensors_corpus((ckpt / "model.safetensors").read_bytes(), rng)]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        cases += [(f"{name} {what}", name, data, None) for what, data in truncations((ckpt / name).read_bytes(), rng)]
    config = json.loads((ckpt / "config.json").read_text())
    for path in config_paths(config):
        where = config
        for key in path:
            where = where[key]
        for edit, value in value_edits(where).items():
            data = json.dumps(with_edit(config, path, value)).encode()
            cases.append((f"config.json {'.'.join(path)} {edit}", "config.json", data, (".".join(path), edit)))
    return cases


def damaged_copy(source: Path, folder: Path, name: str, data: bytes) -> Path:
    remove(folder)
    shutil.copytree(source, folder)
    (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def checkpoint_outcomes() -> dict[str, str]:
    """Case name -> the outcome both exports agree on, filled by test_damaged_checkpoints_through_export."""
    return {}


def test_damaged_checkpoints_through_export(intact, checkpoint_outcomes, tmp_path, capsys):
    def check(case, name, data, edit):
        folder = damaged_copy(intact["ckpt"], tmp_path / "in" / "ckpt", name, data)
        outcomes = {export_outcome(kind, folder, tmp_path / f"out.{kind}", intact[kind], edit in LEGIT, capsys)
                    for kind in ("gguf", "onnx")}
        assert len(outcomes) == 1, "one export refused it, the other wrote the intact output"
        checkpoint_outcomes[case] = outcomes.pop() if edit not in LEGIT else "right (another valid config)"
        return checkpoint_outcomes[case]

    run_all("checkpoint", checkpoint_cases(intact), check)


def test_a_sample_through_eval_and_validate(intact, checkpoint_outcomes, tmp_path, capsys):
    """eval refuses a case or gives the intact perplexity, to the last digit (it reads no tokenizer_config.json,
    which the exports refuse damaged); a case eval refuses, validate refuses too."""
    if not checkpoint_outcomes:
        pytest.skip("runs after test_damaged_checkpoints_through_export")
    cases = {c[0]: c for c in checkpoint_cases(intact)}
    rng = np.random.default_rng(SEED + 1)
    sample = []
    for file in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        names = sorted(c for c, outcome in checkpoint_outcomes.items()
                       if c.split()[0] == file and outcome in ("refused", "right"))
        sample += [cases[names[i]] for i in sorted(rng.choice(len(names), min(SAMPLE, len(names)), replace=False))]

    def check(case, name, data, edit):
        folder = damaged_copy(intact["ckpt"], tmp_path / "in" / "ckpt", name, data)
        out = tmp_path / "eval.json"
        remove(out)
        rc, err = cli(["eval", folder, "--window", "16", "--windows", "1", "--json", out], capsys)
        if rc == 0:
            got, want = (json.loads(p.read_text()) for p in (out, intact["eval"]))
            assert got | {"model": ""} == want | {"model": ""}, f"eval gave {got}, the intact checkpoint {want}"
            return "right"
        assert_refused(rc, err, out)
        report = tmp_path / "report"
        rc, err = cli(["validate", folder, "--gguf", intact["gguf"], "--tokens", "32", "--window", "16",
                       "--report", report], capsys)
        assert_refused(rc, err, report)
        return "refused"

    run_all("checkpoint through eval and validate", sample, check)


def gguf_read(path: Path, cfg) -> dict:
    """Everything the GGUF reader gives of a file: its metadata and its tensors' types and float values."""
    from signround_export.export.gguf.read import check_digests, open_gguf, read_gguf_weights

    check_digests(path)
    weights, types = read_gguf_weights(path, cfg)
    fields = {name: b"".join(p.tobytes() for p in field.parts) for name, field in open_gguf(path).fields.items()}
    return {"fields": fields, "types": types, "weights": {n: weights[n].tobytes() for n in weights}}


def test_damaged_gguf_files_through_the_reader(intact, tmp_path, capsys):
    """Refused (GGUFExportError) or read as the intact file reads: the same metadata, types and weights."""
    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.errors import GGUFExportError
    from signround_export.model.config import ModelConfig

    cfg = ModelConfig.from_hf(read_checkpoint(intact["ckpt"]).hf_config)
    want = gguf_read(intact["gguf"], cfg)
    rng = np.random.default_rng(SEED + 2)
    cases = gguf_corpus(intact["gguf"], rng)
    sample = {cases[i][0] for i in rng.choice(len(cases), SAMPLE, replace=False)}
    damaged = tmp_path / "damaged.gguf"

    def check(case, data):
        damaged.write_bytes(data)
        try:
            got = gguf_read(damaged, cfg)
        except GGUFExportError as e:
            assert "\n" not in str(e), f"a refusal of several lines: {e}"
            outcome = "refused"
        else:
            assert got == want, "read without refusal, but unlike the intact file: " + ", ".join(
                k for k in want if got[k] != want[k])
            outcome = "right"
        if case in sample and outcome == "refused":
            report = tmp_path / "report"
            rc, err = cli(["validate", intact["ckpt"], "--gguf", damaged, "--tokens", "32", "--window", "16",
                           "--report", report], capsys)
            assert_refused(rc, err, report)
        return outcome

    run_all("gguf", cases, check)


def onnx_corpus(folder: Path, rng) -> list[tuple[str, str, bytes]]:
    """(case name, file, damaged bytes) over every file of an exported folder, the manifest included."""
    cases = []
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        cases += [(f"{path.name} {what}", path.name, d) for what, d in truncations(data, rng)[:TRUNCATIONS // 2]]
        cases += [(f"{path.name} {what}", path.name, d) for what, d in flips(data, 0, len(data), DATA_FLIPS // 2,
                                                                             "one", rng)]
    return cases


def test_damaged_onnx_folders_through_the_runtime(intact, tmp_path, capsys):
    """Refused (RuntimeModelError, one line) or loaded when every file but the manifest is the intact
    folder's (a manifest byte that sha256sum reads the same, its `*` binary mark)."""
    from signround_runtime import Model, RuntimeModelError

    source = intact["onnx_data"]
    rng = np.random.default_rng(SEED + 3)
    cases = onnx_corpus(source, rng)
    sample = {cases[i][0] for i in rng.choice(len(cases), SAMPLE, replace=False)}

    def check(case, name, data):
        folder = damaged_copy(source, tmp_path / "in" / "onnx", name, data)
        try:
            Model(folder, threads=1)
        except RuntimeModelError as e:
            assert "\n" not in str(e), f"a refusal of several lines: {e}"
            if case in sample:
                report = tmp_path / "report"
                rc, err = cli(["validate", intact["ckpt"], "--onnx", folder, "--tokens", "32", "--window", "16",
                               "--report", report], capsys)
                assert_refused(rc, err, report)
            return "refused"
        assert name == "sha256sums.txt", f"loaded a folder whose {name} is damaged"
        others = [p.name for p in source.iterdir() if p.name != name]
        assert all((folder / n).read_bytes() == (source / n).read_bytes() for n in others)
        return "right"

    run_all("onnx", cases, check)

