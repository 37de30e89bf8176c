"""A GGUF file's weights read back as float32 under their HF names, as llama.cpp sees them, and its
tensors checked against the digests its metadata carries."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from ...digests import PLACEHOLDER, digest_of, new_hash
from ...errors import GGUFExportError
from ...model.config import ModelConfig
from .tensors import hf_names, is_norm, rope_heads, rope_unpermute

ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling's per-frequency divisors, written from the config
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # longrope's, from the config too
DIGESTS_KEY = "signround.tensor_sha256"  # each tensor's digest, in the order of the tensor infos
# the digest of every byte before the tensor data (header, metadata, tensor infos), its own 64 read as "0"s
METADATA_KEY = "signround.metadata_sha256"
CHUNK = 1 << 22  # bytes hashed at a time


def dequantize(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of one tensor as llama.cpp reads them (gguf-py's reference dequantization)."""
    if type_name in ("F32", "F16"):
        return np.asarray(data, dtype=np.float32).reshape(shape)
    return gguf_dequantize(np.asarray(data).reshape(shape[0], -1), GGMLQuantizationType[type_name]).reshape(shape)


def open_gguf(path) -> GGUFReader:
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct errors, memmap errors for broken files
        raise GGUFExportError(f"{path} is not a readable GGUF file ({str(e)[:200]}); it is truncated or corrupt") from None


def metadata_digest(path, reader: GGUFReader) -> tuple[int, str, str]:
    """(where METADATA_KEY's value is in the file, that value, the digest of the bytes before the tensor
    data with that value read as PLACEHOLDER)."""
    field = reader.fields[METADATA_KEY]
    at = int(field.offset) + sum(int(p.nbytes) for p in field.parts[:-1])
    with open(path, "rb") as f:
        head = bytearray(f.read(int(reader.data_offset)))
    given = bytes(head[at:at + len(PLACEHOLDER)]).decode("ascii", errors="replace")
    head[at:at + len(PLACEHOLDER)] = PLACEHOLDER.encode()
    return at, given, digest_of(head)


def stamp_metadata_digest(path) -> None:
    """Write the digest of a just-written file's metadata in place of its METADATA_KEY placeholder."""
    at, _, digest = metadata_digest(path, open_gguf(path))
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(digest.encode())


def check_digests(path) -> None:
    """The metadata, then every tensor's bytes against the digest the file's metadata holds for it (plain
    reads, a chunk at a time); GGUFExportError naming the first that differs. A file without digests
    passes unchecked."""
    reader = open_gguf(path)
    if METADATA_KEY in reader.fields:
        _, given, digest = metadata_digest(path, reader)
        if given != digest:
            raise GGUFExportError(f"{path}: its metadata does not match the digest written with it ({METADATA_KEY}); "
                                  "the file is damaged: copy or export it again")
    field = reader.fields.get(DIGESTS_KEY)
    if field is None:
        return
    digests = field.contents()
    if not isinstance(digests, list) or len(digests) != len(reader.tensors):
        raise GGUFExportError(f"{path}: {DIGESTS_KEY} does not hold one digest per tensor ({len(reader.tensors)}); "
                              "the file is damaged: copy or export it again")
    with open(path, "rb") as f:
        for t, want in zip(reader.tensors, digests):
            f.seek(int(t.data_offset))
            digest, left = new_hash(), int(t.n_bytes)
            while left:
                block = f.read(min(CHUNK, left))
                if not block:
                    break
                digest.update(block)
                left -= len(block)
            if left or digest.hexdigest() != want:
                raise GGUFExportError(f"{path}: tensor {t.name}: its bytes do not match the digest written with it "
                                      f"({DIGESTS_KEY}); the file is damaged: copy or export it again")


def check_model(reader: GGUFReader, path, cfg: ModelConfig) -> str:
    """The file's architecture, once its hyperparameters are cfg's; GGUFExportError naming the first
    that differs."""
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    want_arch = cfg.family.gguf_arch
    if arch != want_arch:
        raise GGUFExportError(f"{path} is a {arch!r} model, expected {want_arch!r}")
    for key, value in (("block_count", cfg.n_layers), ("embedding_length", cfg.hidden_size),
                       ("attention.head_count", cfg.n_heads), ("attention.head_count_kv", cfg.n_kv_heads)):
        f = reader.fields.get(f"{arch}.{key}")
        if f is None or int(f.contents()) != value:
            raise GGUFExportError(f"{path}: {arch}.{key} is {None if f is None else f.contents()}, the checkpoint "
                                  f"has {value}; the file belongs to another model")
    return arch


class GGUFWeights(Mapping):
    """A GGUF file's float32 weights under their HF names (q/k rows back in HF order), each dequantized
    from the memory-mapped file when it is indexed and not kept; `types` holds each tensor's GGUF type.
    The names, types and hyperparameters are checked on opening: GGUFExportError when the file is
    unreadable or does not match cfg."""

    def __init__(self, path, cfg: ModelConfig):
        reader = open_gguf(path)
        arch = check_model(reader, path, cfg)
        to_hf = hf_names(cfg.n_layers, cfg.family)
        self.cfg, self.tensors, self.types = cfg, {}, {}
        for t in reader.tensors:
            if t.name == ROPE_FREQS or t.name in ROPE_FACTORS:  # rope scaling, not a weight: the config gives it
                continue
            if t.name not in to_hf:
                raise GGUFExportError(f"{path}: tensor {t.name} is not one of a {arch} model's")
            self.tensors[to_hf[t.name]] = t
            self.types[to_hf[t.name]] = t.tensor_type.name

    def __getitem__(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        w = dequantize(t.tensor_type.name, t.data, shape)
        heads = rope_heads(self.cfg, name)
        w = rope_unpermute(w, heads) if heads else w
        if is_norm(name) and self.cfg.family.norm_offset:  # the file holds offset + weight (write.py)
            w = w - np.float32(self.cfg.family.norm_offset)
        return w

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def read_gguf_weights(path, cfg: ModelConfig) -> tuple[GGUFWeights, dict[str, str]]:
    """The float32 weights of a GGUF file under their HF names, read one at a time when indexed, and
    each tensor's GGUF type. GGUFExportError when the file is unreadable or does not match cfg."""
    weights = GGUFWeights(path, cfg)
    return weights, weights.types
