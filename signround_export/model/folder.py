"""A Hugging Face model folder on disk: its config, its safetensors weights, its tokenizer files.

Float models and quantized checkpoints are both such folders; everything that reads or copies their
files goes through here, so both are read the same way (sharded or not, bfloat16 or not).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..digests import new_hash, tensor_digests
from ..errors import ModelError, SignroundError

INDEX = "model.safetensors.index.json"  # the shard index of a sharded folder
# what a folder needs besides its weights to tokenize, chat and generate; copied into every output
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# the ids `calib self` generated (selfcalib.py), kept beside a checkpoint's weights: not a weight file
SELF_CALIBRATION_FILE = "calibration-self.safetensors"
CHAT_TEMPLATES = "additional_chat_templates"  # a folder of NAME.jinja templates besides the default one


def resolve_model_dir(model: str | Path) -> Path:
    """A local folder as is; otherwise a hub id fetched into the local HF cache."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelError(f"{model} is a file; give a model folder (config.json + *.safetensors)")
    if str(model).count("/") != 1:
        raise ModelError(f"{model}: no such folder (give a local HF model folder or a hub id org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as e:  # the hub's own errors are long; say what happened in one line
        raise ModelError(f"{model}: not a local folder, and fetching it from the hub failed: {e}") from None


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    return read_json(path, "the model's config")


def read_json(path: Path, what: str, error: type[SignroundError] = ModelError) -> dict:
    """A JSON object from a file that must be there; `error` names it as `what` when it is missing or
    damaged."""
    if not path.is_file():
        raise error(f"{path} is missing: {path.parent} is not complete ({what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); the file is damaged (write it again)") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object; the file is damaged (write it again)")
    return data


def safetensors_files(folder: Path, error: type[SignroundError] = ModelError) -> list[Path]:
    """The weight files: the shards the index names, or every *.safetensors of the folder."""
    index = folder / INDEX
    if index.is_file():
        weight_map = read_json(index, "the shard index", error).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{index} has no weight_map; the shard index is damaged")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise error(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != SELF_CALIBRATION_FILE)
    if not files:
        other = " (only .bin weights found: save with safetensors)" if list(folder.glob("*.bin")) else ""
        raise error(f"{folder} holds no model.safetensors{other}")
    return files


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says of one tensor, known without reading its data."""

    file: Path
    dtype: str  # as safetensors names it: "BF16", "F16", "F32", "I32", ...
    shape: tuple[int, ...]
    offset: int = 0  # where its bytes start in the file
    digest: str | None = None  # the digest of its bytes written with it (digests.py); None: not checked


def file_headers(f: Path, error: type[SignroundError] = ModelError,
                 remedy: str = "rebuild or re-download it") -> dict[str, TensorHeader]:
    """Every tensor of one safetensors file by name, from its header; a damaged file raises `error`.
    safetensors checks the header (offsets within the file, sizes that match dtype and shape); the
    offsets and the digests in its metadata are then read from it: an 8-byte length n, n bytes of
    JSON, the data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as st:
            names = list(st.keys())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise error(f"{f} is truncated or corrupt ({e}); {remedy}") from None
    digests = tensor_digests(meta.get("__metadata__"))
    if digests and digests.keys() != set(names):  # a file written with digests has one for every tensor
        missing, unknown = sorted(set(names) - digests.keys()), sorted(digests.keys() - set(names))
        what = f"none for tensor {missing[0]}" if missing else f"one for {unknown[0]}, which it does not hold"
        raise error(f"{f}: its metadata holds digests, but {what}; the header is damaged: copy it again, or {remedy}")
    return {name: TensorHeader(Path(f), meta[name]["dtype"], tuple(meta[name]["shape"]),
                               8 + n + meta[name]["data_offsets"][0], digests.get(name)) for name in names}


def safetensors_headers(folder: Path, error: type[SignroundError] = ModelError,
                        remedy: str = "rebuild or re-download it") -> dict[str, TensorHeader]:
    """Every tensor of the folder by name, from the files' headers, in file order. A damaged file, shards
    that overlap or an index naming tensors no shard holds raise `error` (a damaged file's ends with
    `remedy`)."""
    headers: dict[str, TensorHeader] = {}
    for f in safetensors_files(folder, error):
        for name, header in file_headers(f, error, remedy).items():
            if name in headers:
                raise error(f"{f}: tensor {name} is also in {headers[name].file}; the shards overlap")
            headers[name] = header
    index = folder / INDEX
    if index.is_file():
        lost = sorted(set(read_json(index, "the shard index", error)["weight_map"]) - set(headers))
        if lost:
            raise error(f"{index} lists tensors no shard holds: {', '.join(lost[:5])}")
    return headers


# safetensors' dtype names and torch's
TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "U8": "uint8",
                "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2"}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # the dtypes of float weights
READ_STEP = 1 << 22  # elements read and converted at a time when the result's dtype is not the stored one


def read_tensor(name: str, header: TensorHeader, error: type[SignroundError] = ModelError,
                remedy: str = "rebuild or re-download it", dtype=None):
    """One tensor as stored, or as `dtype` (a torch tensor: numpy has no bfloat16). Read with plain file
    reads, converted a slice at a time: a memory-mapped file's pages would count as the process's memory
    while it is open (measured: 3 GB held to read a 1 GB bfloat16 embedding as float32, 2 GB this way).
    When the header has a digest, the bytes are hashed as they are read and a mismatch raises `error`."""
    import torch

    if header.dtype not in TORCH_DTYPES:
        raise error(f"{header.file}: tensor {name} has dtype {header.dtype}, which this tool does not read; save it "
                    f"as one of {', '.join(TORCH_DTYPES)}")
    stored = getattr(torch, TORCH_DTYPES[header.dtype])
    out = torch.empty(header.shape, dtype=dtype or stored)
    flat = out.view(-1)
    digest = new_hash() if header.digest is not None else None
    try:
        with open(header.file, "rb") as f:
            f.seek(header.offset)
            if out.dtype == stored:
                read_into(f, flat, name, digest)
            for i in range(0, flat.numel() if out.dtype != stored else 0, READ_STEP):
                part = torch.empty(min(READ_STEP, flat.numel() - i), dtype=stored)
                read_into(f, part, name, digest)
                flat[i : i + len(part)] = part
    except OSError as e:
        raise error(f"{header.file} is truncated or corrupt ({e}); {remedy}") from None
    if digest is not None and digest.hexdigest() != header.digest:
        raise error(f"{header.file}: tensor {name}: its bytes do not match the digest written with it; the file "
                    f"is damaged: copy it again, or {remedy}")
    return out


def read_into(f, t, name: str, digest=None) -> None:
    """The next bytes of the open file f into the contiguous tensor t, added to digest when given."""
    import torch

    view = memoryview(t.view(torch.uint8).numpy())
    if f.readinto(view) != t.numel() * t.element_size():
        raise OSError(f"the file ends inside tensor {name}")
    if digest is not None:
        digest.update(view)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the TOKENIZER_FILES that src has into dst, and its named chat templates (tool_use, ...); a
    JSON one that does not parse is refused (ModelError naming it), not copied into an output that
    cannot load."""
    for fname in TOKENIZER_FILES:
        if (Path(src) / fname).is_file():
            if fname.endswith(".json"):
                read_json(Path(src) / fname, "a tokenizer file")
            shutil.copyfile(Path(src) / fname, Path(dst) / fname)
    if (Path(src) / CHAT_TEMPLATES).is_dir():
        shutil.copytree(Path(src) / CHAT_TEMPLATES, Path(dst) / CHAT_TEMPLATES, dirs_exist_ok=True)


def config_token_id(folder: Path, hf_config: dict, key: str):
    """The `{key}_token_id` ("bos", "eos", "pad") of config.json, else of generation_config.json; an id,
    a list of ids (several eos) or None."""
    value = hf_config.get(f"{key}_token_id")
    if value is None:
        gen = Path(folder) / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get(f"{key}_token_id")
    return value
