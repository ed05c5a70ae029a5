"""agent/filetrust.py: who may change a file the issuer decides by (owner, mode, directory, symlinks).

Real files, modes and owners in a temporary directory (chown needs root: skipped without it). Seen failing
before filetrust existed: the issuer loaded a group-writable registry (tests/hostile/test_issuer_attacks.py)."""

from __future__ import annotations

import os

import pytest

from agent.filetrust import UntrustedFileError, check_trusted_file

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def safe_dir(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    return directory


def _file(directory, name="workloads.yaml", mode=0o644):
    path = directory / name
    path.write_text("x")
    os.chmod(path, mode)
    return path


def test_a_file_only_its_owner_may_write_passes(safe_dir):
    check_trusted_file(_file(safe_dir), "registry.file")
    check_trusted_file(_file(safe_dir, "k", 0o600), "tokens.key_file", secret=True)
    check_trusted_file(safe_dir / "missing", "registry.file")   # its reader says it is missing


@pytest.mark.parametrize("mode,secret,fix", [(0o664, False, "chmod 0644"), (0o646, False, "chmod 0644"),
                                             (0o640, True, "chmod 0600"), (0o604, True, "chmod 0600"),
                                             (0o620, True, "chmod 0600")])
def test_group_or_other_access_is_refused_naming_file_mode_and_fix(safe_dir, mode, secret, fix):
    path = _file(safe_dir, mode=mode)
    with pytest.raises(UntrustedFileError) as refused:
        check_trusted_file(path, "registry.file", secret=secret)
    message = str(refused.value)
    assert "registry.file" in message and str(path) in message and f"{mode:04o}" in message and fix in message


@root_only
def test_a_file_or_directory_another_user_owns_is_refused(safe_dir):
    path = _file(safe_dir)
    os.chown(path, 65534, 65534)
    with pytest.raises(UntrustedFileError, match=f"chown root {path}"):
        check_trusted_file(path, "registry.file")
    os.chown(path, 0, 0)
    os.chown(safe_dir, 65534, 65534)
    with pytest.raises(UntrustedFileError, match="its directory .* is owned by"):
        check_trusted_file(path, "registry.file")
    check_trusted_file(path, "registry.file", owners={0, 65534})   # the issuer's own user may own them


def test_a_directory_others_may_write_is_refused_unless_sticky(safe_dir):
    path = _file(safe_dir)
    os.chmod(safe_dir, 0o777)
    with pytest.raises(UntrustedFileError, match="chmod go-w"):
        check_trusted_file(path, "registry.file")
    os.chmod(safe_dir, 0o1777)   # /tmp, a Kubernetes Secret volume: others cannot replace our file
    check_trusted_file(path, "registry.file")


def test_a_symlink_is_judged_by_its_target_and_both_directories(tmp_path, safe_dir):
    """A Kubernetes Secret volume: issuer.key -> ..data/issuer.key, the target 0400 under a root directory."""
    data = safe_dir / "..data"
    data.mkdir()
    target = _file(data, "issuer.key", 0o400)
    link = safe_dir / "issuer.key"
    link.symlink_to(target)
    check_trusted_file(link, "ca_dir", secret=True)
    os.chmod(target, 0o644)
    with pytest.raises(UntrustedFileError, match=str(link)):
        check_trusted_file(link, "ca_dir", secret=True)
    os.chmod(target, 0o400)
    os.chmod(data, 0o777)
    with pytest.raises(UntrustedFileError, match="..data"):
        check_trusted_file(link, "ca_dir", secret=True)


def test_every_directory_above_is_checked_not_only_the_nearest(tmp_path, safe_dir):
    """A grandparent others may write lets them rename the parent away and put another directory in its place
    (tests/hostile/test_issuer_attacks.py shows the swap); as sshd's StrictModes, every ancestor up to / counts."""
    inner = safe_dir / "tcpmesh"
    inner.mkdir()
    os.chmod(inner, 0o755)
    path = _file(inner)
    check_trusted_file(path, "registry.file")
    os.chmod(safe_dir, 0o777)
    with pytest.raises(UntrustedFileError) as refused:
        check_trusted_file(path, "registry.file")
    message = str(refused.value)
    assert f"the directory above it {safe_dir} has mode 0777" in message and f"chmod go-w {safe_dir}" in message
    assert "registry.file" in message and str(path) in message
    os.chmod(safe_dir, 0o1777)   # sticky, like /tmp: others cannot rename our directory out of it
    check_trusted_file(path, "registry.file")


@root_only
def test_an_ancestor_another_user_owns_is_refused(safe_dir):
    inner = safe_dir / "tcpmesh"
    inner.mkdir()
    os.chmod(inner, 0o755)
    path = _file(inner)
    os.chown(safe_dir, 65534, 65534)
    with pytest.raises(UntrustedFileError, match=f"the directory above it {safe_dir} .*chown root {safe_dir}"):
        check_trusted_file(path, "registry.file")


def test_the_ancestors_of_a_symlinks_target_are_checked_too(tmp_path, safe_dir):
    elsewhere = tmp_path / "open"
    elsewhere.mkdir()
    os.chmod(elsewhere, 0o777)
    data = elsewhere / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    target = _file(data)
    link = safe_dir / "workloads.yaml"
    link.symlink_to(target)
    with pytest.raises(UntrustedFileError, match=f"chmod go-w {elsewhere}"):
        check_trusted_file(link, "registry.file")
