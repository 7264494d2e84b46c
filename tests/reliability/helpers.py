# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Shared helpers of the reliability suite: real databases, real processes, no mocks."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time

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
        self.proc.send_signal(signal.SIGKILL)   # an app crash: only what it reported counts
        out, _err = self.proc.communicate()
        return {int(line) for line in out.split() if line.isdigit()}


def run_timed(cmd, timeout=120, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), check=False, **kwargs)
    return proc, time.monotonic() - started


def kill_at(cmd, delay: float) -> tuple[bool, subprocess.Popen]:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds; True when it was still running (kill landed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env())
    time.sleep(delay)
    landed = proc.poll() is None
    if landed:
        proc.kill()
    proc.wait()
    proc.stderr.close()
    return landed, proc


def list_dir(directory) -> list[str]:
    return sorted(os.listdir(directory))
