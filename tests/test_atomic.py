"""Atomic writes: the final name appears only whole, with the mode a plain write would give it."""

import os
import stat

import pytest

from signround_export.atomic import atomic_dir, atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_written_file_and_folder_get_the_modes_of_plain_ones(tmp_path, umask_022):
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    assert mode(tmp_path / "a.json") == mode(tmp_path / "plain.json") == 0o644
    assert mode(tmp_path / "ckpt") == mode(tmp_path / "plain") == 0o755
    assert (tmp_path / "ckpt" / "config.json").read_text() == "{}"


def test_a_failed_write_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["old.txt"]
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "new.txt").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["new.txt"]
