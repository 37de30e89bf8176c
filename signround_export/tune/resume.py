"""The resume store: a run's finished work on disk, so that a killed run ends with the same integers, and
the place the checkpoint's shards are made in.

One folder (the checkpoint's name + ".progress") holds

    allocation.json          the choice per layer made under a mixed-precision budget, with the settings
                             it was made under (a rerun with the same settings reads it back)
    args.json                the tuning settings the blocks below were tuned with, the packing format
                             and the shard size
    block_NNN.safetensors    the packed tensors of each finished block, as the checkpoint stores them,
                             with their digests (checked when read back, as a checkpoint's are)
    block_NNN.json           its log and its layers' schemes and shapes; written last: a block is
                             finished when this file is there
    lm_head.safetensors/json the quantized head, when the run quantizes it
    model-*.safetensors      the checkpoint's shards, written at the end from the files above; a block's
                             file is deleted once every tensor of it is in a finished shard, so the
                             folder never holds two copies of more than one shard's worth

A rerun with other tuning settings is refused rather than mixing blocks of two runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..atomic import atomic_file
from ..checkpoint.format import QuantConfig
from ..checkpoint.qweight import QuantWeight
from ..checkpoint.read import layer_weight
from ..checkpoint.shards import DEFAULT_SHARD_SIZE, TensorSpec, Unit, parse_size
from ..checkpoint.write import PackedLayer, pack_layer
from ..digests import digest_of, metadata_key
from ..errors import TuneError
from ..model.folder import SELF_CALIBRATION_FILE, TensorHeader, file_headers
from ..model.store import Lazy, StoredArrays
from .allocate import Allocation
from .config import LATER_SETTINGS, TuneConfig
from .signround import BlockLog

REMEDY = "delete that folder to start over"
SHARD_PREFIX = "model"  # model.safetensors, model-0000X-of-0000Y.safetensors


def at_default(setting: str, value) -> bool:
    """A setting added after the store's format (the ablation switches, the grid) at its default: a store
    written before it existed ran so (defaults that keep earlier behaviour hold for these settings only)."""
    defaults = {f.name: f.default for f in fields(TuneConfig) if f.name in LATER_SETTINGS}
    return setting in defaults and defaults[setting] == value


class ResumeStore:
    def __init__(self, folder: str | Path, shard_size: int | str = DEFAULT_SHARD_SIZE, calibration: str | None = None):
        """calibration: the calibration spec's name, part of the settings a resumed run must share."""
        self.folder = Path(folder)
        self.shard_size = parse_size(shard_size)
        self.calibration = calibration
        self.packing_format: str | None = None  # set by begin()

    # -- the bits allocation ---------------------------------------------------------------------

    def load_allocation(self, settings: dict) -> Allocation | None:
        """The allocation saved under exactly these settings, else None."""
        path = self.folder / "allocation.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        return Allocation.from_json(record["allocation"]) if record["settings"] == settings else None

    def save_allocation(self, settings: dict, allocation: Allocation) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.folder / "allocation.json") as tmp:
            tmp.write_text(json.dumps({"settings": settings, "allocation": allocation.to_json()}, indent=1))

    # -- finished blocks ---------------------------------------------------------------------------

    def begin(self, fingerprint: dict, packing_format: str) -> None:
        """Record the tuning settings, or check them against those of the blocks already here. The
        blocks are packed in packing_format, the checkpoint's."""
        self.packing_format = packing_format
        fingerprint = fingerprint | {"packing_format": packing_format, "shard_size": self.shard_size}
        if self.calibration is not None:
            fingerprint["calibration"] = self.calibration
        args_file = self.folder / "args.json"
        if args_file.is_file():
            saved = json.loads(args_file.read_text())
            saved |= {k: v for k, v in fingerprint.items() if k not in saved and at_default(k, v)}
            if saved != fingerprint:
                diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise TuneError(f"{self.folder} holds a run with different settings ({', '.join(diff)}); "
                                "rerun with the same arguments to resume, or delete that folder to start over")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(args_file) as tmp:
                tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))

    def load_block(self, i: int) -> tuple[dict[str, QuantWeight], BlockLog] | None:
        """Block i's integers and log, when it was finished (read from its file or from a shard)."""
        record = self.record(f"block_{i:03d}")
        if record is None:
            return None
        headers = self.headers()
        arrays = StoredArrays(headers, TuneError, REMEDY)
        qweights = {name: self.unpack(name, PackedLayer(**layer), headers, arrays)
                    for name, layer in record["layers"].items()}
        return qweights, BlockLog(**record["log"])

    def save_block(self, i: int, qweights: dict[str, QuantWeight], log: BlockLog) -> None:
        self.save_layers(f"block_{i:03d}", qweights, asdict(log))

    def has(self, key: str) -> bool:
        return (self.folder / f"{key}.json").is_file()

    def save_layers(self, key: str, qweights: dict[str, QuantWeight], log: dict | None = None) -> None:
        """Layers packed as the checkpoint stores them in KEY.safetensors, then KEY.json saying they are
        whole (their schemes and shapes, and the block's log)."""
        arrays = {}
        for name, qw in qweights.items():
            arrays |= pack_layer(name, qw, self.packing_format)
        digests = {metadata_key(n): digest_of(np.ascontiguousarray(a)) for n, a in arrays.items()}
        with atomic_file(self.folder / f"{key}.safetensors") as tmp:
            save_file(arrays, str(tmp), metadata={"format": "pt"} | digests)
        record = {"layers": {name: asdict(PackedLayer.of(qw)) for name, qw in qweights.items()}, "log": log}
        with atomic_file(self.folder / f"{key}.json") as tmp:
            tmp.write_text(json.dumps(record))

    def record(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # -- the store as the checkpoint's source ------------------------------------------------------

    def layers(self) -> dict[str, PackedLayer]:
        """Every finished layer's scheme and shape, by name."""
        layers = {}
        for path in [*sorted(self.folder.glob("block_*.json")), self.folder / "lm_head.json"]:
            if path.is_file():  # (the shard index is a .json here too)
                layers |= {n: PackedLayer(**v) for n, v in json.loads(path.read_text())["layers"].items()}
        return layers

    def files(self) -> tuple[list[Path], list[Path]]:
        """The finished shards here, and the layer files (blocks, head)."""
        files = sorted(f for f in self.folder.glob("*.safetensors") if f.name != SELF_CALIBRATION_FILE)
        shards = [f for f in files if f.name.startswith(SHARD_PREFIX)]
        return shards, [f for f in files if f not in shards]

    def headers(self) -> dict[str, TensorHeader]:
        """Every packed tensor here, from the finished shards, else from the layer files."""
        shards, layer_files = self.files()
        headers: dict[str, TensorHeader] = {}
        for f in shards:
            headers |= file_headers(f, TuneError, REMEDY)
        for f in layer_files:  # a run stopped between a shard and prune() left both: the shard counts
            headers |= {n: h for n, h in file_headers(f, TuneError, REMEDY).items() if n not in headers}
        return headers

    def prune(self) -> None:
        """Delete the layer files every tensor of which a finished shard holds."""
        shards, layer_files = self.files()
        in_shards = {n for f in shards for n in file_headers(f, TuneError, REMEDY)}
        for f in layer_files:
            if file_headers(f, TuneError, REMEDY).keys() <= in_shards:
                f.unlink()

    def unpack(self, name: str, layer: PackedLayer, headers: dict[str, TensorHeader], arrays: Mapping) -> QuantWeight:
        quant = QuantConfig(layer.bits, layer.group_size, layer.sym, self.packing_format, grid=layer.grid)
        return layer_weight(name, headers, arrays, quant)

    def qweights(self) -> Mapping[str, QuantWeight]:
        """Every finished layer, read from disk when indexed."""
        layers, headers = self.layers(), self.headers()
        arrays = StoredArrays(headers, TuneError, REMEDY)
        return Lazy(sorted(layers), lambda n: self.unpack(n, layers[n], headers, arrays),
                    lambda n: (layers[n].n, layers[n].k))

    def units(self) -> list[Unit]:
        """Each finished layer as the checkpoint writer takes it: its packed tensors read as stored."""
        layers, headers = self.layers(), self.headers()  # the shards here hold float tensors too: not ours
        arrays = StoredArrays(headers, TuneError, REMEDY)
        by_layer: dict[str, dict[str, TensorSpec]] = {name: {} for name in layers}
        for tname, h in headers.items():
            if tname.rpartition(".")[0] in by_layer:
                by_layer[tname.rpartition(".")[0]][tname] = TensorSpec(h.dtype, h.shape)
        return [Unit(name, specs, lambda specs=specs: {t: arrays[t] for t in specs})
                for name, specs in by_layer.items()]

    def remove(self) -> None:
        """The checkpoint is whole: the resume state is spent."""
        shutil.rmtree(self.folder, ignore_errors=True)
