"""Tests of atomic writes: all or nothing, no temporary files left behind."""

import os

import pytest

from pvae_jax import fileio


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with fileio.atomic_write(path) as f:
        f.write("first")
    with fileio.atomic_write(path) as f:
        f.write("second")
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["out.json"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), fileio.atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
