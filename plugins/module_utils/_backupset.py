# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the backup role runs these engines on hosts that have no Ansible.
"""Backup sets: one verified tar file per run, holding consistent SQLite snapshots and extra files.

A set is ``<prefix>-<YYYYmmddTHHMMSSZ>[-<label>].tar[.gz|.zst][.age]`` plus ``<set>.sha256``
(sha256sum format); ``.age`` marks a set encrypted to age recipients (the whole tar stream, manifest
included, is encrypted; the sidecar holds the sha256 of the encrypted file). The archive starts
with ``manifest.json`` (members, sizes, per-database pragmas), then ``databases/<member>`` and
``files/<relative path>``, and ends with ``SHA256SUMS`` (each file member's sha256, computed while
the set is written, so the hashes, the check and the write run side by side). Format 1 sets kept
the sha256s in the manifest and had no SHA256SUMS; they are still read. See docs/backup-sets.md.

Used by the sqlite_backup / sqlite_restore modules and, on hosts, by ``cli()`` from a systemd timer.
"""

from __future__ import annotations

import calendar
import datetime
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time
import typing
import zlib

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError
from ansible_collections.runbook.sqlite_app.plugins.module_utils._fileio import (
    StagedFile,
    apply_attrs,
    describe_oserror,
    fsync_dir,
    make_temp_dir,
    remove_stale_temps,
    remove_temp_dir,
)
from ansible_collections.runbook.sqlite_app.plugins.module_utils._metrics import write_textfile
from ansible_collections.runbook.sqlite_app.plugins.module_utils._sqlite import (
    connect,
    db_stats,
    _uri_path,
    describe_sqlite_error,
    map_private_copy,
    require_database,
    run_check,
    sidecar_paths,
    table_row_counts,
)

FORMAT_VERSION = 3
# format 1: member sha256s in the manifest, no SHA256SUMS member; format 2: SHA256SUMS without the
# manifest's own line (sets of development builds before format 3)
READ_FORMATS = (1, 2, 3)
MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"  # the last member from format 2 on (sha256sum format)
LOCK_NAME = ".runbook-backup.lock"
COMPRESSIONS = ("none", "gzip", "zstd")
EXTENSIONS = {"none": ".tar", "gzip": ".tar.gz", "zstd": ".tar.zst"}
AGE_SUFFIX = ".age"
AGE_MAGIC = b"age-encryption.org/"
AGE_ARMOR_MAGIC = b"-----BEGIN AGE ENC"
CHUNK = 1024 * 1024
ALIGN = 4096  # where the data of a large member starts in a set: a multiple of the file-system block
FLUSH_EVERY = 32 * 1024 * 1024  # write-back step while a set (or a restored file) is written
FLUSH_POLL = 0.02  # seconds between looks at the file's size
PIPE_SIZE = 1024 * 1024  # see _widen_pipe
# default level per compression (compression_level overrides): zstd -1 measured about twice as fast
# as -3 with sets of about the same size (docs/backup-sets.md); gzip's own default
DEFAULT_LEVELS = {"gzip": 6, "zstd": 1}
LEVEL_RANGES = {"gzip": (1, 9), "zstd": (1, 19)}
EX_TEMPFAIL = 75

_TS_FORMAT = "%Y%m%dT%H%M%SZ"
_SET_NAME = re.compile(r"^(?P<prefix>.+?)-(?P<ts>\d{8}T\d{6}Z)(?:-(?P<label>[A-Za-z0-9._-]+?))?"
                       r"(?P<ext>\.tar|\.tar\.gz|\.tar\.zst)(?P<age>\.age)?$")
_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_CHECKSUM_LINE = re.compile(r"^(\\?)([0-9a-f]{64})  (.+)$")

BACKUP_DEFAULTS = {
    "databases": None, "extra_paths": None, "root": None, "dest": None, "name_prefix": "backup",
    "label": None, "compression": "zstd", "compression_level": None, "compression_threads": None,
    "check": "quick_check", "busy_timeout": 5000,
    "mode": "0600", "owner": None, "group": None, "state": "present", "keep_last": None,
    "keep_days": None, "keep_daily": None, "keep_weekly": None, "keep_monthly": None,
    "lock_timeout": 600, "metrics_file": None, "encrypt_recipients": None,
}
RESTORE_DEFAULTS = {
    "src": None, "set": "latest", "before": None, "label": None, "name_prefix": None, "databases": None,
    "extra_paths": True, "dest_root": None, "mode": "restore", "drill_dir": None, "force": False,
    "if_missing": False, "check": "quick_check", "safety_copy": True, "owner": None, "group": None,
    "busy_timeout": 5000, "lock_timeout": 600, "identity_file": None, "force_running": False,
}
RETENTION_KEYS = ("keep_last", "keep_days", "keep_daily", "keep_weekly", "keep_monthly")


class LockTimeout(RunbookError):
    """The per-dest lock was held by another run past lock_timeout (cli exits 75)."""


# ---------------------------------------------------------------------------------------------
# small helpers


_INT_OPTIONS = ("busy_timeout", "lock_timeout", "compression_level", "compression_threads") + RETENTION_KEYS
_BOOL_OPTIONS = ("extra_paths", "force", "if_missing", "safety_copy", "force_running")
_LIST_OPTIONS = ("databases",)
_AGE_RECIPIENT = re.compile(r"^(age1[02-9ac-hj-np-z]{58}|ssh-(ed25519|rsa) [A-Za-z0-9+/=]+( [^\n\r]*)?)$")


def _options(given: dict, defaults: dict) -> dict:
    """Defaults plus the given options (None means default), typed as the module would type them:
    the cli reads plain JSON that a template may have filled with "5000" or "true"."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise RunbookError("unknown option(s): %s" % ", ".join(unknown))
    opts = dict(defaults)
    opts.update({key: value for key, value in given.items() if value is not None})
    for key in _INT_OPTIONS:
        value = opts.get(key)
        if isinstance(value, str):
            try:
                opts[key] = int(value.strip())
            except ValueError:
                raise RunbookError("%s=%r: must be a whole number" % (key, value)) from None
        elif isinstance(value, float) and value.is_integer():
            opts[key] = int(value)
    restore_opts = defaults is RESTORE_DEFAULTS
    for key in _BOOL_OPTIONS if restore_opts else ():
        value = opts.get(key)
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise RunbookError("%s=%r: must be true or false" % (key, value))
            opts[key] = lowered in ("true", "yes", "1")
    for key in _LIST_OPTIONS if restore_opts else _LIST_OPTIONS + ("extra_paths", "encrypt_recipients"):
        if isinstance(opts.get(key), str):
            opts[key] = [opts[key]]
    return opts


def _parse_mode(value) -> int:
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 8)
    except ValueError:
        raise RunbookError("mode %r: not an octal file mode such as '0600'" % (value,)) from None


def _check_compression(compression: str) -> None:
    if compression not in COMPRESSIONS:
        raise RunbookError("compression %r: unknown (expected one of %s)" % (compression, ", ".join(COMPRESSIONS)))
    if compression == "zstd" and shutil.which("zstd") is None:
        raise RunbookError("compression zstd: the zstd binary is not installed on this host "
                           "(install the zstd package or use compression=gzip)")


def _resolve_level(opts: dict) -> None:
    """Fill in compression_level and compression_threads for opts["compression"], or refuse a
    value that the compression cannot use (rather than silently ignore it)."""
    compression, level, threads = opts["compression"], opts["compression_level"], opts["compression_threads"]
    if compression == "none":
        if level is not None:
            raise RunbookError("compression_level=%s: compression none has no level "
                               "(use gzip or zstd, or leave compression_level unset)" % level)
    else:
        low, high = LEVEL_RANGES[compression]
        if level is None:
            level = DEFAULT_LEVELS[compression]
        elif isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
            raise RunbookError("compression_level=%r: %s takes a level from %d to %d" % (level, compression, low, high))
    if threads is None:
        threads = 1
    elif compression != "zstd" and threads != 1:
        raise RunbookError("compression_threads=%s: only zstd compresses in threads (compression is %s)"
                           % (threads, compression))
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise RunbookError("compression_threads=%r: expected 0 (one per core) or a positive number" % (threads,))
    opts["compression_level"], opts["compression_threads"] = level, threads


def _check_kind(kind: str) -> None:
    if kind not in ("quick_check", "integrity_check"):
        raise RunbookError("check %r: unknown (expected quick_check or integrity_check)" % (kind,))


def _require_age(what: str) -> str:
    found = shutil.which("age")
    if found is None:
        raise RunbookError("%s: the age binary is not installed on this host "
                           "(install the age package, https://age-encryption.org)" % what)
    return found


def _check_recipients(recipients) -> list:
    """Validated age recipients (X25519 ``age1...`` keys or ssh-ed25519/ssh-rsa public keys)."""
    if not recipients:
        return []
    if not isinstance(recipients, (list, tuple)):
        raise RunbookError("encrypt_recipients: expected a list of age public keys")
    clean = []
    for item in recipients:
        text = item.strip() if isinstance(item, str) else item
        if not isinstance(text, str) or not _AGE_RECIPIENT.match(text):
            shown = str(item)
            shown = shown[:12] + "..." if len(shown) > 12 else shown
            raise RunbookError("encrypt_recipients: %r is not an age public key (age1...) or an ssh-ed25519/"
                               "ssh-rsa public key; give public keys, never an identity (AGE-SECRET-KEY-...)"
                               % (shown,))
        clean.append(text)
    _require_age("encrypt_recipients")
    return clean


def sanitize_label(label) -> str:
    return _LABEL_CHARS.sub("-", str(label)).strip("-.") if label else ""


def set_name(prefix: str, when: datetime.datetime, label, compression: str, encrypted: bool = False) -> str:
    name = "%s-%s" % (prefix, when.strftime(_TS_FORMAT))
    clean = sanitize_label(label)
    if clean:
        name += "-" + clean
    return name + EXTENSIONS[compression] + (AGE_SUFFIX if encrypted else "")


def parse_set_name(name: str):
    """(prefix, timestamp as UTC epoch, label) for a set file name, or None."""
    match = _SET_NAME.match(name)
    if not match:
        return None
    ts = match.group("ts")  # YYYYmmddTHHMMSSZ; by hand: strptime costs ~30 us a name (10,000 sets: 0.3 s)
    fields = (int(ts[0:4]), int(ts[4:6]), int(ts[6:8]), int(ts[9:11]), int(ts[11:13]), int(ts[13:15]))
    if not (1 <= fields[1] <= 12 and 1 <= fields[2] <= 31 and fields[3] <= 23 and fields[4] <= 59
            and fields[5] <= 61):
        return None  # the ranges strptime accepts
    return match.group("prefix"), calendar.timegm(fields), match.group("label") or ""


def list_sets(directory: str, prefix: str | None = None) -> list[dict]:
    """Sets in ``directory`` (optionally one prefix), newest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise RunbookError("%s: cannot list: %s" % (directory, describe_oserror(exc))) from None
    present = set(names)
    sets = []
    for name in names:
        parsed = parse_set_name(name)
        if not parsed or (prefix is not None and parsed[0] != prefix):
            continue
        sets.append({"name": name, "prefix": parsed[0], "time": parsed[1], "label": parsed[2],
                     "verified": name + ".sha256" in present, "encrypted": name.endswith(AGE_SUFFIX)})
    sets.sort(key=lambda item: (item["time"], item["name"]), reverse=True)
    return sets


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
    except OSError as exc:
        raise RunbookError("%s: cannot read: %s" % (path, describe_oserror(exc))) from None
    return digest.hexdigest()


def _utc(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# lock


class DestLock:
    """fcntl.flock on ``dest/.runbook-backup.lock``: a timer run and an AWX job never overlap."""

    def __init__(self, directory: str, timeout: float, shared: bool = False):
        self.path = os.path.join(directory, LOCK_NAME)
        self.timeout = timeout
        self.shared = shared
        self.fd = None

    def __enter__(self):
        try:
            if self.shared:  # readers (restore, drill) never create the file: src may be read-only
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            if self.shared:
                return self
            raise RunbookError("%s: cannot open the lock file: directory is missing" % self.path) from None
        except OSError as exc:
            raise RunbookError("%s: cannot open the lock file: %s" % (self.path, describe_oserror(exc))) from None
        deadline = time.monotonic() + max(0.0, float(self.timeout))
        while True:
            try:
                fcntl.flock(self.fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                return self
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(self.fd)
                    raise RunbookError("%s: cannot lock: %s" % (self.path, describe_oserror(exc))) from None
            if time.monotonic() >= deadline:
                os.close(self.fd)
                self.fd = None
                raise LockTimeout("%s: another backup or prune run holds the lock; gave up after lock_timeout=%ss"
                                  % (self.path, self.timeout))
            time.sleep(0.2)

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


# ---------------------------------------------------------------------------------------------
# snapshot


def snapshot_database(path: str, target: str, busy_timeout: int, check: str) -> dict:
    """Consistent online copy of ``path`` into ``target`` with the one-step backup API.

    A read transaction is opened first (waiting at most busy_timeout for a writer's lock), then
    the whole database is copied in one backup step inside that transaction: the copy is the
    snapshot as of BEGIN, and foreign writes cannot restart it (step-by-step backups restart on
    every write and never finish under load). The snapshot's check then starts in a thread, so
    it runs while the caller archives (and hashes) the same file: SQLite and hashlib both release
    the GIL. Returns the manifest's database entry and ``size``; its ``check`` is still running (a
    _Background whose result() is the check entry or raises), and the caller must call
    ``info["check"].result()`` before publishing anything.
    """
    require_database(path)
    src = connect(path, busy_timeout_ms=busy_timeout, readonly=True)
    try:
        try:
            source_mode = str(src.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            src.execute("BEGIN")
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise RunbookError(describe_sqlite_error(path, exc, busy_timeout)) from None
        try:
            dst = sqlite3.connect(target, isolation_level=None)
            # a scratch file in our private work dir: no journal, no fsync (the set is fsynced
            # once it is written), so the copy costs one pass through the page cache
            dst.execute("PRAGMA journal_mode = OFF")
            dst.execute("PRAGMA synchronous = OFF")
        except sqlite3.Error as exc:
            raise RunbookError("%s: cannot create snapshot file: %s" % (target, exc)) from None
        try:
            src.backup(dst, pages=-1)
        except sqlite3.Error as exc:
            text = str(exc)
            if "full" in text or "disk" in text:
                raise RunbookError("%s: snapshot to %s failed: no space left on device (%s)"
                                   % (path, os.path.dirname(target), text)) from None
            raise RunbookError(describe_sqlite_error(path, exc, busy_timeout)) from None
        finally:
            dst.close()
        src.execute("COMMIT")
    finally:
        src.close()
    # immutable=1: the snapshot is our private, finished file; SQLite reads it without locks and
    # without creating a -wal/-shm next to it (its header may still say WAL)
    uri = "file:%s?mode=ro&immutable=1" % _uri_path(target)
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        try:
            stats = db_stats(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise RunbookError("%s: snapshot cannot be read back: %s" % (path, exc)) from None
    size = os.path.getsize(target)
    return {"page_count": stats["page_count"], "page_size": stats["page_size"], "journal_mode": source_mode,
            "user_version": stats["user_version"], "size": size,
            "check": _Background(_check_snapshot, path, uri, check)}


def _check_snapshot(path: str, uri: str, check: str) -> dict:
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            ok, errors = run_check(conn, check)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise RunbookError("%s: snapshot cannot be read back: %s" % (path, exc)) from None
    if not ok:
        raise RunbookError("%s: %s of the snapshot failed, set not written: %s" % (path, check, "; ".join(errors)))
    return {"kind": check, "ok": ok, "errors": errors}


class _Background:
    """``func(*args)`` in a thread; ``result()`` joins and returns its value or re-raises."""

    def __init__(self, func, *args):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(func, args), daemon=True)
        self._thread.start()

    def _run(self, func, args):
        try:
            self._value = func(*args)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def result_quietly(self) -> None:
        """Wait for the thread and drop its outcome (we are failing for another reason)."""
        self._thread.join()


class _HashThread:
    """sha256 of a byte stream in a helper thread: the writer hands over each buffer it has just
    written (bytes are immutable, so the buffer is the one written) and goes on writing while the
    other core hashes. At most 4 buffers (4 MiB) are in flight, so memory stays flat."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self._queue = queue.Queue(maxsize=4)
        self._hex = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            data = self._queue.get()
            if data is None:
                return
            self._digest.update(data)

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        if self._hex is None:
            self._queue.put(None)
            self._thread.join()
            self._hex = self._digest.hexdigest()
        return self._hex


def _hash_growing(fd: int, complete: threading.Event, abandoned: threading.Event) -> str | None:
    """sha256 of the file open at ``fd`` while a writer may still be appending to it: reads what
    has reached the file (everything below its size) from the page cache at its own pace, until
    ``complete`` is set and it has read to the end. The writer hands it nothing and never waits
    for it, so the hashing goes on while the writer waits for the disk (a queue of the writer's
    buffers stalls as soon as the writer stops). None once ``abandoned`` is set (the write failed)."""
    digest = hashlib.sha256()
    offset = 0
    while True:
        last = complete.is_set()  # read before the size: the size then includes the last write
        end = os.fstat(fd).st_size
        while offset < end:
            if abandoned.is_set():
                return None
            chunk = os.pread(fd, min(CHUNK, end - offset), offset)
            if not chunk:
                raise OSError(errno.EIO, "the file shrank while it was hashed")
            digest.update(chunk)
            offset += len(chunk)
        if last:
            return digest.hexdigest()
        complete.wait(FLUSH_POLL / 4)


class _TailHash:
    """sha256 of a file this process is appending to (``fd``, opened for reading too), by a
    thread (see _hash_growing). ``finish()`` after the writer's last flush."""

    def __init__(self, fd: int):
        self._done = threading.Event()
        self._abandoned = threading.Event()
        self._work = _Background(_hash_growing, fd, self._done, self._abandoned)

    def finish(self) -> str:
        """The digest of the whole file; raises the OSError that stopped the hashing, if any."""
        self._done.set()
        return self._work.result()

    def abort(self) -> None:
        """Stop the thread (the write failed); its result is dropped."""
        self._abandoned.set()
        self._done.set()
        self._work.result_quietly()


class _FileHashes:
    """sha256 of whole files, one after another, in a helper thread: ``add()`` queues a file and
    returns at once, so the caller's own pass goes on; ``digests()`` waits for them all. The thread
    reads each file from the page cache at its own pace, one file at a time, so memory and open
    files stay bounded however many files a set holds. A file added as ``growing`` (restore adds
    each large file as it starts extracting it) is followed while it is written, until
    ``complete(key)``. ``close()`` on every path: after a failure it stops at once (a failed run
    must not remove a file the thread still reads, nor wait for a whole hash it will drop)."""

    def __init__(self):
        self._queue = queue.Queue()
        self._complete = {}
        self._abandoned = threading.Event()
        self._digests = {}
        self._error = None
        self._thread = None

    def __contains__(self, key: str) -> bool:
        return key in self._complete

    def add(self, key: str, path: str, growing: bool = False) -> None:
        self._complete[key] = complete = threading.Event()
        if not growing:
            complete.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        self._queue.put((key, path, complete))

    def complete(self, key: str) -> None:
        """The growing file ``key`` has all its bytes."""
        self._complete[key].set()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            key, path, complete = item
            if self._error is None and not self._abandoned.is_set():
                try:
                    with open(path, "rb") as handle:
                        self._digests[key] = _hash_growing(handle.fileno(), complete, self._abandoned)
                except OSError as exc:  # handed to the caller by digests()
                    self._error = RunbookError("%s: cannot read: %s" % (path, describe_oserror(exc)))
                except BaseException as exc:  # likewise
                    self._error = exc

    def digests(self) -> dict:
        """{key: sha256} of every file added (every growing one completed); raises the first error."""
        self._join()
        if self._error is not None:
            raise self._error
        return self._digests

    def close(self) -> None:
        self._abandoned.set()
        for complete in self._complete.values():
            complete.set()
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class _Flusher:
    """Writes a growing file back to disk in steps of ``every`` bytes while it is written.

    Without it a 1 GiB set sits in the page cache until the final fsync, which then holds the
    disk (and every other fsync on it, e.g. the application's WAL commits) for seconds. Two ways:

    - ``inline`` (we write the file; for a zstd set, _ZstdOut's relay thread): the writer calls
      ``throttle()`` after each write and fdatasyncs each full step itself, so it pauses while
      the disk takes the step and the disk idles while it prepares the next one. Measured on a
      1 GiB set under a 500 commits/s writer (6 interleaved runs): worst commit 0-50 ms, against
      15-304 ms when a thread wrote back behind an unthrottled producer, for about 10 % more
      time. See docs/BENCHMARKS.md.
    - threaded (a child writes the file: age): a thread fdatasyncs every step it sees;
      ``throttle()`` waits while the file is more than two steps ahead of the disk. Restore's
      extraction uses the thread without ever calling ``throttle()``: the application is stopped,
      so the extraction need not wait for the disk (see scan_set's ``write_back``).

    A failed write-back is raised by the next ``throttle()`` or by ``stop()``: Linux reports a
    write-back error once per open file, so the caller's final fsync on the same fd could succeed.
    """

    def __init__(self, fd: int, every: int | None = None, poll: float | None = None, inline: bool = False):
        self.fd = fd
        self.every = every or FLUSH_EVERY
        self.poll = poll or FLUSH_POLL
        self.inline = inline
        self.flushes = 0
        self._flushed = 0
        self._caught_up = threading.Condition()
        self._stop = threading.Event()
        self._error = None
        self._thread = None
        if not inline:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.wait(self.poll):
            try:
                size = os.fstat(self.fd).st_size
                if size - self._flushed >= self.every:
                    os.fdatasync(self.fd)
                    self.flushes += 1
                    with self._caught_up:
                        self._flushed = size
                        self._caught_up.notify_all()
            except OSError as exc:  # the producer gets it from throttle() or stop()
                self._error = exc
                break
        with self._caught_up:  # never leave a producer waiting on a flusher that has ended
            self._flushed = None
            self._caught_up.notify_all()

    def throttle(self) -> None:
        """Call after each write: keeps the file within a step or two of what is on disk."""
        size = os.fstat(self.fd).st_size
        if self.inline:
            if size - self._flushed >= self.every:
                os.fdatasync(self.fd)  # an error here is the producer's write error
                self.flushes += 1
                self._flushed = size
            return
        with self._caught_up:
            while self._flushed is not None and size - self._flushed > 2 * self.every:
                self._caught_up.wait(1.0)
        self._raise_error()

    def stop(self) -> None:
        """End the thread; raises its write-back error (once) if it had one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error


def _copy_file(src: str, dst: str) -> int:
    """Stage an extra file in the work dir (the archive reads the copy, which nothing else
    changes while it is written); returns its size."""
    size = 0
    try:
        source = open(src, "rb")
    except OSError as exc:
        raise RunbookError("%s: cannot read: %s" % (src, describe_oserror(exc))) from None
    with source:
        try:
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise RunbookError("%s: cannot write: %s" % (dst, describe_oserror(exc))) from None
        with os.fdopen(out, "wb") as target:
            for chunk in iter(lambda: source.read(CHUNK), b""):
                size += len(chunk)
                try:
                    target.write(chunk)
                except OSError as exc:
                    raise RunbookError("%s: copy of %s failed: %s"
                                       % (os.path.dirname(dst), src, describe_oserror(exc))) from None
    return size


def _member_name(path: str, root: str | None) -> str:
    absolute = os.path.abspath(path)
    if root:
        rel = os.path.relpath(absolute, os.path.abspath(root))
        if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
            raise RunbookError("%s: not inside root %s" % (path, root))
        return rel
    return os.path.basename(absolute.rstrip(os.sep))


def _walk_extra(path: str, member: str):
    """Yield (kind, absolute path, member, extra) for an extra path (file, dir tree, symlink)."""
    if os.path.isdir(path):  # a top-level extra path is followed if it is a link

        yield "dir", path, member, None
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, path)
            for name in sorted(dirnames):
                full = os.path.join(dirpath, name)
                sub = os.path.normpath(os.path.join(member, rel_dir, name))
                if os.path.islink(full):
                    yield "symlink", full, sub, os.readlink(full)
                else:
                    yield "dir", full, sub, None
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                sub = os.path.normpath(os.path.join(member, rel_dir, name))
                if os.path.islink(full):
                    yield "symlink", full, sub, os.readlink(full)
                elif os.path.isfile(full):
                    yield "file", full, sub, None
                # sockets, fifos and devices are not backed up
    elif os.path.isfile(path):
        yield "file", path, member, None
    elif not os.path.lexists(path):
        raise RunbookError("%s: extra path does not exist" % path)
    else:
        raise RunbookError("%s: not a regular file or directory" % path)


# ---------------------------------------------------------------------------------------------
# writing a set


def _open_writer(staged, compression: str, *, level: int | None, threads: int, throttle=None,
                 verify: bool = False):
    """(sink with write/close, _ZstdOut or None): the tar stream goes into ``sink``.
    ``level`` and ``threads`` come resolved from _resolve_level; ``throttle`` and ``verify``: see
    _ZstdOut (for the other compressions the caller writes the file and throttles itself)."""
    if compression == "zstd":
        pipeline = _ZstdOut(staged, level, threads, throttle=throttle, verify=verify)
        return pipeline, pipeline
    if compression == "gzip":
        return gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=staged.fileobj), None
    return _NoClose(staged.fileobj), None


class _ZstdOut:
    """``zstd -LEVEL --check`` compressing the tar stream we write into it, and a relay thread
    that takes what zstd emits and, chunk by chunk: writes it into the staged file, hashes it for
    the sidecar, calls ``throttle`` (an inline _Flusher's: the relay waits for each write-back
    step, and zstd and we wait behind it) and, with ``verify``, feeds it to ``zstd -t``.

    ``zstd -t`` decodes every frame and checks it against the content checksum (--check) while
    the set is written, on the other core, instead of reading back and decompressing the whole
    file after its fsync (one pass less; side by side at 1 GiB the time did not measurably change
    on this lab's machine, see bench/NOTES.md). It checks the very buffers written to the file,
    which is what reading them back from the page cache checked.

    A failure on the relay's side (the disk is full, the write-back fails) kills the compressor,
    so our next write into it fails; ``error()`` then names the relay's cause, not the broken pipe.
    """

    def __init__(self, staged, level: int, threads: int, throttle=None, verify: bool = False):
        # --check: a content checksum in every frame, which zstd -t verifies
        command = ["zstd", "-q", "-%d" % level, "--check", "-c"]
        if threads != 1:
            command.append("-T%d" % threads)
        self.staged = staged
        self.throttle = throttle
        self.digest = hashlib.sha256()
        self.failure = None  # the relay's exception
        self.checker = None
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            _widen_pipe(self.proc.stdin)
            _widen_pipe(self.proc.stdout)
            if verify:
                self.checker = subprocess.Popen(["zstd", "-q", "-t"], stdin=subprocess.PIPE,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _widen_pipe(self.checker.stdin)
        except BaseException:
            self._kill(self.proc)
            raise
        self.write = self.proc.stdin.write
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        checking = self.checker is not None
        try:
            while True:
                data = self.proc.stdout.read(CHUNK)
                if not data:
                    break
                self.staged.fileobj.write(data)
                self.digest.update(data)
                if checking:
                    try:
                        self.checker.stdin.write(data)
                    except BrokenPipeError:  # zstd -t gave up early: it says why when finish() waits
                        checking = False
                if self.throttle is not None:
                    self.throttle()
        except BaseException as exc:  # handed to the producer (error(), finish())
            self.failure = exc
            # the producer's next write into zstd fails instead of blocking; its stdin is the
            # producer's to close (closing it here would wait for the producer's blocked write)
            try:
                self.proc.kill()
            except OSError:
                pass
        finally:
            if self.checker is not None:
                try:
                    self.checker.stdin.close()
                except OSError:  # the pipe broke: already reported by zstd -t's exit status
                    pass

    def error(self) -> str:
        """Why writing failed, as far as the relay or zstd know ("" when they do not)."""
        self._thread.join()
        if self.failure is not None:
            return describe_oserror(self.failure) if isinstance(self.failure, OSError) else str(self.failure)
        return _zstd_error(self.proc)

    def close(self) -> None:
        """End of the tar stream (a broken pipe here is handled like one in write())."""
        self.proc.stdin.close()

    def finish(self, shown: str) -> str:
        """Wait for zstd, the relay and zstd -t; raise what failed; return the sidecar digest."""
        self._thread.join()
        if self.failure is not None:
            if isinstance(self.failure, OSError):
                raise RunbookError("%s: writing the set failed: %s" % (shown, describe_oserror(self.failure)))
            raise self.failure
        if self.proc.wait() != 0:
            raise RunbookError("%s: zstd failed: %s" % (shown, _zstd_error(self.proc) or "exit %d"
                                                        % self.proc.returncode))
        if self.checker is not None and self.checker.wait() != 0:
            text = self.checker.stderr.read().decode("utf-8", "replace").strip()
            raise RunbookError("%s: verification of the written set failed, not published: zstd -t: %s"
                               % (shown, text.splitlines()[-1] if text else "exit %d" % self.checker.returncode))
        return self.digest.hexdigest()

    def abort(self) -> None:
        """Stop both children and the relay (the run is failing)."""
        self._kill(self.proc)
        self._thread.join()
        if self.checker is not None:
            self._kill(self.checker)

    @staticmethod
    def _kill(proc) -> None:
        try:
            proc.stdin.close()
        except OSError:  # a broken pipe while flushing: the fd is closed all the same
            pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# Linux's F_SETPIPE_SZ (Python >= 3.10 names it; the target may run 3.9)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)


def _widen_pipe(pipe) -> None:
    """Give a pipe to or from a zstd/age child a 1 MiB buffer instead of Linux's 64 KiB: with
    the small one the child and we take turns 16 times per MiB, and on a busy two-core host each
    turn waits for a core. Side by side, verifying a 1 GiB zstd set took 1.7 s instead of 2.6 s.
    1 MiB is Linux's default /proc/sys/fs/pipe-max-size; where it cannot be had, nothing changes."""
    if _F_SETPIPE_SZ is None:
        return
    try:
        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # a lower pipe-max-size for an unprivileged user: the default buffer still works
        pass


class _NoClose:
    """The staged file as a tar sink: closing the sink must not close the staged file."""

    def __init__(self, fileobj):
        self.write = fileobj.write

    def close(self) -> None:
        pass


def _tarinfo(name: str, kind: str, *, size: int = 0, mode: int = 0o600, mtime: float | None = None,
             target: str | None = None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = int(mtime if mtime is not None else time.time())
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if kind == "dir":
        info.type = tarfile.DIRTYPE
    elif kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = target
    else:
        info.size = size
    return info


def _tar_header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _aligned_header(info: tarfile.TarInfo, at: int) -> bytes:
    """The header of a file member that starts at offset ``at`` of the archive, grown by a PAX
    ``comment`` record (which tar readers ignore) until the member's data starts on an ALIGN
    boundary. A restore copies such data with copy_file_range: on XFS or btrfs the kernel then
    shares the blocks with the set instead of copying them (docs/backup-sets.md); ext4 copies
    either way. Each step adds one 512-byte block, so eight steps reach any offset."""
    header = _tar_header(info)
    fill = 0
    while (at + len(header)) % ALIGN and fill <= ALIGN + tarfile.BLOCKSIZE:
        info.pax_headers = dict(info.pax_headers, comment="." * (fill + 1))
        header = _tar_header(info)
        fill += tarfile.BLOCKSIZE
    return header


def _checksum_line(digest: str, name: str) -> str:
    """One line of sha256sum's format; a name with a backslash or newline is escaped as sha256sum
    escapes it (the line then starts with a backslash)."""
    if "\\" in name or "\n" in name:
        return "\\%s  %s\n" % (digest, name.replace("\\", "\\\\").replace("\n", "\\n"))
    return "%s  %s\n" % (digest, name)


def _parse_checksums(path: str, data: bytes) -> dict:
    """{member: sha256} from a set's SHA256SUMS member (the reverse of _checksum_line)."""
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        lines = [None]
    if lines[-1] == "":
        lines.pop()
    sums = {}
    for line in lines:
        match = _CHECKSUM_LINE.match(line or "")
        if not match:
            raise RunbookError("%s: damaged set: %s is not in sha256sum format" % (path, CHECKSUMS))
        escaped, digest, name = match.groups()
        if escaped:
            name = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), name)
        if name in sums:
            raise RunbookError("%s: damaged set: %s lists %s twice" % (path, CHECKSUMS, name))
        sums[name] = digest
    return sums


def _tar_stream(put, manifest_bytes: bytes, entries: list[dict], workdir: str) -> None:
    """The set's tar stream, block for block what tarfile writes (PAX headers, 512-byte padding,
    two zero blocks, padded to a 10240-byte record), passed to ``put`` in chunks of at most CHUNK.

    Every file member's sha256 (``entry["sha256"]``) is written after the members, as the last
    member, SHA256SUMS. A large one is computed by a thread reading its staged file from the start,
    at its own pace, while the archive is written: it needs nothing from this stream, so it never
    waits for the stream's write-back steps (nor the stream for it); a small one from the buffers."""
    hashing = _FileHashes()
    for entry in entries:
        if entry["type"] in ("database", "file") and entry["size"] > 4 * CHUNK:
            hashing.add(entry["member"], os.path.join(workdir, entry["staged"]))
    try:
        _emit_members(put, manifest_bytes, entries, workdir, hashing)
    finally:
        hashing.close()


def _emit_members(put, manifest_bytes: bytes, entries: list[dict], workdir: str, hashing: _FileHashes) -> None:
    """_tar_stream's blocks; the members added to ``hashing`` are hashed there."""
    written = 0

    def emit(data):
        nonlocal written
        put(data)
        written += len(data)

    def pad(size):
        if size % tarfile.BLOCKSIZE:
            emit(tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE))

    def add_file(name, data, mode=0o600, mtime=None):
        emit(_tar_header(_tarinfo(name, "file", size=len(data), mode=mode, mtime=mtime)))
        emit(data)
        pad(len(data))

    add_file(MANIFEST, manifest_bytes)
    for entry in entries:
        if entry["type"] in ("database", "file"):
            info = _tarinfo(entry["member"], "file", size=entry["size"], mode=entry.get("mode", 0o600),
                            mtime=entry.get("mtime"))
            emit(_aligned_header(info, written) if entry["size"] > 4 * CHUNK else _tar_header(info))
            staged = os.path.join(workdir, entry["staged"])
            size = 0
            digest = None if entry["member"] in hashing else hashlib.sha256()
            with open(staged, "rb") as handle:
                while True:
                    chunk = handle.read(CHUNK)
                    if not chunk:
                        break
                    size += len(chunk)
                    if digest is not None:
                        digest.update(chunk)
                    emit(chunk)
            if size != entry["size"]:  # our private copy: only a bug or a failing disk gets here
                raise RunbookError("%s: staged copy of %s changed size while archiving (%d, expected %d)"
                                   % (staged, entry["path"], size, entry["size"]))
            pad(size)
            if digest is not None:
                entry["sha256"] = digest.hexdigest()
        elif entry["type"] == "dir":
            emit(_tar_header(_tarinfo(entry["member"], "dir", mode=entry.get("mode", 0o700),
                                      mtime=entry.get("mtime"))))
        else:
            emit(_tar_header(_tarinfo(entry["member"], "symlink", target=entry["target"], mode=0o777)))
    digests = hashing.digests()
    for entry in entries:
        if entry["member"] in digests:
            entry["sha256"] = digests[entry["member"]]
    lines = [_checksum_line(hashlib.sha256(manifest_bytes).hexdigest(), MANIFEST)]
    lines += [_checksum_line(entry["sha256"], entry["member"])
              for entry in entries if entry["type"] in ("database", "file")]
    add_file(CHECKSUMS, "".join(lines).encode("utf-8"))
    emit(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
    if written % tarfile.RECORDSIZE:
        emit(tarfile.NUL * (tarfile.RECORDSIZE - written % tarfile.RECORDSIZE))


def _write_archive(staged, opts: dict, manifest_bytes: bytes, entries: list[dict],
                   workdir: str, *, throttle=None, verify: bool = False, sidecar: bool = True) -> str | None:
    """Write the set into ``staged``. For ``none`` and ``zstd`` returns the sha256 of exactly the
    bytes written (the sidecar digest: for ``none`` read back from the page cache by a _TailHash
    while the set is written, for ``zstd`` hashed by the relay from the buffers it writes); for
    ``gzip``, and for ``none`` without ``sidecar``, None. ``throttle`` (an inline _Flusher's) is
    called after each write into the file to keep pace with the disk. ``verify``: zstd -t the zstd
    output while it is written (_ZstdOut)."""
    compression = opts["compression"]
    sink, pipeline = _open_writer(staged, compression, level=opts["compression_level"],
                                  threads=opts["compression_threads"], throttle=throttle, verify=verify)
    digest = _TailHash(staged.fileobj.fileno()) if compression == "none" and sidecar else None
    paced = throttle if pipeline is None else None  # zstd's relay thread writes the file and paces it

    def put(data):
        sink.write(data)
        if paced is not None:
            paced()

    try:
        _tar_stream(put, manifest_bytes, entries, workdir)
        sink.close()
        if digest is not None:
            staged.fileobj.flush()  # the tail hash reads what reached the file
    except OSError as exc:
        if digest is not None:
            digest.abort()
        cause = describe_oserror(exc)
        if pipeline is not None:
            pipeline.abort()
            cause = pipeline.error() or cause
        raise RunbookError("%s: writing the set failed: %s" % (staged.path, cause)) from None
    except BaseException:
        if digest is not None:
            digest.abort()
        if pipeline is not None:
            pipeline.abort()
        raise
    if pipeline is not None:
        try:
            return pipeline.finish(staged.path)
        except BaseException:
            pipeline.abort()
            raise
    if digest is None:
        return None
    try:
        return digest.finish()
    except OSError as exc:
        raise RunbookError("%s: reading the set back for its sha256 failed: %s"
                           % (staged.path, describe_oserror(exc))) from None


def _zstd_error(proc) -> str:
    try:
        text = proc.stderr.read().decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return ""
    if "No space left" in text:
        return "no space left on device"
    return text.splitlines()[-1] if text else ""


def is_encrypted(path: str) -> bool:
    """True when the file at ``path`` is an age-encrypted stream (binary or armored)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(32)
    except OSError:
        return False
    return head.startswith(AGE_MAGIC) or head.startswith(AGE_ARMOR_MAGIC)


def _check_identity(identity) -> str:
    if not identity:
        raise RunbookError("identity_file is required to read an encrypted set")
    path = os.path.abspath(str(identity))
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise RunbookError("identity_file %s: cannot read: %s" % (path, describe_oserror(exc))) from None
    return path


def _age_message(proc) -> str:
    try:
        text = proc.stderr.read().decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        text = ""
    lines = [line for line in text.splitlines() if "error" in line] or text.splitlines()
    first = lines[0] if lines else "exit %s" % proc.returncode
    first = first.replace("age: error: ", "").strip()
    if "no space left" in first:
        return "no space left on device"
    return first


class _ForwardReader:
    """A pipe as the seekable file that tarfile's random-access mode (``r:``) reads.

    tarfile only moves forward through an archive, except that before each header it re-reads the
    byte just before it; so reads pass straight through, the last block read is kept for that step
    back, and forward seeks skip. Its stream mode (``r|``) would re-buffer every MiB of a member
    several times over, which made restoring a zstd set about half again slower than a plain one.
    """

    def __init__(self, raw):
        self.raw = raw
        self.pos = 0
        self.tail = b""  # the last bytes before pos
        self.replay = b""  # bytes after pos that were read before a step back

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError(errno.ESPIPE, "only absolute seeks on a stream")
        if pos < self.pos:
            back = self.pos - pos
            if back > len(self.tail):
                raise OSError(errno.ESPIPE, "cannot seek back %d bytes in a stream" % back)
            self.replay = self.tail[-back:] + self.replay
            self.tail = self.tail[:-back]
            self.pos = pos
        while self.pos < pos:
            if not self.read(min(pos - self.pos, CHUNK)):
                break
        return self.pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            data = self.replay + self.raw.read()
            self.replay = b""
        elif self.replay:
            data, self.replay = self.replay[:size], self.replay[size:]
            if len(data) < size:
                data += self.raw.read(size - len(data))
        else:
            data = self.raw.read(size)
        self.pos += len(data)
        self.tail = data[-tarfile.BLOCKSIZE:] if len(data) >= tarfile.BLOCKSIZE \
            else (self.tail + data)[-tarfile.BLOCKSIZE:]
        return data


class _Reader:
    """A decompressed stream of a set file, whatever its compression (sniffed from magic bytes).

    An age-encrypted set is decrypted by ``age -d -i IDENTITY`` first; its compression then comes
    from the file name (``.tar.zst.age``) or, for gzip and plain tar, from the decrypted stream.
    """

    def __init__(self, path: str, identity: str | None = None):
        self.path = path
        self.proc = None
        self.age = None
        self.identity = None
        try:
            self.raw = open(path, "rb")
        except OSError as exc:
            raise RunbookError("%s: cannot read: %s" % (path, describe_oserror(exc))) from None
        head = os.pread(self.raw.fileno(), 32, 0)
        magic = head[:4]  # pread leaves the fd offset at 0 for a zstd/age child
        if head.startswith(AGE_MAGIC) or head.startswith(AGE_ARMOR_MAGIC):
            self._open_encrypted(identity)
        elif magic[:2] == b"\x1f\x8b":
            self.compression = "gzip"
            self.tar = tarfile.open(fileobj=self.raw, mode="r|gz", bufsize=CHUNK)
        elif magic == b"\x28\xb5\x2f\xfd":
            self.compression = "zstd"
            self._decompress_zstd(self.raw)
        else:
            self.compression = "none"
            try:
                # seekable: tarfile reads member data straight from the file, no stream re-buffering
                self.tar = tarfile.open(fileobj=self.raw, mode="r:")
            except tarfile.TarError as exc:
                self.close()
                raise RunbookError("%s: not a backup set (%s)" % (path, exc)) from None

    def _open_encrypted(self, identity) -> None:
        if not identity:
            self.raw.close()
            raise RunbookError("%s: the set is encrypted with age; give identity_file (an age identity "
                               "matching one of its recipients) to verify or restore it" % self.path)
        try:
            self.identity = _check_identity(identity)
            age = _require_age("%s: encrypted set" % self.path)
        except RunbookError:
            self.raw.close()
            raise
        self.compression = "age"
        self.age = subprocess.Popen([age, "-d", "-i", self.identity], stdin=self.raw, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        _widen_pipe(self.age.stdout)
        try:
            if ".tar.zst" in os.path.basename(self.path):
                self._decompress_zstd(self.age.stdout)
            else:
                self.tar = tarfile.open(fileobj=self.age.stdout, mode="r|*", bufsize=CHUNK)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            failure = self.decrypt_error()
            self.close()
            raise RunbookError(failure or "%s: not a backup set (%s)" % (self.path, exc)) from None
        except RunbookError:
            self.close()
            raise

    def _decompress_zstd(self, source) -> None:
        """The tar stream out of a ``zstd -d`` child reading ``source`` (the set file, or age's output)."""
        _check_compression("zstd")
        self.proc = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=source, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        _widen_pipe(self.proc.stdout)
        self.tar = tarfile.open(fileobj=_ForwardReader(self.proc.stdout), mode="r:")

    def decrypt_error(self, timeout: float = 2.0) -> str | None:
        """The age failure as a message, when age has exited with an error (None otherwise)."""
        if self.age is None:
            return None
        try:
            self.age.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.age.returncode == 0:
            return None
        cause = _age_message(self.age)
        hint = " (wrong identity_file?)" if "no identity matched" in cause else ""
        return "%s: cannot decrypt the set with identity_file %s: %s%s" % (self.path, self.identity, cause, hint)

    def finish_encrypted(self) -> None:
        """After a complete read: drain age's output and require a clean exit (last chunk authenticated)."""
        if self.age is None:
            return
        if self.proc is None:
            while self.age.stdout.read(CHUNK):
                pass
        failure = self.decrypt_error(timeout=60.0)
        if failure:
            raise RunbookError(failure)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdout.close()
            self.proc.kill()
            self.proc.wait()
            self.proc.stderr.close()
        if self.age is not None:
            self.age.stdout.close()
            self.age.kill()
            self.age.wait()
            self.age.stderr.close()
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _safe_member(info: tarfile.TarInfo, path: str) -> None:
    """Refuse absolute names, '..', links escaping the archive root, devices and fifos."""
    name = info.name
    parts = name.split("/")
    if name.startswith("/") or ".." in parts or "\x00" in name or name in ("", "."):
        raise RunbookError("%s: unsafe archive member %r (absolute path or '..')" % (path, name))
    if info.isdev() or info.isfifo() or not (info.isfile() or info.isdir() or info.issym() or info.islnk()):
        raise RunbookError("%s: unsafe archive member %r (device, fifo or unknown type)" % (path, name))
    if info.islnk():
        raise RunbookError("%s: unsafe archive member %r (hard link)" % (path, name))
    if info.issym():
        target = info.linkname
        joined = os.path.normpath(os.path.join(os.path.dirname(name), target))
        if target.startswith("/") or joined.startswith("..") or joined == "." or len(parts) < 3:
            raise RunbookError("%s: unsafe archive member %r (link to %r points outside its directory)"
                               % (path, name, target))
        top = "/".join(parts[:2])
        if not (joined + "/").startswith(top + "/"):
            raise RunbookError("%s: unsafe archive member %r (link to %r points outside its directory)"
                               % (path, name, target))


class Extraction(typing.NamedTuple):
    """Where scan_set writes one member: ``file`` (a new temp file) and ``shown``, the path an
    error names (the file a restore will put in place, or a drill's directory)."""

    file: str
    shown: str


def scan_set(path: str, extract_to: dict | None = None, identity: str | None = None, *, on_manifest=None,
             write_back: _WriteBack | None = None, then=None) -> dict:
    """Read a set once: check every member header, hash every file member (and from format 3 on the
    manifest) and compare it with the set's checksums (SHA256SUMS, its last member; in a format 1
    set, the manifest).

    With ``extract_to`` ({member: Extraction(file, shown)}) the named regular members are written
    to those files (new temp files); an error while writing one names ``shown``, the path it is
    meant for (a restored file's final path), not the temp file. ``on_manifest(manifest)``, called
    as soon as the manifest (the first member) is read, may return such a mapping instead: restore
    plans its targets from the manifest and extracts in the same pass. A large extracted file is
    written as fast as the page cache takes it (from an uncompressed set, copied in the kernel) and
    hashed from the file by a helper thread: a copied one while it is copied, a decompressed one
    once it is complete (see _scan_members); ``then()``, if given, runs as soon as every member is
    read, while those hashes may still be computed (restore and drill pass their SQLite check of
    the extracted copies, which so need not wait for the hashes). A member that does not match its
    sha256 is reported before a failure of ``then()``. Extracted files are only candidates until
    the scan returns; the caller owns them. ``identity`` is the age identity file for an encrypted
    set. Returns the manifest, with each file member's sha256 in it.

    Extracted files are scratch copies (a drill's) unless ``write_back`` (a _WriteBack) is given:
    then a large one is written back to disk by a thread while it is extracted, and every
    complete one is handed to ``write_back`` for its fsync, which goes on while the scan continues
    and the caller checks the copies. The caller must call ``write_back.wait()`` before it relies
    on any of them.
    """
    pending = _FileHashes()  # the large extracted files
    failure = None
    try:
        manifest, digests, sums = _read_members(path, identity, extract_to=extract_to, on_manifest=on_manifest,
                                                write_back=write_back, pending=pending)
        if then is not None:
            try:
                then()
            except RunbookError as exc:  # reported after the checksums: a damaged member explains it
                failure = exc
        digests.update(pending.digests())
    finally:
        pending.close()
    _compare_checksums(path, manifest, digests, sums)
    if failure is not None:
        raise failure
    return manifest


def _read_members(path: str, identity: str | None, *, extract_to: dict | None, on_manifest,
                  write_back: _WriteBack | None, pending: _FileHashes):
    """scan_set's pass over the archive: (manifest, {member: sha256}, SHA256SUMS as a dict or None)."""
    try:
        with _Reader(path, identity) as reader:
            try:
                found = _scan_members(reader, path, extract_to=extract_to, on_manifest=on_manifest,
                                      write_back=write_back, pending=pending)
                if reader.proc is not None:
                    reader.proc.stdout.read()
                    if reader.proc.wait() != 0:
                        failure = reader.decrypt_error()
                        if failure:
                            raise RunbookError(failure)
                        raise RunbookError("%s: zstd cannot decompress the set: %s"
                                           % (path, _zstd_error(reader.proc)))
                reader.finish_encrypted()
            except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, RunbookError):
                failure = reader.decrypt_error()
                if failure:
                    raise RunbookError(failure) from None
                raise
    except tarfile.TarError as exc:
        raise RunbookError("%s: damaged or truncated set: %s" % (path, exc)) from None
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise RunbookError("%s: damaged or truncated set: %s" % (path, exc)) from None
    manifest, expected, seen, digests, sums = found
    if manifest is None:
        raise RunbookError("%s: damaged or truncated set: empty archive" % path)
    missing = sorted(set(expected) - seen)
    if missing:
        raise RunbookError("%s: damaged or truncated set: missing member(s) %s" % (path, ", ".join(missing)))
    if manifest["format"] >= 2 and sums is None:
        raise RunbookError("%s: damaged or truncated set: no %s member (the sha256 of every file, "
                           "written last)" % (path, CHECKSUMS))
    return manifest, digests, sums


def _scan_members(reader: _Reader, path: str, *, extract_to: dict | None, on_manifest,
                  write_back: _WriteBack | None, pending: _FileHashes):
    manifest = sums = None
    expected = {}
    seen = set()
    digests = {}
    for index, info in enumerate(reader.tar):
        _safe_member(info, path)
        if index == 0:
            if info.name != MANIFEST or not info.isfile() or info.size > 64 * 1024 * 1024:
                raise RunbookError("%s: not a backup set (first member is not %s)" % (path, MANIFEST))
            data = reader.tar.extractfile(info).read()
            manifest = _load_manifest(path, data)
            digests[MANIFEST] = hashlib.sha256(data).hexdigest()
            expected = {m["member"]: m for m in manifest["members"]}
            if on_manifest is not None:
                extract_to = on_manifest(manifest) or extract_to
            continue
        if sums is not None:
            raise RunbookError("%s: damaged set: member %r follows %s, which must be the last member"
                               % (path, info.name, CHECKSUMS))
        if manifest["format"] >= 2 and info.name == CHECKSUMS:
            if not info.isfile() or info.size > 64 * 1024 * 1024:
                raise RunbookError("%s: damaged set: %s is not a regular file of checksums" % (path, CHECKSUMS))
            sums = _parse_checksums(path, reader.tar.extractfile(info).read())
            continue
        entry = expected.get(info.name)
        if entry is None:
            raise RunbookError("%s: member %r is not in the manifest" % (path, info.name))
        seen.add(info.name)
        if not info.isfile():
            continue
        if info.size != entry.get("size"):
            raise RunbookError("%s: member %s does not match its size in the manifest (damaged set)"
                               % (path, info.name))
        out = flusher = None
        extraction = extract_to.get(info.name) if extract_to else None
        target = extraction.file if extraction else None
        if target:
            try:
                out = open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
            except OSError as exc:
                raise _extraction_error(extraction, info.name, "create", exc) from None
            if write_back is not None and info.size > FLUSH_EVERY:
                # written back by a thread while we extract; never throttled: the application
                # is stopped during a restore, and the extraction runs ahead of the disk
                flusher = _Flusher(out.fileno())
        # a large extracted file is hashed from the file by a helper thread (see scan_set): one
        # copied from an uncompressed set while it is copied, in the kernel, at the speed of the
        # page cache; a decompressed one once it is complete (hashing it while zstd decodes would
        # take the core that zstd, and so the check waiting for the copy, needs). Any other member
        # is hashed as it is read, a large one on the other core.
        large = info.size > 4 * CHUNK
        # a sparse member's bytes are not one range of the set (ours never are sparse)
        copying = bool(large and target and reader.compression == "none" and not info.issparse())
        if not large:
            digest = hashlib.sha256()
        elif target:
            digest = None
            if copying:
                pending.add(info.name, target, growing=True)
        else:
            digest = _HashThread()
        try:
            if copying and _copy_range(reader.raw.fileno(), info.offset_data, info.size, out,
                                       extraction=extraction, member=info.name):
                chunks = ()
            else:
                chunks = iter(functools.partial(reader.tar.extractfile(info).read, CHUNK), b"")
            for chunk in chunks:
                if digest is not None:
                    digest.update(chunk)
                if out is not None:
                    _write_out(out, chunk, extraction, info.name)
            if write_back is not None and out is not None:  # its fsync goes on while we scan and check
                write_back.add(extraction, info.name, out, flusher)
                out = flusher = None
            elif out is not None:  # a drill's scratch copy: a write error reported by close counts
                written, out = out, None
                try:
                    written.close()
                except OSError as exc:
                    raise _extraction_error(extraction, info.name, "write", exc) from None
        finally:
            if copying:
                pending.complete(info.name)
            elif digest is not None:
                digest.hexdigest()  # joins the hash thread on every path
            if flusher is not None:
                try:
                    flusher.stop()
                except OSError:  # a write-back failure while another failure is being raised
                    pass
            if out is not None:
                try:
                    out.close()
                except OSError:  # only after a failed write, which is already being raised
                    pass
        if digest is not None:
            digests[info.name] = digest.hexdigest()
        elif not copying:
            pending.add(info.name, target)
    return manifest, expected, seen, digests, sums


def _copy_range(source: int, offset: int, size: int, out, *, extraction: Extraction, member: str) -> bool:
    """Copy a member of an uncompressed set (``size`` bytes at ``offset`` of the set's fd) into
    ``out`` inside the kernel (copy_file_range): one copy from page cache to page cache, none
    through our buffers and no Python per MiB (docs/BENCHMARKS.md times it against a buffered copy,
    "Each pass alone"). False, with nothing copied, where the kernel cannot (another filesystem on a
    kernel before 5.19, or no such call): the caller then reads and writes."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None:
        return False
    done = 0
    while done < size:
        try:
            count = copy(source, out.fileno(), min(8 * CHUNK, size - done), offset + done)
        except OSError as exc:
            if done == 0 and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise _extraction_error(extraction, member, "write", exc) from None
        if count == 0:
            raise EOFError("unexpected end of data in member %s" % member)
        done += count
    return True


def _compare_checksums(path: str, manifest: dict, digests: dict, sums: dict | None) -> None:
    """Every file member's sha256 (and from format 3 on the manifest's) against the set's
    checksums; then they go into the manifest."""
    if sums is None:  # format 1: in the manifest
        sums = {m["member"]: m.get("sha256") for m in manifest["members"] if m["type"] in ("database", "file")}
        where = "the manifest"
    else:
        where = CHECKSUMS
    if manifest["format"] >= 3 and MANIFEST not in sums:
        raise RunbookError("%s: damaged set: %s does not list %s" % (path, CHECKSUMS, MANIFEST))
    if MANIFEST not in sums:  # formats 1 and 2: the manifest is covered by the sidecar's hash alone
        digests = {member: digest for member, digest in digests.items() if member != MANIFEST}
    for member, digest in digests.items():
        if sums.get(member) != digest:
            raise RunbookError("%s: member %s does not match its sha256 in %s (damaged set)" % (path, member, where))
    unknown = sorted(set(sums) - set(digests))
    if unknown:
        raise RunbookError("%s: damaged set: %s lists %s, not a file of this set" % (path, where, ", ".join(unknown)))
    _add_checksums(manifest, sums)


def _add_checksums(manifest: dict, sums: dict) -> None:
    """Put each file member's sha256 into the manifest's members and databases entries."""
    for entry in manifest["members"] + manifest.get("databases", []):
        if entry.get("member") in sums:
            entry["sha256"] = sums[entry["member"]]


def _write_out(out, chunk: bytes, extraction: Extraction, member: str) -> None:
    """Write an extracted chunk."""
    try:
        out.write(chunk)
        out.flush()  # the flusher measures the file, not our buffer
    except OSError as exc:
        raise _extraction_error(extraction, member, "write", exc) from None


def _extraction_error(extraction: Extraction, member: str, doing: str, exc: Exception) -> RunbookError:
    """A failure to create, write or write back an extracted file names the path it is meant for,
    not the set (the set may sit on another disk) nor the temp file."""
    cause = describe_oserror(exc) if isinstance(exc, OSError) else str(exc)
    return RunbookError("%s (extracting %s): cannot %s: %s" % (extraction.shown, member, doing, cause))


class _WriteBack:
    """Where restore's extracted files finish their way to disk: one thread takes each complete
    file in turn, stops its flusher (if it had one), fsyncs and closes it, while the scan goes on
    and the copies are checked. At most 64 files wait in line, so open files stay bounded.
    Closing a file here drops every POSIX lock this process holds on it, an SQLite check's
    included: harmless, since the copy sits in our private temp directory and nothing else opens it."""

    def __init__(self):
        self._queue = queue.Queue(maxsize=64)
        self._thread = None
        self.failure = None  # the RunbookError of the first file that could not be written back

    def add(self, extraction: Extraction, member: str, out, flusher: _Flusher | None) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        self._queue.put((extraction, member, out, flusher))

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            extraction, member, out, flusher = item
            try:
                try:
                    if flusher is not None:
                        flusher.stop()  # raises the error of a step written back during extraction
                    os.fsync(out.fileno())
                finally:
                    out.close()
            except Exception as exc:  # kept for wait(); this thread must go on closing the other files
                if self.failure is None:
                    self.failure = _extraction_error(extraction, member, "write", exc)

    def wait(self) -> RunbookError | None:
        """Wait until every file added is on disk (or failed); returns ``failure``."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        return self.failure


def _load_manifest(path: str, data: bytes) -> dict:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError:
        raise RunbookError("%s: manifest.json is not valid JSON" % path) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), list):
        raise RunbookError("%s: manifest.json has no member list" % path)
    if manifest.get("format") not in READ_FORMATS:
        raise RunbookError("%s: unsupported set format %r (this code reads formats %s)"
                           % (path, manifest.get("format"), ", ".join(str(f) for f in READ_FORMATS)))
    return manifest


def read_sidecar(set_path: str) -> str:
    sidecar = set_path + ".sha256"
    try:
        with open(sidecar, encoding="utf-8") as handle:
            text = handle.read(4096)
    except FileNotFoundError:
        raise RunbookError("%s: checksum file %s is missing (unverified set)" % (set_path, sidecar)) from None
    except OSError as exc:
        raise RunbookError("%s: cannot read: %s" % (sidecar, describe_oserror(exc))) from None
    match = re.match(r"^([0-9a-f]{64})\s", text)
    if not match:
        raise RunbookError("%s: not in sha256sum format" % sidecar)
    return match.group(1)


def _require_sidecar_match(set_path: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise RunbookError("%s: sha256 mismatch (file %s, %s.sha256 says %s): damaged or altered set"
                           % (set_path, actual, os.path.basename(set_path), expected))


def verify_set(set_path: str, identity: str | None = None, on_manifest=None, then=None,
               write_back: _WriteBack | None = None) -> dict:
    """Every member of the set and its manifest against the set's checksums (an encrypted set is
    decrypted with the age ``identity`` file on the way); ``on_manifest`` extracts while it scans
    and ``then()`` checks the extracted copies (see scan_set); ``write_back``: see scan_set.

    The set needs its sidecar (a set without one was never published), but from format 3 on the
    whole file is not hashed against it: SHA256SUMS then covers every byte that is used (the
    manifest and each file; a header must match the manifest, and a member whose header does not
    is refused), so that hash, a second sha256 of every byte of an uncompressed set, would check
    nothing more. In a set of format 1 or 2 the manifest is covered by the sidecar alone: its
    hash runs in a thread from the moment the manifest is read, beside the scan, and a sidecar
    mismatch is reported before whatever the scan or ``then()`` finds.
    """
    expected = read_sidecar(set_path)
    hashed = []

    def planned(manifest):
        if manifest["format"] < 3:
            hashed.append(_Background(_sha256_file, set_path))
        return on_manifest(manifest) if on_manifest is not None else None

    try:
        manifest = scan_set(set_path, identity=identity, on_manifest=planned, write_back=write_back, then=then)
    except RunbookError:
        for work in hashed:
            _require_sidecar_match(set_path, work.result(), expected)
        raise
    except BaseException:
        for work in hashed:
            work.result_quietly()
        raise
    for work in hashed:
        _require_sidecar_match(set_path, work.result(), expected)
    return manifest


# ---------------------------------------------------------------------------------------------
# retention


def select_retained(sets: list[dict], opts: dict, now: float) -> tuple[list[str], list[str]]:
    """(kept, pruned) names; ``sets`` newest first. No rule set: keep everything."""
    rules = {key: opts.get(key) for key in RETENTION_KEYS if opts.get(key) is not None}
    names = [item["name"] for item in sets]
    if not rules:
        return names, []
    keep = set()
    if rules.get("keep_last"):
        keep.update(names[:rules["keep_last"]])
    if rules.get("keep_days") is not None:
        cutoff = now - rules["keep_days"] * 86400
        keep.update(item["name"] for item in sets if item["time"] >= cutoff)
    for key, bucket in (("keep_daily", "%Y-%m-%d"), ("keep_weekly", "%G-W%V"), ("keep_monthly", "%Y-%m")):
        limit = rules.get(key)
        if not limit:
            continue
        seen = set()
        for item in sets:  # newest first: the first set of each bucket is that bucket's newest
            label = time.strftime(bucket, time.gmtime(item["time"]))
            if label in seen:
                continue
            if len(seen) >= limit:
                break
            seen.add(label)
            keep.add(item["name"])
    newest_verified = next((item["name"] for item in sets if item["verified"]), None)
    if newest_verified:
        keep.add(newest_verified)
    kept = [name for name in names if name in keep]
    pruned = [name for name in names if name not in keep]
    return kept, pruned


def _validate_retention(opts: dict) -> None:
    for key in RETENTION_KEYS:
        value = opts.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise RunbookError("%s=%r: must be a whole number >= 0" % (key, value))


def _prune(dest: str, pruned: list[str]) -> None:
    """Remove each pruned set's checksum file, then the set (a set without its sidecar is never
    taken for a verified one), relative to one open directory fd; one directory fsync at the end."""
    if not pruned:
        return
    try:
        dir_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise RunbookError("%s: cannot open: %s" % (dest, describe_oserror(exc))) from None
    try:
        for name in pruned:
            for entry in (name + ".sha256", name):
                try:
                    os.unlink(entry, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise RunbookError("%s: cannot remove: %s"
                                       % (os.path.join(dest, entry), describe_oserror(exc))) from None
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# backup / prune


def backup(params: dict, check_mode: bool = False, now: float | None = None) -> dict:
    """state=present: write one verified set, then apply retention. state=pruned: retention only."""
    opts = _options(params, BACKUP_DEFAULTS)
    if not opts["dest"]:
        raise RunbookError("dest is required")
    if opts["state"] not in ("present", "pruned"):
        raise RunbookError("state %r: expected present or pruned" % (opts["state"],))
    _validate_retention(opts)
    dest = os.path.abspath(opts["dest"])
    if opts["state"] == "present":
        if not opts["databases"]:
            raise RunbookError("databases is required when state=present")
        _check_compression(opts["compression"])
        _resolve_level(opts)
        _check_kind(opts["check"])
        mode = _parse_mode(opts["mode"])
        opts["encrypt_recipients"] = _check_recipients(opts["encrypt_recipients"])
        for db in opts["databases"]:
            require_database(db)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise RunbookError("%s: destination is not a directory" % dest)
    if not os.path.isdir(dest):
        if check_mode:
            return _plan_only(opts, dest, [], now)
        raise RunbookError("%s: destination directory does not exist" % dest)
    if check_mode:
        return _plan_only(opts, dest, list_sets(dest, opts["name_prefix"]), now)
    if not os.access(dest, os.W_OK | os.X_OK):
        raise RunbookError("%s: destination directory is not writable for this user" % dest)
    started = time.time()
    with DestLock(dest, opts["lock_timeout"]):
        remove_stale_temps(dest)
        _remove_orphan_sidecars(dest)
        listed = list_sets(dest, opts["name_prefix"])
        before = [item["name"] for item in listed]
        result = {"changed": False, "path": None, "name": None, "size": None, "sha256": None,
                  "databases": [], "extra_members": [], "manifest": None, "encrypted": None}
        if opts["state"] == "present":
            result.update(_write_set(opts, dest, mode))
            result["changed"] = True
        # a prune-only run changed nothing yet: no second listing of a directory of 10,000 sets
        sets = list_sets(dest, opts["name_prefix"]) if result["changed"] else listed
        kept, pruned = select_retained(sets, opts, time.time() if now is None else now)
        _prune(dest, pruned)
    result["duration"] = round(time.time() - started, 3)
    result.update({"pruned": pruned, "kept": kept, "changed": result["changed"] or bool(pruned),
                   "diff": {"before": "\n".join(sorted(before)) + "\n", "after": "\n".join(sorted(kept)) + "\n"}})
    if opts["metrics_file"] and opts["state"] == "present":
        _write_metrics(opts, result)
    return result


def _remove_orphan_sidecars(dest: str) -> list[str]:
    """A run killed between publishing ``<set>.sha256`` and ``<set>`` leaves a checksum file whose
    set was never published; remove it (only for names that parse as a set)."""
    removed = []
    try:
        names = set(os.listdir(dest))
    except OSError:
        return removed
    for name in names:
        if name.endswith(".sha256") and parse_set_name(name[:-7]) and name[:-7] not in names:
            try:
                os.unlink(os.path.join(dest, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _plan_only(opts: dict, dest: str, sets: list[dict], now: float | None) -> dict:
    now = time.time() if now is None else now
    before = [item["name"] for item in sets]
    name = None
    if opts["state"] == "present":
        stamp = int(now)
        while stamp in {item["time"] for item in sets}:
            stamp += 1  # the real run waits for a free second
        when = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
        name = set_name(opts["name_prefix"], when, opts["label"], opts["compression"],
                        bool(opts["encrypt_recipients"]))
        sets = [{"name": name, "time": stamp, "verified": True}] + sets
    kept, pruned = select_retained(sets, opts, now)
    databases = [{"path": os.path.abspath(db), "member": _member_name(db, opts["root"])}
                 for db in (opts["databases"] or [])] if opts["state"] == "present" else []
    return {"changed": bool(name) or bool(pruned), "path": os.path.join(dest, name) if name else None,
            "name": name, "size": None, "sha256": None, "duration": 0.0, "databases": databases,
            "extra_members": [], "manifest": None, "pruned": pruned, "kept": kept,
            "encrypted": bool(opts["encrypt_recipients"]) if opts["state"] == "present" else None,
            "diff": {"before": "\n".join(sorted(before)) + "\n", "after": "\n".join(sorted(kept)) + "\n"}}


def _write_set(opts: dict, dest: str, mode: int) -> dict:
    taken = {item["time"] for item in list_sets(dest, opts["name_prefix"])}
    while True:
        stamp = time.time()
        if int(stamp) not in taken:
            break
        time.sleep(1.0 - (stamp % 1.0) + 0.01)  # one set per second and prefix: wait for the next second
    when = datetime.datetime.fromtimestamp(int(stamp), datetime.timezone.utc)
    recipients = opts["encrypt_recipients"] or []
    name = set_name(opts["name_prefix"], when, opts["label"], opts["compression"], bool(recipients))
    workdir = make_temp_dir(dest)
    try:
        entries, databases, checks = [], [], []
        seen_members = {}
        for index, db in enumerate(opts["databases"]):
            member = "databases/" + _member_name(db, opts["root"])
            if member in seen_members:
                raise RunbookError("%s: member name %s collides with %s (set root)"
                                   % (db, member, seen_members[member]))
            seen_members[member] = db
            staged_name = "db-%d" % index
            info = snapshot_database(db, os.path.join(workdir, staged_name), opts["busy_timeout"], opts["check"])
            checks.append(info.pop("check"))
            entries.append({"type": "database", "member": member, "path": os.path.abspath(db), "size": info["size"],
                            "staged": staged_name, "mode": 0o600})
            # the manifest records the check as passed: if it fails, this set is never published
            databases.append(dict(info, path=os.path.abspath(db), member=member,
                                  check={"kind": opts["check"], "ok": True, "errors": []}))
        counter = 0
        for extra in opts["extra_paths"] or []:
            top = "files/" + _member_name(extra, opts["root"])
            for kind, full, member, target in _walk_extra(os.path.abspath(extra), top):
                if member in seen_members:
                    raise RunbookError("%s: member name %s collides with %s" % (full, member, seen_members[member]))
                seen_members[member] = full
                try:
                    st = os.lstat(full)
                except OSError as exc:
                    raise RunbookError("%s: cannot read: %s" % (full, describe_oserror(exc))) from None
                entry = {"type": kind, "member": member, "path": full, "mode": stat.S_IMODE(st.st_mode),
                         "mtime": int(st.st_mtime)}
                if kind == "file":
                    counter += 1
                    entry["staged"] = "file-%d" % counter
                    entry["size"] = _copy_file(full, os.path.join(workdir, entry["staged"]))
                elif kind == "symlink":
                    entry["target"] = target
                entries.append(entry)
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "created_at": _utc(int(stamp)),
            "host": socket.gethostname(),
            "label": opts["label"] or "",
            "compression": opts["compression"],
            "compression_level": opts["compression_level"],
            "root": os.path.abspath(opts["root"]) if opts["root"] else None,
            "check": opts["check"],
            "encrypted": bool(recipients),
            "checksums": CHECKSUMS,
            "databases": databases,
            "members": [{key: value for key, value in entry.items() if key != "staged"} for entry in entries],
        }
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        final = os.path.join(dest, name)
        with StagedFile(final, mode=mode, owner=opts["owner"], group=opts["group"]) as staged, \
                StagedFile(final + ".sha256", mode=mode, owner=opts["owner"], group=opts["group"]) as sidecar:
            if recipients:
                # the plain archive is written and verified inside the private work dir, then encrypted
                plain = _PlainArchive(os.path.join(workdir, "plain" + EXTENSIONS[opts["compression"]]))
                try:
                    _write_archive(plain, opts, manifest_bytes, entries, workdir, sidecar=False)
                finally:
                    plain.close()
                _wait_checks(checks)
                _drop_staged(entries, workdir)
                scan_set(plain.path)  # a set failing verification is never published
                with _flushing(staged):
                    _encrypt(plain.path, staged, recipients)
                staged.finish()
                digest = _sha256_file(staged.temp_path)
            else:
                # whoever writes the file (we, or zstd's relay thread) writes it back step by step
                with _flushing(staged, inline=True) as flusher:
                    digest = _write_archive(staged, opts, manifest_bytes, entries, workdir,
                                            throttle=flusher.throttle, verify=True)
                    staged.fileobj.flush()
                _wait_checks(checks)
                _drop_staged(entries, workdir)  # before the fsync: their dirty pages need never reach the disk
                staged.finish()
                digest = _verify_written(staged, opts["compression"], digest)
            sidecar.write(("%s  %s\n" % (digest, name)).encode("ascii"))
            sidecar.finish()
            size = os.path.getsize(staged.temp_path)
            sidecar.commit()
            staged.commit()
    finally:
        for pending in checks:
            pending.result_quietly()  # a failed run still waits for its checks before removing their files
        remove_temp_dir(workdir)
    # what the caller gets back: the manifest with each member's sha256 from SHA256SUMS
    _add_checksums(manifest, {entry["member"]: entry["sha256"] for entry in entries if "sha256" in entry})
    return {"path": final, "name": name, "size": size, "sha256": digest, "databases": databases,
            "encrypted": bool(recipients),
            "extra_members": [entry["member"] for entry in entries if entry["type"] != "database"],
            "manifest": manifest}


class _PlainArchive:
    """The unencrypted archive in the work dir; quacks like StagedFile for _write_archive."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fileobj = open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
        except OSError as exc:
            raise RunbookError("%s: cannot write: %s" % (path, describe_oserror(exc))) from None

    def close(self) -> None:
        try:
            self.fileobj.close()
        except OSError as exc:
            raise RunbookError("%s: writing the set failed: %s" % (self.path, describe_oserror(exc))) from None


def _encrypt(plain: str, staged: StagedFile, recipients: list) -> None:
    """``age -r R... PLAIN`` into the staged file; the result must carry the age header."""
    command = [_require_age("encrypt_recipients")]
    for recipient in recipients:
        command += ["-r", recipient]
    command.append(plain)
    try:
        staged.fileobj.flush()
        proc = subprocess.run(command, stdout=staged.fileobj, stderr=subprocess.PIPE, check=False)
    except OSError as exc:
        raise RunbookError("%s: cannot run age: %s" % (staged.path, describe_oserror(exc))) from None
    if proc.returncode != 0:
        text = proc.stderr.decode("utf-8", "replace")
        if "no space left" in text.lower():
            cause = "no space left on device"
        else:
            lines = [line for line in text.splitlines() if "error" in line] or text.splitlines() or ["exit %d"
                                                                                                     % proc.returncode]
            cause = lines[0].replace("age: error: ", "")
        raise RunbookError("%s: age encryption failed: %s" % (staged.path, cause))
    if not is_encrypted(staged.temp_path):
        raise RunbookError("%s: age encryption failed: output has no age header" % staged.path)


class _flushing:
    """Context: a _Flusher on the staged file while it is written (see _Flusher)."""

    def __init__(self, staged, inline: bool = False):
        self.staged = staged
        self.inline = inline
        self.flusher = None

    def __enter__(self):
        self.flusher = _Flusher(self.staged.fileobj.fileno(), inline=self.inline)
        return self.flusher

    def __exit__(self, exc_type, exc, tb):
        try:
            self.flusher.stop()
        except OSError as error:
            if exc_type is None:  # otherwise the body's own failure is the one to report
                raise RunbookError("%s: writing the set failed: %s"
                                   % (self.staged.path, describe_oserror(error))) from None


def _wait_checks(checks: list) -> None:
    """Join the snapshot checks (see snapshot_database); the first failure fails the run."""
    for pending in checks:
        pending.result()


def _drop_staged(entries: list[dict], workdir: str) -> None:
    for entry in entries:
        if entry.get("staged"):
            try:
                os.unlink(os.path.join(workdir, entry["staged"]))
            except OSError:
                pass  # the work dir is removed at the end anyway


def _verify_written(staged: StagedFile, compression: str, digest: str | None) -> str:
    """Verify the finished (fsynced) set before it is published; returns its sha256.

    ``none`` and ``zstd``: the digest was computed from exactly the bytes handed to write() and
    the file is fsynced; reading it back would only re-read the same page-cache pages, so no
    read-back (a zstd set was decoded by ``zstd -t`` as it was written, see _ZstdOut).
    ``gzip``: read back and scanned member by member (``scan_set``).
    """
    if compression in ("none", "zstd") and digest:
        return digest
    digest = _sha256_file(staged.temp_path)
    scan_set(staged.temp_path)  # a set failing verification is never published
    return digest


def _write_metrics(opts: dict, result: dict) -> None:
    labels = {"prefix": opts["name_prefix"], "dest": os.path.abspath(opts["dest"])}
    write_textfile(opts["metrics_file"], [
        ("runbook_sqlite_backup_last_success_timestamp_seconds", "gauge",
         "Unix time of the last verified backup set.", labels, time.time()),
        ("runbook_sqlite_backup_duration_seconds", "gauge", "Duration of the last backup run.", labels,
         result["duration"]),
        ("runbook_sqlite_backup_size_bytes", "gauge", "Size of the last backup set.", labels, result["size"] or 0),
        ("runbook_sqlite_backup_verified", "gauge", "1 when the last set passed verification.", labels, 1),
    ])


# ---------------------------------------------------------------------------------------------
# restore / drill


def _parse_before(value: str) -> float:
    text = str(value).strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise RunbookError("before=%r: not an ISO 8601 timestamp such as 2026-11-01T00:00:00Z" % (value,)) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def choose_set(opts: dict) -> str:
    src = os.path.abspath(opts["src"])
    if not os.path.isdir(src):
        raise RunbookError("%s: source directory does not exist" % src)
    if opts["set"] and opts["set"] != "latest":
        name = opts["set"]
        if "/" in name or name in (".", ".."):
            raise RunbookError("set=%r: give a set file name inside src, not a path" % (name,))
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            raise RunbookError("%s: no such backup set" % path)
        return path
    sets = [item for item in list_sets(src, opts["name_prefix"]) if item["verified"]]
    if opts["label"]:
        wanted = sanitize_label(opts["label"])
        sets = [item for item in sets if item["label"] == wanted]
    if opts["before"]:
        limit = _parse_before(opts["before"])
        sets = [item for item in sets if item["time"] < limit]
    if not sets:
        raise RunbookError("%s: no verified backup set matches (set=%s, before=%s, label=%s)"
                           % (src, opts["set"], opts["before"], opts["label"]))
    return os.path.join(src, sets[0]["name"])


def _select_members(manifest: dict, opts: dict, set_path: str) -> list[dict]:
    dbs = [m for m in manifest["members"] if m["type"] == "database"]
    if opts["databases"]:
        chosen = []
        for wanted in opts["databases"]:
            match = [m for m in dbs if wanted in (m["member"], m["member"][len("databases/"):], m["path"])]
            if not match:
                raise RunbookError("%s: no database %r in this set (it has: %s)"
                                   % (set_path, wanted, ", ".join(m["member"][len("databases/"):] for m in dbs)))
            chosen.extend(m for m in match if m not in chosen)
        dbs = chosen
    files = [m for m in manifest["members"] if m["type"] != "database"] if opts["extra_paths"] else []
    return dbs + files


def _target(path: str, dest_root: str | None) -> str:
    if dest_root:
        return os.path.join(os.path.abspath(dest_root), path.lstrip("/"))
    return path


def _existing_digest(path: str, member: dict) -> str | None:
    """sha256 of the file at ``path`` when it may hold exactly ``member`` (same size and, for a
    database, no non-empty -wal or -journal beside it); None when it certainly differs."""
    if member["type"] == "database":
        for extra in sidecar_paths(path):
            if os.path.exists(extra) and os.path.getsize(extra) > 0 and not extra.endswith("-shm"):
                return None
    try:
        if os.path.getsize(path) != member["size"]:
            return None
    except OSError:
        return None
    try:
        return _sha256_file(path)
    except RunbookError:  # unreadable: it cannot be shown to match
        return None


def restore(params: dict, check_mode: bool = False) -> dict:
    opts = _options(params, RESTORE_DEFAULTS)
    if not opts["src"]:
        raise RunbookError("src is required")
    _check_kind(opts["check"])
    if opts["mode"] not in ("restore", "drill", "select"):
        raise RunbookError("mode %r: expected restore, drill or select" % (opts["mode"],))
    if opts["force"] and opts["if_missing"]:
        raise RunbookError("force and if_missing cannot both be true (replace existing files, or skip them?)")
    if not os.path.isdir(opts["src"]):
        raise RunbookError("%s: source directory does not exist" % os.path.abspath(opts["src"]))
    # a shared lock: a backup or prune run on src cannot remove the set while it is being read
    with DestLock(os.path.abspath(opts["src"]), opts["lock_timeout"], shared=True):
        return _restore_locked(opts, check_mode)


def _restore_locked(opts: dict, check_mode: bool) -> dict:
    set_path = choose_set(opts)
    if opts["mode"] == "select":
        return _select(set_path)
    if opts["mode"] == "drill":
        return _drill(set_path, opts, check_mode)
    job = _RestoreJob(set_path, opts, check_mode)
    try:
        # one pass: the manifest (first member) gives the plan, the planned members are extracted
        # into temp files; then the SQLite check of each extracted database, side by side with the
        # extracted files' hashes and write-back (see verify_set for the sidecar); the set's
        # checksums (its last member) settle what already matched; nothing live is touched before
        # all of it has passed
        manifest = verify_set(set_path, identity=opts["identity_file"], on_manifest=job.prepare,
                              then=job.check_extracted, write_back=job.write_back)
        job.settle()
        result = {"set": os.path.basename(set_path), "set_path": set_path, "verified": True, "manifest": manifest,
                  "restored": [t for m, t in job.plan if m["type"] != "dir"], "skipped_paths": job.skipped,
                  "safety_copies": [], "row_counts": {}, "changed": bool(job.plan)}
        if check_mode or not job.plan:
            return result
        result["safety_copies"] = job.apply()
        job.done = True
        return result
    finally:
        job.cleanup()


class _RestoreJob:
    """What one restore plans from the manifest, the temp files it extracts into, and the swap."""

    def __init__(self, set_path: str, opts: dict, check_mode: bool):
        self.set_path = set_path
        self.opts = opts
        self.check_mode = check_mode
        self.plan, self.skipped, self.staged = [], [], []
        # existing files of the member's size, with their sha256: whether they already hold the
        # member is known only once the set's checksums are read (SHA256SUMS is its last member)
        self.undecided = []
        self.temp_dirs = {}
        self.write_back = _WriteBack()  # the extracted files' fsyncs (see scan_set)
        self.created = []  # parent directories this run made, removed again if it fails
        self.done = False

    def prepare(self, manifest: dict) -> dict:
        """on_manifest callback: decide what to restore, refuse what must be refused, and return
        {member: temp file} for the files to extract (none in check mode)."""
        opts = self.opts
        parents = {}
        for member in _select_members(manifest, opts, self.set_path):
            target = _target(member["path"], opts["dest_root"])
            if member["type"] == "dir":
                if not os.path.isdir(target):
                    self.plan.append((member, target))
                continue
            parents[os.path.dirname(target)] = True
            if os.path.lexists(target):
                if opts["if_missing"]:
                    self.skipped.append(target)
                    continue
                if member["type"] == "symlink":
                    if os.path.islink(target) and os.readlink(target) == member["target"]:
                        continue
                else:
                    digest = _existing_digest(target, member)
                    if digest is not None and "sha256" not in member:  # format 2: decided in settle()
                        self.undecided.append((member, target, digest))
                        if not opts["force"]:
                            continue  # not extracted: without force it is either left alone or refused
                    elif digest is not None and digest == member["sha256"]:
                        continue
                if not opts["force"]:
                    self._refuse_differing(target)
            self.plan.append((member, target))
        if not opts["force_running"]:
            decided_later = {id(member) for member, _target, _digest in self.undecided}
            for member, target in self.plan:
                if member["type"] == "database" and os.path.lexists(target) and id(member) not in decided_later:
                    refuse_if_in_use(target)
        if self.check_mode:
            return {}
        # next to every file of the set, also those already in place: a run killed after its
        # swaps but before its cleanup left its temp directory there
        for parent in parents:
            remove_stale_temps(parent)
        extract_to = {}
        for index, (member, target) in enumerate(self.plan):
            if member["type"] not in ("database", "file"):
                continue
            parent = os.path.dirname(target)
            if parent not in self.temp_dirs:
                _make_missing_dirs(parent, self.created.append)
            temp = os.path.join(self._temp_dir(parent), "m%d" % index)
            extract_to[member["member"]] = Extraction(temp, target)
            self.staged.append((member, target, temp))
        return extract_to

    def _refuse_differing(self, target: str) -> None:
        raise RunbookError("%s: exists and differs from set %s; set force=true to replace it "
                           "(or if_missing=true to skip existing files)" % (target, os.path.basename(self.set_path)))

    def settle(self) -> None:
        """After the verified pass (the manifest now carries every sha256): an undecided file that
        holds its member is left alone (its extracted copy, if any, is not used); one that differs
        is replaced with force (after the running-app check) and refused without it."""
        for member, target, digest in self.undecided:
            if digest == member["sha256"]:
                self.plan = [(m, t) for m, t in self.plan if m is not member]
                self.staged = [item for item in self.staged if item[0] is not member]
                continue
            if not self.opts["force"]:
                self._refuse_differing(target)
            if member["type"] == "database" and not self.opts["force_running"]:
                refuse_if_in_use(target)

    def check_extracted(self) -> None:
        """The SQLite check of each extracted database (verify_set's ``then``)."""
        for member, target, temp in self.staged:
            if member["type"] == "database":
                _check_extracted(temp, target, self.opts)

    def apply(self) -> list[str]:
        """After a verified pass and checked copies: wait until every copy is on disk, then
        create directories and swap."""
        opts = self.opts
        failure = self.write_back.wait()
        if failure:
            raise failure
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime(_TS_FORMAT)
        undo = _Undo()
        try:
            for member, target in self.plan:  # directories first, with the mode the manifest recorded
                if member["type"] == "dir":
                    _make_dir(target, member.get("mode", 0o700), undo)
            for member, target, temp in self.staged:
                _replace(member, target, temp, opts, stamp=stamp, undo=undo, temp_dir=self._temp_dir)
            for member, target in self.plan:
                if member["type"] == "symlink":
                    _replace_link(member, target, opts, stamp=stamp, undo=undo, temp_dir=self._temp_dir)
        except RunbookError as exc:
            raise RunbookError(str(exc) + undo.roll_back()) from None
        return undo.safety

    def _temp_dir(self, parent: str) -> str:
        """This run's temp directory in ``parent`` (made on first use; cleanup() removes it)."""
        if parent not in self.temp_dirs:
            self.temp_dirs[parent] = make_temp_dir(parent)
        return self.temp_dirs[parent]

    def cleanup(self) -> None:
        self.write_back.wait()  # a failed run: no thread outlives it
        for directory in self.temp_dirs.values():
            remove_temp_dir(directory)
        if not self.done:
            for path in reversed(self.created):
                try:
                    os.rmdir(path)  # only if still empty: never removes anything we did not make
                except OSError:
                    pass


_SQLITE_LOCK_START = 0x40000000  # SQLite's lock bytes: pending, reserved, then 510 shared bytes
_SQLITE_LOCK_LEN = 512


def processes_holding(path: str) -> list[str]:
    """``pid (comm)`` of every other process with ``path`` or its -wal/-shm/-journal open.

    Linux only (reads /proc/*/fd); elsewhere, or for processes of other users when not root,
    it sees nothing. Our own process is left out.
    """
    wanted = set()
    for candidate in [path] + sidecar_paths(path):
        try:
            st = os.stat(candidate)
        except OSError:
            continue
        wanted.add((st.st_dev, st.st_ino))
    if not wanted or not os.path.isdir("/proc/self/fd"):
        return []
    holders = []
    me = os.getpid()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == me:
            continue
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in wanted:
                try:
                    with open("/proc/%d/comm" % pid, encoding="utf-8", errors="replace") as handle:
                        comm = handle.read().strip()
                except OSError:
                    comm = "?"
                holders.append("%d (%s)" % (pid, comm))
                break
    return holders


def _sqlite_locked(path: str) -> bool:
    """True when another process holds an SQLite lock on ``path`` (lock bytes of the database,
    or any lock on its -shm: an open WAL connection keeps one). Probes with a non-blocking POSIX
    write lock and changes nothing; our own process's locks never conflict with it."""
    probes = [(path, _SQLITE_LOCK_START, _SQLITE_LOCK_LEN), (path + "-shm", 0, 0)]
    for candidate, start, length in probes:
        try:
            fd = os.open(candidate, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
            fcntl.lockf(fd, fcntl.LOCK_UN, length, start)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
        finally:
            os.close(fd)
    return False


def refuse_if_in_use(target: str) -> None:
    """Refuse to replace a live database that a running application still has open."""
    holders = processes_holding(target)
    if holders:
        raise RunbookError("%s: the database is open in running process(es) %s; stop the application before "
                           "restoring (or set force_running=true)" % (target, ", ".join(holders[:5])))
    if _sqlite_locked(target):
        raise RunbookError("%s: another process holds an SQLite lock on the database (the application is "
                           "running?); stop it before restoring (or set force_running=true)" % target)


def _check_extracted(temp: str, target: str, opts: dict) -> None:
    try:
        conn = sqlite3.connect("file:%s?mode=rw" % temp, uri=True, isolation_level=None)
        try:
            map_private_copy(conn)
            ok, errors = run_check(conn, opts["check"])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        ok, errors = False, [str(exc)]
    for extra in sidecar_paths(temp):
        if os.path.exists(extra):
            os.unlink(extra)
    if not ok:
        raise RunbookError("%s: %s of the restored copy failed, nothing replaced: %s"
                           % (target, opts["check"], "; ".join(errors)))


class _Undo:
    """What a restore's swaps have changed so far, and how to put it back: a swap that fails after
    others succeeded must not leave a database from the set beside an ``.env`` from before.

    Each replaced path (a file, a database's ``-wal``/``-journal``) keeps its old inode under a
    second name before anything is removed or renamed over it: its safety copy, or with
    ``safety_copy: false`` a hard link in the restore's temp directory (removed with it after a
    success). Putting back renames that name over the path again; a replaced symlink is made
    again from its recorded target; a path that did not exist is removed again. A removed
    ``-shm`` is not kept: it is the index of the ``-wal`` that SQLite rebuilds when it opens the
    database. A kill cannot be undone this way (docs/RELIABILITY.md, known limits)."""

    def __init__(self):
        self.safety = []  # the safety copies made (the module returns them)
        # (path, how to put it back: ("kept", second name, the path's file) | ("link", target) | ("new",)
        # | ("dir",))
        self._steps = []

    def kept(self, path: str, name: str | None) -> None:
        self._steps.append((path, ("kept", name, _identity(path))))

    def link(self, path: str, target: str) -> None:
        self._steps.append((path, ("link", target)))

    def new(self, path: str) -> None:
        self._steps.append((path, ("new",)))

    def new_dir(self, path: str) -> None:
        self._steps.append((path, ("dir",)))

    def keep_name(self) -> str:
        """A name for the next hard link kept in the temp directory."""
        return "kept-%d" % len(self._steps)

    def roll_back(self) -> str:
        """Put back every path changed so far, newest first; returns what the failure's message adds."""
        put_back, failed = 0, []
        for path, how in reversed(self._steps):
            try:
                if self._put_back(path, *how):
                    fsync_dir(os.path.dirname(path))
                    put_back += 1
            except OSError as exc:
                kept = " (its previous content is at %s)" % how[1] if how[0] == "kept" and how[1] else ""
                failed.append("%s: %s%s" % (path, describe_oserror(exc), kept))
            except RunbookError as exc:
                failed.append(str(exc))
        if failed:
            return "; could not put back %s" % "; ".join(failed)
        if put_back:
            return "; the restore was undone: the %d path(s) it had changed are back as they were" % put_back
        return ""

    def _put_back(self, path: str, how: str, arg: str | None = None, was=None) -> bool:
        """One step undone; False where the path had not changed yet."""
        if how == "new":
            if not os.path.lexists(path):
                return False
            os.unlink(path)
        elif how == "dir":
            os.rmdir(path)  # empty again once what this run put into it is gone
        elif how == "link":
            if os.path.islink(path) and os.readlink(path) == arg:
                return False  # not replaced yet
            if os.path.lexists(path):
                os.unlink(path)
            os.symlink(arg, path)
        elif _identity(path) == was:  # the failure came before this path was touched
            if arg is not None:
                os.unlink(arg)
                self._forget(arg)
            return False
        elif arg is None:
            raise RunbookError("%s (the file system keeps no second name for it)" % path)
        else:
            os.replace(arg, path)
            self._forget(arg)
        return True

    def _forget(self, name: str) -> None:
        """``name`` is no safety copy any more (it was put back or dropped)."""
        if name in self.safety:
            self.safety.remove(name)


def _identity(path: str):
    """(device, inode) of the file at ``path`` itself (a symlink's own), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _keep_old(pairs: list, opts: dict, undo: _Undo, temp_dir) -> None:
    """Give each existing path of ``pairs`` ((path, its safety copy's name or None), a file
    first, then its journals) a second name before it is replaced or removed: with
    ``safety_copy``, its safety copy (a hard link, so it costs no space; a copy where the file
    system has no hard links; never over another file of that name); otherwise, or where no
    safety name is given, a hard link in ``temp_dir(its directory)``, the run's temp directory
    there (or none where hard links fail: then it cannot be put back)."""
    for path, safety_name in pairs:
        if not os.path.lexists(path):
            continue
        if opts["safety_copy"] and safety_name:
            kept = safety_name
            existing = _identity(kept)
            if existing is None:
                try:
                    os.link(path, kept, follow_symlinks=False)  # the replaced inode lives on under the safety name
                except OSError:
                    try:
                        shutil.copy2(path, kept, follow_symlinks=False)
                    except OSError as exc:
                        raise RunbookError("%s: cannot keep a safety copy at %s: %s"
                                           % (path, kept, describe_oserror(exc))) from None
            elif existing != _identity(path):  # a restore in the same second: never overwrite its copy
                raise RunbookError("%s: cannot keep a safety copy at %s: it exists already (run the restore "
                                   "again in a second)" % (path, kept))
            # else: a run killed before its swap left this very file under the name: it serves again
            undo.safety.append(kept)
        else:
            kept = os.path.join(temp_dir(os.path.dirname(path)), undo.keep_name())
            try:
                os.link(path, kept, follow_symlinks=False)
            except OSError:
                kept = None
        undo.kept(path, kept)


def _replace(member: dict, target: str, temp: str, opts: dict, *, stamp: str, undo: _Undo, temp_dir) -> None:
    exists = os.path.lexists(target)
    if exists and os.path.isfile(target) and not os.path.islink(target):
        st = os.stat(target)
        mode, uid, gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    else:
        mode = 0o600 if member["type"] == "database" else member.get("mode", 0o600)
        uid = gid = None
    owner = opts["owner"] if opts["owner"] not in (None, "") else uid
    group = opts["group"] if opts["group"] not in (None, "") else gid
    apply_attrs(temp, mode, owner, group, label=target)  # an error names the file, not our temp copy
    # the safety copy of a database's -wal is <copy>-wal, so that opening the copy reads it; stale
    # journals beside a missing database get no safety copy, only a name to be put back from
    base = "%s.pre-restore-%s" % (target, stamp)
    pairs = [(target, base)] if exists else []
    if member["type"] == "database":
        pairs += [(target + suffix, base + suffix if exists else None) for suffix in ("-wal", "-journal")]
    _keep_old(pairs, opts, undo, temp_dir)
    if not exists:
        undo.new(target)
    if member["type"] == "database":
        for extra in sidecar_paths(target):
            try:
                os.unlink(extra)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RunbookError("%s: cannot remove stale %s: %s" % (target, extra, describe_oserror(exc))) from None
    try:
        os.replace(temp, target)
        fsync_dir(os.path.dirname(target))
    except OSError as exc:
        raise RunbookError("%s: cannot put the restored file in place: %s" % (target, describe_oserror(exc))) from None


def _make_missing_dirs(directory: str, made, shown: str | None = None) -> None:
    """Create ``directory`` and its missing parents (0700), calling ``made(path)`` for each one
    created, so the caller can remove them again. An error names ``shown`` if given, else the
    directory that could not be made."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except OSError as exc:
            raise RunbookError("%s: cannot create directory: %s" % (shown or path, describe_oserror(exc))) from None
        made(path)


def _make_dir(path: str, mode: int, undo: _Undo) -> None:
    """A directory member: made where missing (its missing parents too), then given its mode."""
    _make_missing_dirs(path, undo.new_dir, shown=path)
    try:
        os.chmod(path, mode)
    except OSError as exc:
        raise RunbookError("%s: cannot create directory: %s" % (path, describe_oserror(exc))) from None


def _replace_link(member: dict, target: str, opts: dict, *, stamp: str, undo: _Undo, temp_dir) -> None:
    try:
        if os.path.islink(target) and not opts["safety_copy"]:
            undo.link(target, os.readlink(target))
            os.unlink(target)
        elif os.path.lexists(target):
            _keep_old([(target, "%s.pre-restore-%s" % (target, stamp))], opts, undo, temp_dir)
            os.unlink(target)
        else:
            undo.new(target)
        os.symlink(member["target"], target)
    except OSError as exc:
        raise RunbookError("%s: cannot create link: %s" % (target, describe_oserror(exc))) from None


def _select(set_path: str) -> dict:
    """Which set the rules choose, and whether the file still matches its sidecar; nothing is
    decoded, so neither an age identity nor zstd is needed (an off-host store picks the set that a
    fresh host then verifies in full and restores)."""
    expected = read_sidecar(set_path)  # a missing sidecar fails before the file is read
    actual = _sha256_file(set_path)
    _require_sidecar_match(set_path, actual, expected)
    return {"set": os.path.basename(set_path), "set_path": set_path, "sha256": actual, "verified": False,
            "encrypted": set_path.endswith(AGE_SUFFIX), "restored": [], "skipped_paths": [], "safety_copies": [],
            "row_counts": {}, "changed": False}


def _drill(set_path: str, opts: dict, check_mode: bool) -> dict:
    if not opts["drill_dir"]:
        raise RunbookError("drill_dir is required when mode=drill")
    drill_dir = os.path.abspath(opts["drill_dir"])
    opts = dict(opts, extra_paths=False)
    result = {"set": os.path.basename(set_path), "set_path": set_path, "verified": True, "manifest": None,
              "restored": [], "drilled": [], "skipped_paths": [], "safety_copies": [], "row_counts": {}, "checks": {},
              "changed": False}
    work = None
    if not check_mode:
        if not os.path.isdir(drill_dir):
            raise RunbookError("%s: drill directory does not exist" % drill_dir)
        remove_stale_temps(drill_dir)
        work = make_temp_dir(drill_dir)
    members = []

    def prepare(manifest):
        members.extend(_select_members(manifest, opts, set_path))
        if work is None:
            return {}
        return {m["member"]: Extraction(os.path.join(work, "m%d" % i), drill_dir) for i, m in enumerate(members)}

    def check_copies():
        for index, member in enumerate(members if work is not None else []):
            temp = os.path.join(work, "m%d" % index)
            name = member["member"][len("databases/"):]
            try:
                conn = connect(temp, busy_timeout_ms=opts["busy_timeout"])
                try:
                    ok, errors = run_check(conn, opts["check"])
                    result["row_counts"][name] = table_row_counts(conn) if ok else {}
                finally:
                    conn.close()
            except sqlite3.Error as exc:
                ok, errors = False, [str(exc)]
            result["checks"][name] = {"kind": opts["check"], "ok": ok, "errors": errors}
            if not ok:
                raise RunbookError("%s: drill: %s of %s failed: %s"
                                   % (set_path, opts["check"], name, "; ".join(errors)))
            result["drilled"].append(name)

    try:
        # the copies are checked side by side with their hashes (see scan_set)
        result["manifest"] = verify_set(set_path, identity=opts["identity_file"], on_manifest=prepare,
                                        then=check_copies)
    finally:
        if work is not None:
            remove_temp_dir(work)
    return result


# ---------------------------------------------------------------------------------------------
# command line (systemd timer on hosts)


def cli(argv=None) -> int:
    """``cli() backup|prune|restore|drill --config FILE.json``: prints a JSON result.

    Returns the exit code (the wrapper calls ``sys.exit(cli())``): 0 on success, 1 on a
    RunbookError (message on stderr), 75 when the lock was busy.
    """
    return run_cli(sys.argv[1:] if argv is None else argv)


def run_cli(args) -> int:
    args = list(args)
    if len(args) != 3 or args[0] not in ("backup", "prune", "restore", "drill") or args[1] != "--config":
        sys.stderr.write("usage: backup|prune|restore|drill --config FILE.json\n")
        return 2
    command, config = args[0], args[2]
    try:
        try:
            with open(config, encoding="utf-8") as handle:
                params = json.load(handle)
        except (OSError, ValueError) as exc:
            raise RunbookError("%s: cannot read the JSON config: %s" % (config, exc)) from None
        if not isinstance(params, dict):
            raise RunbookError("%s: the config must be a JSON object" % config)
        if command == "backup":
            result = backup(dict(params, state="present"))
        elif command == "prune":
            result = backup(dict(params, state="pruned"))
        else:
            result = restore(dict(params, mode="drill" if command == "drill" else "restore"))
    except LockTimeout as exc:
        sys.stderr.write("%s\n" % exc)
        return EX_TEMPFAIL
    except RunbookError as exc:
        sys.stderr.write("%s\n" % exc)
        return 1
    result.pop("diff", None)
    result.pop("manifest", None)
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())  # sanity's pylint reserves sys.exit for modules' exit_json/fail_json
