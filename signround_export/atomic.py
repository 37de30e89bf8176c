"""Atomic writes: a file or folder appears under its final name only once it is whole."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def umask_mode(full: int) -> int:
    """The mode open() or mkdir() would give a new file (full 0o666) or folder (0o777) under this process's
    umask. The temporary names are created private (0600, 0700); the final ones get this, so that a
    checkpoint or an export can be read by whoever could read a file written the plain way."""
    mask = os.umask(0)
    os.umask(mask)
    return full & ~mask


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder beside `final`; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o777))
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path):
    """Yield a temporary path beside `final`; on success it is renamed to `final`, on error removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o666))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
