"""sha256sums.txt: the digests of an exported folder's files, checked before the folder is loaded.

The exporter writes it last, over every other file of the folder (model.onnx, model.onnx.data, the
configs, the tokenizer files). Its lines are sha256sum's (`DIGEST  NAME`), so `sha256sum -c
sha256sums.txt` checks the folder from a shell as well. A folder without one (written by another tool)
loads unchecked. sha256: 1560 MB/s here (SHA instructions), against blake2b's 900.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

MANIFEST = "sha256sums.txt"
CHUNK = 1 << 22  # bytes hashed at a time: memory stays flat whatever the file's size
LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder) -> Path:
    """sha256sums.txt in folder, over every file under it (sorted, relative names with /)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{file_digest(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / MANIFEST).write_text("".join(lines))
    return folder / MANIFEST


def damaged(folder) -> str | None:
    """What is wrong with the folder's files by its sha256sums.txt, in one sentence, or None when every
    file it lists is there with its digest (or there is no manifest)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return f"{manifest} cannot be read ({e}); the file is damaged: copy or export the folder again"
    for number, line in enumerate(lines, 1):
        m = LINE.fullmatch(line)
        if m is None or Path(m[2]).is_absolute() or ".." in Path(m[2]).parts:
            return (f"{manifest} line {number} is not `DIGEST  NAME` of a file in the folder; the manifest is "
                    "damaged: copy or export the folder again")
        path = folder / m[2]
        if not path.is_file():
            return f"{path} is missing ({MANIFEST} lists it); copy or export the folder again"
        if file_digest(path) != m[1]:
            return (f"{path}: its bytes do not match its digest in {MANIFEST}; the file is damaged: copy or "
                    f"export the folder again (changed on purpose: put its new sha256 in {MANIFEST}, or load it "
                    "without verifying)")
    return None
