# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the backup role runs these engines on hosts that have no Ansible.
"""The one safe-write path for every file this collection writes.

A file is written to a temp name in its destination directory (mode 0600 from the first byte),
fsynced, given its owner/group/mode, renamed over the final name and the directory fsynced.
Nothing half-written ever appears under a final name, and a failure removes the temp file.

Two-phase use (``StagedFile``) lets a caller prepare several files and publish them together,
e.g. a certificate and its key, so readers never see a new certificate with an old key.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import tempfile

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError

# Every temp file we create starts with this, so a later run can find and remove leftovers
# of a run that was killed (kill -9, power loss) without touching anything else.
TEMP_PREFIX = ".runbook-tmp-"

COPY_CHUNK = 1024 * 1024


def describe_oserror(exc: OSError) -> str:
    """A short human cause for an OSError ("no space left on device", "permission denied")."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.strerror:
        return exc.strerror.lower()
    return str(exc)


def resolve_ids(owner: str | int | None, group: str | int | None) -> tuple[int, int]:
    """Turn owner/group names or ids into (uid, gid); -1 means "leave as is"."""
    uid = gid = -1
    if owner not in (None, ""):
        try:
            uid = int(owner) if str(owner).isdigit() else pwd.getpwnam(str(owner)).pw_uid
        except KeyError:
            raise RunbookError("owner %r: no such user on this host" % (owner,)) from None
    if group not in (None, ""):
        try:
            gid = int(group) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid
        except KeyError:
            raise RunbookError("group %r: no such group on this host" % (group,)) from None
    return uid, gid


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_attrs(path: str, mode: int | None = None, owner=None, group=None, fd: int | None = None, *,
                label: str | None = None) -> None:
    """Set owner/group then mode (chown can clear setuid bits, so mode goes last).

    Errors name ``label`` when given: StagedFile passes the final path, because its temp file is
    gone by the time anyone reads the message.
    """
    try:
        uid, gid = resolve_ids(owner, group)
    except RunbookError as err:
        if label is None:
            raise
        raise RunbookError("%s: %s" % (label, err)) from None
    try:
        if uid != -1 or gid != -1:
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.chown(path, uid, gid, follow_symlinks=False)
        if mode is not None:
            if fd is not None:
                os.fchmod(fd, mode)
            else:
                os.chmod(path, mode)
    except OSError as exc:
        raise RunbookError("%s: cannot set owner/group/mode: %s"
                           % (label or path, describe_oserror(exc))) from None


def attrs_differ(path: str, mode: int | None, owner=None, group=None) -> bool:
    """True when ``path`` exists and its mode/owner/group differ from what is asked."""
    st = os.lstat(path)
    uid, gid = resolve_ids(owner, group)
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        return True
    if uid not in (-1, st.st_uid):
        return True
    if gid not in (-1, st.st_gid):
        return True
    return False


class StagedFile:
    """A temp file next to ``path``, written and fsynced, waiting for ``commit()``.

    Use as a context manager: leaving the block without commit() (an error, a check) removes
    the temp file. ``fileobj`` is a binary file object for streaming large content.
    """

    def __init__(self, path: str, mode: int = 0o600, owner=None, group=None):
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.mode = mode
        self.owner = owner
        self.group = group
        self.committed = False
        try:
            fd, self.temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.directory)
        except OSError as exc:
            raise RunbookError("%s: cannot create a temp file in %s: %s"
                               % (self.path, self.directory, describe_oserror(exc))) from None
        # mkstemp already creates 0600; say it anyway so the intent survives a refactor.
        os.fchmod(fd, 0o600)
        self.fileobj = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        try:
            self.fileobj.write(data)
        except OSError as exc:
            self.discard()
            raise RunbookError("%s: write failed: %s" % (self.path, describe_oserror(exc))) from None

    def finish(self) -> None:
        """Flush, fsync and set attributes; the file stays under its temp name."""
        if self.fileobj.closed:
            return
        try:
            self.fileobj.flush()
            os.fsync(self.fileobj.fileno())
            apply_attrs(self.temp_path, self.mode, self.owner, self.group, fd=self.fileobj.fileno(), label=self.path)
        except OSError as exc:
            self.discard()
            raise RunbookError("%s: write failed: %s" % (self.path, describe_oserror(exc))) from None
        except RunbookError:
            self.discard()
            raise
        self.fileobj.close()

    def commit(self, sync_dir: bool = True) -> None:
        """Publish: rename the temp file over the final name and fsync the directory (unless
        ``sync_dir`` is false: commit_together fsyncs once after its last rename)."""
        self.finish()
        try:
            os.replace(self.temp_path, self.path)
            if sync_dir:
                fsync_dir(self.directory)
        except OSError as exc:
            self.discard()
            raise RunbookError("%s: cannot publish: %s" % (self.path, describe_oserror(exc))) from None
        self.committed = True

    def discard(self) -> None:
        if not self.fileobj.closed:
            try:
                self.fileobj.close()
            except OSError:
                pass
        if not self.committed:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.discard()


def write_file(path: str, data: bytes, mode: int = 0o600, owner=None, group=None) -> None:
    """Write ``data`` to ``path`` atomically (temp, fsync, rename)."""
    with StagedFile(path, mode=mode, owner=owner, group=group) as staged:
        staged.write(data)
        staged.commit()


def commit_together(staged_files: list[StagedFile]) -> None:
    """Publish several staged files back to back (all finished and fsynced first).

    Everything that can take time (writes, fsync, chown) is done before the first rename, and
    the directories are fsynced only after the last one, so the window in which a reader (or a
    kill -9) finds a mixed pair is the time between two rename() calls: measured here a median
    0.18 ms, up to 4 ms when rename() waits on the ext4 journal (docs/RELIABILITY.md). A directory
    fsync between them made it longer still on a busy disk.
    """
    for staged in staged_files:
        staged.finish()
    for staged in staged_files:
        staged.commit(sync_dir=False)
    for directory in dict.fromkeys(staged.directory for staged in staged_files):
        try:
            fsync_dir(directory)
        except OSError as exc:
            raise RunbookError("%s: cannot make the new files durable: %s"
                               % (directory, describe_oserror(exc))) from None


def copy_file(src: str, dest: str, mode: int = 0o600, owner=None, group=None) -> None:
    """Stream ``src`` into ``dest`` atomically, in bounded memory."""
    try:
        source = open(src, "rb")
    except OSError as exc:
        raise RunbookError("%s: cannot read: %s" % (src, describe_oserror(exc))) from None
    with source, StagedFile(dest, mode=mode, owner=owner, group=group) as staged:
        while True:
            try:
                chunk = source.read(COPY_CHUNK)
            except OSError as exc:
                raise RunbookError("%s: read failed: %s" % (src, describe_oserror(exc))) from None
            if not chunk:
                break
            staged.write(chunk)
        staged.commit()


def remove_stale_temps(directory: str) -> list[str]:
    """Remove temp files left by an interrupted run; returns their paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(directory, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    _remove_tree(path)
                else:
                    os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def _remove_tree(path: str) -> None:
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            full = os.path.join(root, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)


def make_temp_dir(parent: str) -> str:
    """A private (0700) temp directory under ``parent`` carrying the stale-temp prefix."""
    try:
        return tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    except OSError as exc:
        raise RunbookError("%s: cannot create a temp directory: %s" % (parent, describe_oserror(exc))) from None


def remove_temp_dir(path: str) -> None:
    """Remove a directory made by make_temp_dir, ignoring what is already gone."""
    if os.path.isdir(path):
        _remove_tree(path)
