# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: the sample app under HTTP load, with and without a concurrent backup.

Starts examples/sample_app/sample_app.py on 127.0.0.1 (loopback only, TLS off) on a copy of a
bench database of ~--size-mib MiB (the bulk lives in an `events` table; the app's own `items` table
stays small, so /readyz's count(*) stays cheap). Then, for --runs rounds, alternating which phase
goes first, two phases of --seconds each with --threads client threads, each looping
POST /items + GET /readyz over keep-alive HTTP/1.1:
  * without backup
  * with the engine (compression zstd) backing up the database back to back for the whole phase
Reports requests, errors (anything but 200/201, or a socket error) and latency percentiles.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as lib  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
APP = os.path.join(REPO, "examples", "sample_app", "sample_app.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client(port, stop_at, lats, errors, lock):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"body": "bench item " + "x" * 200, "tags": "bench"})
    mine, errs = [], 0
    while time.monotonic() < stop_at:
        for method, path, payload in (("POST", "/items", body), ("GET", "/readyz", None)):
            started = time.monotonic()
            try:
                conn.request(method, path, body=payload,
                             headers={"Content-Type": "application/json"} if payload else {})
                resp = conn.getresponse()
                resp.read()
                if resp.status not in (200, 201):
                    errs += 1
            except (OSError, http.client.HTTPException):
                errs += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            mine.append(time.monotonic() - started)
    conn.close()
    with lock:
        lats.extend(mine)
        errors.append(errs)


def phase(port, seconds, threads, backup_cfg, work):
    lats, errors, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + seconds
    workers = [threading.Thread(target=client, args=(port, stop_at, lats, errors, lock)) for _thread in range(threads)]
    for worker in workers:
        worker.start()
    backups = []
    if backup_cfg:
        dest = json.load(open(backup_cfg, encoding="utf-8"))["dest"]
        while time.monotonic() < stop_at:
            res = lib.run_timed([sys.executable, "-c", lib.CLI, "backup", "--config", backup_cfg],
                                env=lib.engine_env())
            backups.append({"seconds": res["seconds"], "rc": res["rc"], "stderr": res["stderr"][:300]})
            for name in os.listdir(dest):  # keep the disk use bounded: one set at a time
                if not name.startswith("."):
                    os.unlink(os.path.join(dest, name))
    for worker in workers:
        worker.join()
    return {"requests": len(lats), "errors": sum(errors), "rps": round(len(lats) / seconds, 1),
            "p50_ms": round(lib.percentile(lats, 50) * 1000, 2), "p99_ms": round(lib.percentile(lats, 99) * 1000, 2),
            "max_ms": round(max(lats) * 1000, 2), "backups": backups, "load": lib.loadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--db", default=None, help="a bench database to copy (default: build one)")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-app-", dir=args.dir)
    server = None
    try:
        data = os.path.join(work, ".data")
        os.makedirs(data)
        db = os.path.join(data, "app.db")
        if args.db:
            shutil.copyfile(args.db, db)
        else:
            lib.log("app: building a %d MiB database" % args.size_mib)
            lib.build_text_db(db, args.size_mib)
        env = dict(os.environ, SAMPLE_APP_DATA_DIR=data, SAMPLE_APP_TLS="off", HMAC_SECRET=secrets.token_hex(16),
                   SAMPLE_APP_LISTEN="127.0.0.1:%d" % free_port())
        # The app refuses to adopt a database with tables and user_version 0: apply its own
        # migrations (imported from sample_app.py) next to the bulk events table.
        sys.path.insert(0, os.path.dirname(APP))
        import sample_app  # noqa: E402 pylint: disable=import-outside-toplevel
        conn = sqlite3.connect(db, isolation_level=None)
        for target, statements in sample_app.shipped_migrations():
            for statement in statements:
                conn.execute(statement)
            conn.execute("PRAGMA user_version = %d" % target)
        conn.close()
        subprocess.run([sys.executable, APP, "migrate"], env=env, check=True, capture_output=True)
        port = int(env["SAMPLE_APP_LISTEN"].rsplit(":", 1)[1])
        server = subprocess.Popen([sys.executable, APP, "serve"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        for _attempt in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        dest = os.path.join(work, "sets")
        os.makedirs(dest)
        cfg = os.path.join(work, "backup.json")
        with open(cfg, "w", encoding="utf-8") as handle:
            json.dump({"databases": [db], "dest": dest, "compression": "zstd"}, handle)
        result = {"bench": "app", "size_bytes": os.path.getsize(db), "seconds": args.seconds,
                  "threads": args.threads, "runs": [], "machine": lib.machine(work)}
        for run in range(args.runs):
            row = {}
            for name in (("without", "with") if run % 2 == 0 else ("with", "without")):
                row[name] = phase(port, args.seconds, args.threads, cfg if name == "with" else None, work)
                shown = {k: v for k, v in row[name].items() if k != "backups"}
                lib.log("app run %d %s backup: %s" % (run + 1, name, shown))
            result["runs"].append(row)
        result["size_bytes_end"] = os.path.getsize(db)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
