"""The resume store: a run's finished work on disk, so that a killed run ends with the same integers.

One folder (the checkpoint's name + ".progress") holds

    allocation.json          the bits per layer chosen under an average-bits budget, with the settings
                             it was chosen under (a rerun with the same settings reads it back)
    args.json                the tuning settings the blocks below were tuned with
    block_NNN.safetensors    the integers of each finished block, its log in the metadata

A rerun with other tuning settings is refused rather than mixing blocks of two runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ..atomic import atomic_file
from ..checkpoint.qweight import QuantWeight
from ..errors import TuneError
from .allocate import Allocation
from .signround import BlockLog


class ResumeStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

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

    def begin(self, fingerprint: dict) -> None:
        """Record the tuning settings, or check them against those of the blocks already here."""
        args_file = self.folder / "args.json"
        if args_file.is_file():
            saved = json.loads(args_file.read_text())
            if saved != fingerprint:
                diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise TuneError(f"{self.folder} holds a run with different settings ({', '.join(diff)}); "
                                "rerun with the same arguments to resume, or delete that folder to start over")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(args_file) as tmp:
                tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))

    def block_path(self, i: int) -> Path:
        return self.folder / f"block_{i:03d}.safetensors"

    def load_block(self, i: int) -> tuple[dict[str, QuantWeight], BlockLog] | None:
        path = self.block_path(i)
        if not path.is_file():
            return None
        with safe_open(str(path), "np") as f:
            meta = f.metadata()
        arrays = load_file(str(path))
        qweights = {}
        for name, info in json.loads(meta["layers"]).items():
            qweights[name] = QuantWeight(
                q=arrays[name + ".q"], scale=arrays[name + ".scale"], zero=arrays[name + ".zero"],
                bias=arrays.get(name + ".bias"), offset=arrays.get(name + ".offset"), **info,
            )
        return qweights, BlockLog(**json.loads(meta["log"]))

    def save_block(self, i: int, qweights: dict[str, QuantWeight], log: BlockLog) -> None:
        arrays, layers = {}, {}
        for name, qw in qweights.items():
            arrays |= {name + ".q": qw.q, name + ".scale": qw.scale, name + ".zero": qw.zero}
            for key, value in (("bias", qw.bias), ("offset", qw.offset)):
                if value is not None:
                    arrays[f"{name}.{key}"] = value
            layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
        meta = {"layers": json.dumps(layers), "log": json.dumps(asdict(log))}
        with atomic_file(self.block_path(i)) as tmp:
            # safetensors writes a non-contiguous numpy view scrambled: hand it contiguous arrays
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)

    def remove(self) -> None:
        """The checkpoint is whole: the resume state is spent."""
        shutil.rmtree(self.folder, ignore_errors=True)
