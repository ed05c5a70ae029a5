"""agent.safe_write: the one way audit keys and CA files are written."""

from __future__ import annotations

import os

import pytest

from agent.safe_write import replace_atomic, write_new


def test_write_new_refuses_an_existing_file_and_a_symlink(tmp_path):
    target = tmp_path / "key"
    write_new(target, b"one", 0o600)
    with pytest.raises(FileExistsError):
        write_new(target, b"two", 0o600)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_new(tmp_path / "link", b"x", 0o600)
    assert not (tmp_path / "elsewhere").exists() and target.read_bytes() == b"one"


def test_mode_is_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        replace_atomic(tmp_path / "ca.crt", b"cert", 0o644)
    finally:
        os.umask(old)
    assert (tmp_path / "ca.crt").stat().st_mode & 0o777 == 0o644


def test_replace_leaves_the_old_file_and_no_temporary_when_it_fails(tmp_path):
    target = tmp_path / "key"
    replace_atomic(target, b"old", 0o600)
    (tmp_path / "dir").mkdir()
    with pytest.raises(OSError):
        replace_atomic(tmp_path / "dir", b"new", 0o600)  # rename over a directory fails
    replace_atomic(target, b"new", 0o600)
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "key"]
