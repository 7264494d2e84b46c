# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: the sqlite_vacuum engine against the same SQL through the sqlite3 CLI.

Builds a database of about --size-mib MiB, deletes every other row (a ~50% freelist), makes two
identical copies, then times
  * engine: maintain(check=quick_check, checkpoint=passive, vacuum=always, analyze=analyze)
  * module: the same options through Ansible, ``ansible localhost -m runbook.sqlite_app.sqlite_vacuum``
            (what a user's task costs: Ansible start-up, module packaging and the engine; needs --ansible)
  * cli:    sqlite3 DB 'PRAGMA quick_check; VACUUM; ANALYZE; PRAGMA wal_checkpoint(PASSIVE);'
plus, each run, ``ansible localhost -m ansible.builtin.ping`` (Ansible's fixed cost for one task),
and prints one JSON object. With --runs N it does N rounds on fresh copies of the built database,
alternating which method goes first; engine_vs_cli is then the median ratio. Run from a collection
tree (tools/collection-tree.sh) or with the collection on PYTHONPATH; figures go to
docs/BENCHMARKS.md, never into tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _benchlib as lib  # noqa: E402


def _import_engine():
    try:
        from ansible_collections.runbook.sqlite_app.plugins.module_utils import _maintenance
    except ImportError:
        # bench/ inside ROOT/ansible_collections/runbook/sqlite_app: put ROOT on the path.
        root = os.path.abspath(os.path.join(HERE, "..", "..", "..", ".."))
        sys.path.insert(0, root)
        try:
            from ansible_collections.runbook.sqlite_app.plugins.module_utils import _maintenance
        except ImportError:
            sys.exit("cannot import the collection: run from a tree made by tools/collection-tree.sh "
                     "or put its root on PYTHONPATH")
    return _maintenance


def build(path: str, size_mib: int) -> dict:
    row_bytes = 1024
    rows = max(1000, size_mib * 1024 * 1024 // (row_bytes + 360))  # ~1.4 KiB of file per row
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = wal")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, at INTEGER, body BLOB)")
    conn.execute("CREATE INDEX events_kind_at ON events (kind, at)")
    batch = 10000
    for start in range(0, rows, batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events (kind, at, body) VALUES (?, ?, randomblob(?))",
                         [(f"k{i % 17}", i, row_bytes) for i in range(start, min(rows, start + batch))])
        conn.execute("COMMIT")
    conn.execute("DELETE FROM events WHERE id % 2 = 0")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    stats = {name: conn.execute(f"PRAGMA {name}").fetchone()[0]
             for name in ("page_size", "page_count", "freelist_count")}
    conn.close()
    stats["rows"] = rows
    stats["size_bytes"] = os.path.getsize(path)
    return stats


def run_engine(engine, path: str) -> dict:
    started = time.perf_counter()
    result = engine.maintain([path], check="quick_check", checkpoint="passive", vacuum="always", analyze="analyze")
    seconds = time.perf_counter() - started
    report = result["databases"][0]
    return {"seconds": round(seconds, 3), "size_after": os.path.getsize(path),
            "bytes_reclaimed": report["bytes_reclaimed"]}


def run_module(ansible_bin: str, path: str, module: str = "runbook.sqlite_app.sqlite_vacuum") -> dict:
    args = json.dumps({"databases": [path], "check": "quick_check", "checkpoint": "passive",
                       "vacuum": "always", "analyze": "analyze"}) if module.endswith("sqlite_vacuum") else ""
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=os.environ.get("BENCH_COLLECTION_ROOT", ""),
               ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false")
    started = time.perf_counter()
    done = subprocess.run([ansible_bin, "localhost", "-c", "local", "-i", "localhost,", "-o",
                           "-m", module] + (["-a", args] if args else []),
                          capture_output=True, text=True, check=False, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr).strip()[-2000:]}
    return {"seconds": round(seconds, 3), "size_after": os.path.getsize(path)}


def run_cli(sqlite3_bin: str, path: str) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sqlite3_bin, path, "PRAGMA quick_check; VACUUM; ANALYZE; PRAGMA wal_checkpoint(PASSIVE);"],
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": done.stderr.strip()}
    return {"seconds": round(seconds, 3), "size_after": os.path.getsize(path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--size-mib", type=int, default=256, help="approximate database size (default 256)")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed afterwards)")
    parser.add_argument("--sqlite3", default=shutil.which("sqlite3"), help="sqlite3 CLI (default: from PATH)")
    parser.add_argument("--ansible", default=shutil.which("ansible"),
                        help="ansible CLI for the module method (default: from PATH; skipped when absent)")
    parser.add_argument("--runs", type=int, default=1, help="interleaved engine/CLI rounds (default 1)")
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    args = parser.parse_args(argv)
    engine = _import_engine()
    with lib.scratch_dir("vacuum", args.dir) as work:
        source = os.path.join(work, "source.db")
        started = time.perf_counter()
        built = build(source, args.size_mib)
        build_seconds = time.perf_counter() - started
        runs = []
        for run in range(args.runs):
            # a fresh copy of the freshly built database per method and run (same freelist every
            # time); the order alternates so neither method always runs second
            row = {}
            order = ["engine", "sqlite3_cli"] + (["module"] if args.ansible else [])
            order = order[run % len(order):] + order[:run % len(order)]  # rotate who goes first
            for name in order:
                db = os.path.join(work, name + ".db")
                shutil.copyfile(source, db)
                if name == "engine":
                    row[name] = run_engine(engine, db)
                elif name == "module":
                    row[name] = run_module(args.ansible, db)
                else:
                    row[name] = (run_cli(args.sqlite3, db) if args.sqlite3 else {"error": "sqlite3 CLI not found"})
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(db + suffix):
                        os.unlink(db + suffix)
            if args.ansible:
                # Ansible's own fixed cost for one task (start-up, inventory, module transfer), with a
                # module that does nothing: what "module" costs beyond the engine comes from here.
                row["ansible_ping"] = run_module(args.ansible, source, module="ansible.builtin.ping")
            if row["sqlite3_cli"].get("seconds"):
                row["engine_vs_cli"] = round(row["engine"]["seconds"] / row["sqlite3_cli"]["seconds"], 3)
                if row.get("module", {}).get("seconds"):
                    row["module_vs_cli"] = round(row["module"]["seconds"] / row["sqlite3_cli"]["seconds"], 3)
            runs.append(row)
        os.unlink(source)
        result = {
            "bench": "vacuum",
            "size_mib": args.size_mib,
            "database": built,
            "build_seconds": round(build_seconds, 3),
            "runs": runs,
            "engine": runs[0]["engine"],
            "sqlite3_cli": runs[0]["sqlite3_cli"],
            "sqlite_version": sqlite3.sqlite_version,
            "python": platform.python_version(),
        }
        ratios = [row["engine_vs_cli"] for row in runs if "engine_vs_cli" in row]
        if ratios:
            result["engine_vs_cli"] = round(statistics.median(ratios), 3)
        module_ratios = [row["module_vs_cli"] for row in runs if "module_vs_cli" in row]
        if module_ratios:
            result["module_vs_cli"] = round(statistics.median(module_ratios), 3)
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
