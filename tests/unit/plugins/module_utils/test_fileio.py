# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import errno
import os
import stat

import pytest

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _fileio
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_file_is_atomic_and_private(tmp_path):
    target = tmp_path / "secret.env"
    _fileio.write_file(str(target), b"A=1\n")
    assert target.read_bytes() == b"A=1\n"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.env"]


def test_write_file_mode_is_applied(tmp_path):
    target = tmp_path / "server.crt"
    _fileio.write_file(str(target), b"cert", mode=0o644)
    assert _mode(target) == 0o644


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "data.txt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with _fileio.StagedFile(str(target)) as staged:
            staged.write(b"new partial")
            raise RuntimeError("killed half way")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]


def test_commit_together_publishes_both(tmp_path):
    crt = _fileio.StagedFile(str(tmp_path / "a.crt"), mode=0o644)
    key = _fileio.StagedFile(str(tmp_path / "a.key"))
    crt.write(b"C")
    key.write(b"K")
    _fileio.commit_together([crt, key])
    assert (tmp_path / "a.crt").read_bytes() == b"C"
    assert _mode(tmp_path / "a.key") == 0o600


def test_commit_together_renames_back_to_back(tmp_path, monkeypatch):
    """No fsync between the two renames: the directory is synced once, after both (the mixed-pair
    window is two rename() calls, not a directory fsync on a busy disk)."""
    old_key = tmp_path / "b.key"
    old_key.write_bytes(b"old key")
    (tmp_path / "b.crt").write_bytes(b"old cert")
    key = _fileio.StagedFile(str(old_key))
    crt = _fileio.StagedFile(str(tmp_path / "b.crt"), mode=0o644)
    key.write(b"new key")
    crt.write(b"new cert")
    seen = []
    real = _fileio.fsync_dir

    def spy(directory):
        seen.append(((tmp_path / "b.key").read_bytes(), (tmp_path / "b.crt").read_bytes()))
        real(directory)

    monkeypatch.setattr(_fileio, "fsync_dir", spy)
    _fileio.commit_together([key, crt])
    assert seen == [(b"new key", b"new cert")]


def test_unknown_owner_is_a_clear_error(tmp_path):
    with pytest.raises(RunbookError, match="no such user"):
        _fileio.write_file(str(tmp_path / "x"), b"x", owner="no-such-user-here")
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(RunbookError, match=str(tmp_path / "nope")):
        _fileio.write_file(str(tmp_path / "nope" / "x"), b"x")


def test_copy_file_streams(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * _fileio.COPY_CHUNK + 17))
    _fileio.copy_file(str(src), str(tmp_path / "dst.bin"))
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()


def test_remove_stale_temps_only_touches_ours(tmp_path):
    (tmp_path / (_fileio.TEMP_PREFIX + "abc")).write_bytes(b"partial")
    (tmp_path / "keep.db").write_bytes(b"x")
    removed = _fileio.remove_stale_temps(str(tmp_path))
    assert len(removed) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.db"]


def test_staged_file_errors_name_the_final_path(tmp_path, monkeypatch):
    """Not the temp file: it is removed before anyone reads the message."""
    target = tmp_path / ".env"
    target.write_bytes(b"old")

    def eperm(*args):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", eperm)
    with pytest.raises(RunbookError) as info:
        _fileio.write_file(str(target), b"new", owner=0, group=0)
    assert str(info.value) == "%s: cannot set owner/group/mode: operation not permitted" % target
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [".env"]


def test_staged_file_unknown_owner_names_the_final_path(tmp_path):
    target = tmp_path / "x"
    with pytest.raises(RunbookError) as info:
        _fileio.write_file(str(target), b"x", owner="no-such-user-here")
    assert str(info.value) == "%s: owner 'no-such-user-here': no such user on this host" % target
    assert list(tmp_path.iterdir()) == []


def test_apply_attrs_alone_keeps_its_messages(tmp_path, monkeypatch):
    target = tmp_path / "x"
    target.write_bytes(b"x")
    with pytest.raises(RunbookError, match=r"^owner 'no-such-user-here': no such user"):
        _fileio.apply_attrs(str(target), 0o600, owner="no-such-user-here")

    def eperm(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", eperm)
    with pytest.raises(RunbookError, match=r"^%s: cannot set owner/group/mode: operation not permitted$" % target):
        _fileio.apply_attrs(str(target), 0o600, owner=0)
