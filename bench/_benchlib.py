# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared helpers for the bench/*.py scripts: building test databases, timing child processes
(wall time and peak RSS from wait4), statistics and a description of the machine.

Figures go to docs/BENCHMARKS.md (bench/render.py), never into tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 1024 * 1024

# Application-like text: timestamps, short words, hex tokens, an index. Compresses ~2-3x.
_WORDS = ("login logout create update delete view export import sync retry queue order invoice "
          "payment refund user admin guest report alert notice warning error debug trace").split()


def collection_root() -> str:
    """Directory that holds ansible_collections/ (PYTHONPATH), from the env or a collection tree."""
    root = os.environ.get("BENCH_COLLECTION_ROOT")
    if root:
        return root
    for path in sys.path:
        if os.path.isdir(os.path.join(path or ".", "ansible_collections", "runbook", "sqlite_app")):
            return os.path.abspath(path or ".")
    up = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
    if os.path.isdir(os.path.join(up, "ansible_collections")):
        return up
    sys.exit("cannot find the collection: set BENCH_COLLECTION_ROOT or PYTHONPATH to a tree made by "
             "tools/collection-tree.sh")


def engine_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = collection_root()
    return env


CLI = ("import sys; from ansible_collections.runbook.sqlite_app.plugins.module_utils._backupset import cli; "
       "sys.exit(cli())")


def build_text_db(path: str, size_mib: int) -> dict:
    """A WAL database of ~size_mib MiB of text-like rows (events table + index), checkpointed."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, at TEXT, kind TEXT, actor TEXT, token TEXT, "
                 "body TEXT)")
    conn.execute("CREATE INDEX events_kind_at ON events (kind, at)")
    conn.execute("CREATE TABLE writes (id INTEGER PRIMARY KEY, at REAL, note TEXT)")
    conn.execute("CREATE TEMP TABLE w (i INTEGER PRIMARY KEY, word TEXT)")
    conn.executemany("INSERT INTO w (word) VALUES (?)", [(word,) for word in _WORDS])
    nwords = len(_WORDS)
    batch = 20000
    target = size_mib * MIB
    done = 0
    while True:
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
            "INSERT INTO events (at, kind, actor, token, body) SELECT "
            " strftime('%Y-%m-%dT%H:%M:%SZ', 1700000000 + ? + x, 'unixepoch'),"
            " (SELECT word FROM w WHERE i = 1 + abs(random()) % ?),"
            " 'user' || (abs(random()) % 5000),"
            " lower(hex(randomblob(16))),"
            " (SELECT group_concat(word, ' ') FROM (SELECT word FROM w ORDER BY random() LIMIT 12))"
            "   || ' id=' || (abs(random()) % 1000000) || ' ref=' || lower(hex(randomblob(8)))"
            "   || ' ' || (SELECT group_concat(word, ' ') FROM (SELECT word FROM w ORDER BY random() LIMIT 10))"
            " FROM n", (batch, done, nwords))
        conn.execute("COMMIT")
        done += batch
        page_size, pages = (conn.execute("PRAGMA page_size").fetchone()[0],
                            conn.execute("PRAGMA page_count").fetchone()[0])
        if page_size * pages >= target:
            break
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = conn.execute("SELECT max(id) FROM events").fetchone()[0]
    conn.close()
    return {"rows": rows, "size_bytes": os.path.getsize(path)}


def run_timed(argv, timeout=None, env=None, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE):
    """Run argv; return dict(seconds, rc, maxrss_kib, maxanon_kib, timed_out, stderr). maxrss comes
    from wait4: the largest resident set of the child or any descendant it waited for (e.g. a zstd
    child), file pages it maps included. maxanon is the child's own anonymous memory (RssAnon +
    RssShmem in /proc/PID/status), sampled every 10 ms: what it allocates, without the page-cache
    pages of a file it maps (a restore maps its extracted copy for the check)."""
    _reset_peak_rss()
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    deadline = None if timeout is None else started + timeout
    timed_out = False
    err = b""
    maxanon = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        maxanon = max(maxanon, _anon_kib(proc.pid))
        if deadline is not None and time.monotonic() > deadline:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.stderr is not None:
        err = proc.stderr.read()
        proc.stderr.close()
    out = None
    if proc.stdout is not None:
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
    return {"seconds": round(seconds, 4), "rc": proc.returncode, "maxrss_kib": usage.ru_maxrss,
            "maxanon_kib": maxanon or None, "timed_out": timed_out,
            "stderr": err.decode(errors="replace")[-2000:], "stdout": out,
            "started": started, "ended": started + seconds}


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS before starting a child: a child started with vfork shares
    this process's memory until it execs, and Linux then hands this process's peak to the child,
    whose wait4 reports it as its own (the passes timed here map a snapshot for the mmap check)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:  # not Linux, or an older kernel: the peak stays as it was
        pass


def _anon_kib(pid: int) -> int:
    """RssAnon + RssShmem of a running process, in KiB (0 when it cannot be read)."""
    total = 0
    try:
        with open("/proc/%d/status" % pid, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return total


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cp_fsync(src: str, dst: str) -> float:
    """cp of a quiescent file, then fsync of the copy (the durable copy floor). Returns seconds."""
    started = time.monotonic()
    subprocess.run(["cp", src, dst], check=True)
    fsync_path(dst)
    return time.monotonic() - started


def snapshot(db: str, target: str) -> None:
    """The consistent copy every set starts from, as the engine makes it: a read transaction, then
    SQLite's one-step backup API into a scratch file without journal or fsync."""
    src = sqlite3.connect("file:%s?mode=ro" % db, uri=True, isolation_level=None, timeout=30)
    try:
        src.execute("BEGIN")
        src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        dst = sqlite3.connect(target, isolation_level=None)
        dst.execute("PRAGMA journal_mode = OFF")
        dst.execute("PRAGMA synchronous = OFF")
        src.backup(dst, pages=-1)
        dst.close()
        src.execute("COMMIT")
    finally:
        src.close()


def floor_set(db: str, out_dir: str, compression: str) -> float:
    """The least work any one-file set of ``db`` needs, done the plainest way and timed (done so, the
    ``none`` variant can take longer than the engine, whose write-back is paced; render.py uses
    it as a bound only for zstd): the snapshot, then one durable copy
    of it (``none``: a copy in 1 MiB buffers + fsync; ``zstd``: zstd -1 into the file + fsync). No
    check, no hash, no tar framing: SQLite writes a database only at offset 0 of its own file, so
    the image has to be copied once more to sit inside an archive. The scratch snapshot is removed
    before the fsync, as the engine does, so its pages never have to reach the disk. (Not ``cp``:
    its copy_file_range of a file that was just written took 1.7 to 4.6 times longer here than
    copying it through a buffer.) Returns seconds."""
    os.makedirs(out_dir, exist_ok=True)
    scratch = os.path.join(out_dir, "snapshot.db")
    final = os.path.join(out_dir, "set" + (".zst" if compression == "zstd" else ""))
    started = time.monotonic()
    snapshot(db, scratch)
    with open(final, "wb") as out:
        if compression == "zstd":
            subprocess.run(["zstd", "-q", "-1", "--check", "-c", scratch], stdout=out, check=True)
        else:
            with open(scratch, "rb") as src:
                shutil.copyfileobj(src, out, MIB)
    os.unlink(scratch)
    fsync_path(final)
    return time.monotonic() - started


class Passes:
    """Each pass a verified set (and its restore) is made of, timed alone on a snapshot of ``db``:
    the least a set needs is computed from these (render.py, verified_floors). ``names`` in the
    order of the docs; ``run(name)`` returns seconds. ``output_bytes``: the snapshot and what
    zstd -1 and -3 make of it (counted once, outside the timed passes)."""

    names = ("backup_api", "quick_check", "quick_check_mmap", "sha256", "copy_nofsync", "copy_range", "zstd_1",
             "zstd_1_t0", "zstd_3", "zstd_3_t0", "zstd_d")

    def __init__(self, db: str, work: str):
        self.db = db
        self.work = work
        self.snap = os.path.join(work, "pass-snapshot.db")
        self.packed = self.snap + ".zst"
        snapshot(db, self.snap)
        level_3 = self.snap + ".3.zst"
        subprocess.run(["zstd", "-q", "-1", "--check", "-f", "-o", self.packed, self.snap], check=True)
        subprocess.run(["zstd", "-q", "-3", "-f", "-o", level_3, self.snap], check=True)
        # sizes from the files: output read into this process would stay in its RSS, and every child
        # it starts (vfork) would report that RSS as its own peak (wait4)
        self.output_bytes = {"snapshot": os.path.getsize(self.snap), "zstd_1": os.path.getsize(self.packed),
                             "zstd_3": os.path.getsize(level_3)}
        os.unlink(level_3)

    def run(self, name: str) -> float:
        scratch = os.path.join(self.work, "pass-scratch.db")
        actions = {
            # the one-step backup API into a scratch file (no journal, no fsync), as the engine does
            "backup_api": lambda: snapshot(self.db, scratch),
            "quick_check": self._quick_check,  # as a backup checks its snapshot
            "quick_check_mmap": lambda: self._quick_check(mapped=True),  # as a restore checks its copy
            "sha256": self._sha256,
            # through a 1 MiB buffer, no fsync: the fastest a restore has its copy complete (not cp:
            # its copy_file_range of a file just written is slower here, see floor_set)
            "copy_nofsync": lambda: self._copy(scratch),
            # in the kernel (copy_file_range), no fsync: how a restore copies a member of an uncompressed set
            "copy_range": lambda: self._copy_range(scratch),
            "zstd_1": lambda: self._zstd(self.snap, "-1", "-T1"),
            "zstd_1_t0": lambda: self._zstd(self.snap, "-1", "-T0"),
            "zstd_3": lambda: self._zstd(self.snap, "-3", "-T1"),
            "zstd_3_t0": lambda: self._zstd(self.snap, "-3", "-T0"),
            "zstd_d": lambda: self._zstd(self.packed, "-d"),  # what a restore of a zstd set decodes
        }
        started = time.monotonic()
        actions[name]()
        seconds = time.monotonic() - started
        if os.path.exists(scratch):
            os.unlink(scratch)
        return seconds

    def _quick_check(self, mapped: bool = False) -> None:
        conn = sqlite3.connect("file:%s?mode=ro&immutable=1" % self.snap, uri=True)
        try:
            if mapped:
                conn.execute("PRAGMA mmap_size = %d" % (1 << 40))
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise SystemExit("quick_check of %s failed" % self.snap)
        finally:
            conn.close()

    def _sha256(self) -> None:
        digest = hashlib.sha256()
        with open(self.snap, "rb") as handle:
            for chunk in iter(lambda: handle.read(MIB), b""):
                digest.update(chunk)

    def _copy(self, target: str) -> None:
        with open(self.snap, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, MIB)

    def _copy_range(self, target: str) -> None:
        with open(self.snap, "rb") as source, open(target, "wb") as out:
            left = os.fstat(source.fileno()).st_size
            while left:
                copied = os.copy_file_range(source.fileno(), out.fileno(), min(left, 8 * MIB))
                if not copied:
                    raise SystemExit("%s shrank while it was copied" % self.snap)
                left -= copied

    @staticmethod
    def _zstd(path: str, *flags: str) -> None:
        subprocess.run(["zstd", "-q", *flags, "-c", path], stdout=subprocess.DEVNULL, check=True)


def cp_plain(src: str, dst: str) -> float:
    started = time.monotonic()
    subprocess.run(["cp", src, dst], check=True)
    return time.monotonic() - started


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def percentile(values, pct):
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(pct / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def loadavg() -> list:
    with open("/proc/loadavg", encoding="ascii") as handle:
        return [float(x) for x in handle.read().split()[:3]]


def machine(work_dir: str) -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "sqlite_python": sqlite3.sqlite_version, "date": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    info["mem_total_mib"] = int(line.split()[1]) // 1024
    except OSError:
        pass
    cli = shutil.which("sqlite3")
    if cli:
        version = subprocess.run([cli, "--version"], check=False, capture_output=True, text=True)
        info["sqlite_cli"] = version.stdout.split()[0]
    zstd = shutil.which("zstd")
    if zstd:
        text = subprocess.run([zstd, "--version"], check=False, capture_output=True, text=True).stdout
        info["zstd"] = next((word.rstrip(",") for word in text.split() if word.startswith("v")), text.strip())
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    df = subprocess.run(["df", "-hT", work_dir], check=False, capture_output=True, text=True).stdout
    df = df.strip().splitlines()
    if len(df) > 1:
        fields = df[-1].split()
        info["disk"] = "%s (%s, %s, %s free)" % (work_dir, fields[0], fields[1], fields[4])
    info["loadavg"] = loadavg()
    return info


@contextlib.contextmanager
def scratch_dir(name: str, parent: str | None = None):
    """A bench's work directory (under ``parent`` or the system temp dir), removed when it ends."""
    work = tempfile.mkdtemp(prefix="bench-%s-" % name, dir=parent)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_json(path: str | None, data) -> None:
    """The bench's result: to ``path`` (atomically), or to stdout when no path is given."""
    if not path:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(path + ".tmp", path)


def log(msg: str) -> None:
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()
