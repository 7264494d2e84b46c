# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared helpers of the reliability suite: real databases, real processes, no mocks."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
COLLECTION = HERE.parents[1]                # .../ansible_collections/runbook/sqlite_app
BUILD = str(HERE.parents[4])                # the root that holds ansible_collections/
PYTHON = sys.executable
SOAK = os.environ.get("RUNBOOK_SOAK", "") not in ("", "0", "false", "no")
RUNS = 50 if SOAK else 10                   # kills per crash fault
FUZZ_EXAMPLES = 400 if SOAK else 50         # hypothesis examples per module / parser
TEMP_PREFIX = ".runbook-tmp-"
MU = "ansible_collections.runbook.sqlite_app.plugins.module_utils"

FIGURES: dict = {}


def record(name: str, **values) -> None:
    """Add to the suite's figures (summed per key)."""
    entry = FIGURES.setdefault(name, {})
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            entry[key] = entry.get(key, 0) + value
        else:
            entry[key] = value


def env() -> dict:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = BUILD + (os.pathsep + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    return environ


def engine_cmd(module: str, *args: str) -> list[str]:
    """python -c running ``cli()`` of one engine with the given argv."""
    code = ("import sys; sys.path.insert(0, %r); from %s.%s import cli; sys.exit(cli())" % (BUILD, MU, module))
    return [PYTHON, "-c", code, *args]


def write_json(path, data) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    return str(path)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_published(path) -> dict:
    """A published set, checked in full: every member and the manifest against SHA256SUMS (the
    engine's verify_set, which from set format 3 on does not hash the whole file), and the whole
    file against its .sha256. Returns the manifest."""
    bs = importlib.import_module(MU + "._backupset")  # from the tree the test modules put on sys.path
    manifest = bs.verify_set(str(path))
    assert bs.read_sidecar(str(path)) == sha256(path), "%s does not match its .sha256" % path
    return manifest


def make_db(path, mib: float = 0.1, journal_mode: str = "wal", seed: int = 0, tag: str = "") -> str:
    """A database with an ``items`` table of incompressible blobs (``mib`` MiB) and a ``log`` table
    for numbered rows; closed cleanly (no -wal left behind)."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=%s" % journal_mode)
    conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, tag TEXT, body BLOB)")
    conn.execute("CREATE TABLE IF NOT EXISTS log (n INTEGER PRIMARY KEY, at REAL)")
    rows = max(1, int(mib * 1024 * 1024 / 4096))
    conn.execute("BEGIN")
    block = hashlib.sha256(b"%d" % seed).digest()
    for i in range(rows):
        body = hashlib.shake_256(block + i.to_bytes(8, "big")).digest(4000)
        conn.execute("INSERT INTO items (tag, body) VALUES (?, ?)", (tag, body))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return str(path)


def integrity(path, immutable: bool = False) -> list[str]:
    """integrity_check; ``immutable`` reads a closed database without creating -wal/-shm files."""
    conn = sqlite3.connect("file:%s?%s" % (path, "immutable=1" if immutable else "mode=ro"), uri=True)
    try:
        return [row[0] for row in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


def log_rows(path) -> set[int]:
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT n FROM log")}
    finally:
        conn.close()


def temps(directory) -> list[str]:
    try:
        return sorted(name for name in os.listdir(directory) if name.startswith(TEMP_PREFIX))
    except FileNotFoundError:
        return []


WRITER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("PRAGMA busy_timeout=30000")
n = int(sys.argv[2])
print("ready", flush=True)
while True:
    n += 1
    conn.execute("INSERT INTO log (n, at) VALUES (?, ?)", (n, time.time()))
    print(n, flush=True)   # reported only after the commit returned
    time.sleep(0.002)
"""


class Writer:
    """An application process committing numbered rows; ``committed`` is what it reported."""

    def __init__(self, db: str, start: int = 0):
        self.proc = subprocess.Popen([PYTHON, "-c", WRITER, db, str(start)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def stop(self) -> set[int]:
        died = self.proc.poll()   # a writer that died on its own wrote nothing during the fault
        self.proc.send_signal(signal.SIGKILL)   # an app crash: only what it reported counts
        out, _err = self.proc.communicate()
        assert died is None, "the writer process exited early (rc %s)" % died
        return {int(line) for line in out.split() if line.isdigit()}


def run_timed(cmd, timeout=120, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), check=False, **kwargs)
    return proc, time.monotonic() - started


def list_dir(directory) -> list[str]:
    return sorted(os.listdir(directory))


def require(condition, why: str) -> None:
    """Skip when a tool or privilege the test needs is missing, except in CI (``CI=true``): .ci/run
    installs everything and runs as root, so a missing tool there is a broken CI image, not a skip."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true and this test cannot run: %s" % why, pytrace=False)
    pytest.skip(why)


def require_module(name: str):
    """``pytest.importorskip`` through ``require``: a missing module fails the run in CI."""
    try:
        return __import__(name)
    except ImportError as exc:
        require(False, "python module %s not importable: %s" % (name, exc))


def require_tools(*names: str) -> None:
    missing = [name for name in names if not shutil.which(name)]
    require(not missing, "not installed: %s" % ", ".join(missing))


class Watch:
    """What ``watch_run`` saw of one run: seconds from the start (``None`` when never seen)."""

    def __init__(self):
        self.first_temp = None      # a ``.runbook-tmp-*`` entry first seen in the watched directory
        self.last_temp = None       # last poll that still saw one
        self.ended = None           # the process exited on its own (or was reaped after the kill)
        self.killed_at = None       # SIGKILL sent while the process was still running
        self.returncode = None
        self.stderr = ""

    @property
    def landed(self) -> bool:
        """The kill hit a running process."""
        return self.killed_at is not None

    @property
    def in_window(self) -> bool:
        """The kill hit a running process after it had created its first temp file."""
        return self.killed_at is not None and self.first_temp is not None


def watch_run(cmd, directory, kill_after: float | None = None, poll: float = 0.0005,
              timeout: float = 120) -> Watch:
    """Start ``cmd`` and poll ``directory`` (every ``poll`` s) for the engine's temp entries.

    ``kill_after``: SIGKILL the process that many seconds after its first temp entry appeared (a
    real kill of the real engine, timed from what it visibly did); ``None`` lets it finish, which
    measures the window. A run that never makes a temp entry is not killed.
    """
    seen = Watch()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    started = time.monotonic()
    try:
        while proc.poll() is None:
            now = time.monotonic() - started
            if now > timeout:
                raise AssertionError("%s still running after %ss" % (cmd[-1], timeout))
            try:
                has_temp = any(name.startswith(TEMP_PREFIX) for name in os.listdir(directory))
            except FileNotFoundError:
                has_temp = False
            if has_temp:
                if seen.first_temp is None:
                    seen.first_temp = now
                seen.last_temp = now
            if kill_after is not None and seen.first_temp is not None:
                # sleep straight to the chosen moment (polling would round it up to the interval)
                time.sleep(max(0.0, started + seen.first_temp + kill_after - time.monotonic()))
                if proc.poll() is None:
                    proc.kill()
                    seen.killed_at = time.monotonic() - started
                break
            time.sleep(poll)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        seen.ended = time.monotonic() - started
        seen.returncode = proc.returncode
        seen.stderr = proc.stderr.read().decode("utf-8", "replace")
        proc.stderr.close()
    return seen
