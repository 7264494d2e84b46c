# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: backup, restore and drill of a WAL database, idle and under a steady writer.

For one size, builds a WAL database of text-like rows, then for each of --runs rounds runs every
method side by side (the order rotates each round):
  idle:   cp (+fsync) floor, sqlite3 CLI .backup, VACUUM INTO, engine compression none/gzip/zstd,
          and the least work a set needs done the plainest way (floor_none, floor_zstd: the
          snapshot, then one durable copy; see lib.floor_set)
  loaded: the same (cp excluded: not consistent on a live file) while a separate writer process
          commits small transactions at --rate per second and records each commit's latency;
          a "baseline" window with no backup gives the writer's own p99
  restore: engine restore (verification included) of the none and zstd sets vs cp+fsync; drill
  passes:  each pass a verified set and its restore are made of, timed alone on a snapshot of the
           database (lib.Passes: backup API, quick_check, sha256, a buffered copy, zstd -1/-3 with one
           thread and with every core, zstd -d); render.py computes the least a verified set needs
           from these, against this round's cp
Engines run as `cli()` subprocesses; peak RSS comes from wait4. Prints/writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as lib  # noqa: E402


# ------------------------------------------------------------------------------------------------
# the steady writer (a separate process: python3 bench_backup.py --writer DB OUT RATE)


def writer_main(db: str, out: str, rate: float) -> int:
    stop = {"flag": False}

    def _stop(*_):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")
    starts, lats = [], []
    interval = 1.0 / rate
    nxt = time.monotonic()
    errors = 0
    while not stop["flag"]:
        now = time.monotonic()
        if now < nxt:
            time.sleep(nxt - now)
        nxt += interval
        started = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO writes (at, note) VALUES (?, ?)", (started, "x" * 100))
            conn.execute("COMMIT")
        except sqlite3.Error:
            errors += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        starts.append(started)
        lats.append(time.monotonic() - started)
        if nxt < time.monotonic() - 1.0:  # fell more than 1 s behind: do not burst to catch up
            nxt = time.monotonic()
    conn.close()
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"starts": starts, "lats": lats, "errors": errors}, handle)
    return 0


class Writer:
    def __init__(self, db: str, rate: float, work: str):
        self.out = os.path.join(work, "writer-%d.json" % time.monotonic_ns())
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--writer", db, self.out,
                                      str(rate)])
        time.sleep(1.0)  # warm up

    def stop(self) -> dict:
        time.sleep(0.3)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        with open(self.out, encoding="utf-8") as handle:
            data = json.load(handle)
        os.unlink(self.out)
        return data


def window(data: dict, t0: float, t1: float) -> dict:
    lats = [lat for start, lat in zip(data["starts"], data["lats"]) if t0 <= start <= t1]
    # a commit that started before t1 but was still waiting at t1 is included by its start time
    if not lats:
        return {"commits": 0}
    return {"commits": len(lats), "rate": round(len(lats) / max(t1 - t0, 1e-6), 1),
            "p50_ms": round(lib.percentile(lats, 50) * 1000, 2), "p99_ms": round(lib.percentile(lats, 99) * 1000, 2),
            "p999_ms": round(lib.percentile(lats, 99.9) * 1000, 2), "max_ms": round(max(lats) * 1000, 2),
            "over_50ms": sum(1 for lat in lats if lat > 0.05), "errors": data["errors"]}


# ------------------------------------------------------------------------------------------------
# methods


def _clean(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def m_cp(db, out, **_):
    seconds = lib.cp_fsync(db, out)
    return {"seconds": round(seconds, 4), "rc": 0}


def m_cp_plain(db, out, **_):
    return {"seconds": round(lib.cp_plain(db, out), 4), "rc": 0}


def m_cli_backup(db, out, timeout=None, **_):
    return lib.run_timed(["sqlite3", db, ".timeout 30000", ".backup '%s'" % out], timeout=timeout)


def m_vacuum_into(db, out, timeout=None, **_):
    return lib.run_timed(["sqlite3", db, ".timeout 30000", "VACUUM INTO '%s'" % out], timeout=timeout)


def m_engine(db, out, compression="zstd", work=None, timeout=None, **_):
    os.makedirs(out)
    cfg = os.path.join(work, "backup-%s.json" % compression)
    with open(cfg, "w", encoding="utf-8") as handle:
        json.dump({"databases": [db], "dest": out, "compression": compression, "check": "quick_check"}, handle)
    res = lib.run_timed([sys.executable, "-c", lib.CLI, "backup", "--config", cfg], timeout=timeout,
                        env=lib.engine_env(), stdout=subprocess.PIPE)
    if res["rc"] == 0 and res["stdout"]:
        result = json.loads(res["stdout"])
        res["set"] = result["name"]
        res["set_size"] = result["size"]
    res.pop("stdout", None)
    return res


def m_floor(db, out, compression="none", **_):
    return {"seconds": round(lib.floor_set(db, out, compression), 4), "rc": 0}


METHODS = {
    "cp": m_cp,
    "floor_none": lambda db, out, **kw: m_floor(db, out, compression="none"),
    "floor_zstd": lambda db, out, **kw: m_floor(db, out, compression="zstd"),
    "cp_nofsync": m_cp_plain,
    "sqlite3_backup": m_cli_backup,
    "vacuum_into": m_vacuum_into,
    "engine_none": lambda db, out, **kw: m_engine(db, out, compression="none", **kw),
    "engine_gzip": lambda db, out, **kw: m_engine(db, out, compression="gzip", **kw),
    "engine_zstd": lambda db, out, **kw: m_engine(db, out, compression="zstd", **kw),
}


def restore_run(set_dir: str, set_name: str, scratch: str, work: str, mode: str) -> dict:
    cfg = os.path.join(work, "restore.json")
    params = {"src": set_dir, "set": set_name}
    if mode == "drill":
        params["drill_dir"] = scratch
    else:
        params.update({"dest_root": scratch, "force": True})
    with open(cfg, "w", encoding="utf-8") as handle:
        json.dump(params, handle)
    res = lib.run_timed([sys.executable, "-c", lib.CLI, mode, "--config", cfg], env=lib.engine_env())
    res.pop("stdout", None)
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--writer", nargs=3, metavar=("DB", "OUT", "RATE"), help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0, help="writer commits per second (default 500)")
    parser.add_argument("--gzip-max-mib", type=int, default=256, help="run compression=gzip up to this size")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    parser.add_argument("--keep-db", default=None, help="copy the built database here (for bench_app.py)")
    args = parser.parse_args(argv)
    if args.writer:
        return writer_main(args.writer[0], args.writer[1], float(args.writer[2]))

    with lib.scratch_dir("backup", args.dir) as work:
        db = os.path.join(work, "src", "app.db")
        os.makedirs(os.path.dirname(db))
        lib.log("backup %d MiB: building the database" % args.size_mib)
        started = time.monotonic()
        built = lib.build_text_db(db, args.size_mib)
        built["build_seconds"] = round(time.monotonic() - started, 2)
        result = {"bench": "backup", "size_mib": args.size_mib, "runs": args.runs, "rate": args.rate,
                  "database": built, "machine": lib.machine(work), "idle": {}, "loaded": {},
                  "restore": {}, "notes": []}
        idle_methods = ["cp", "cp_nofsync", "sqlite3_backup", "vacuum_into", "engine_none", "engine_zstd",
                        "floor_none", "floor_zstd"]
        if args.size_mib <= args.gzip_max_mib:
            idle_methods.append("engine_gzip")
        loaded_methods = ["baseline", "engine_none", "engine_zstd", "vacuum_into", "sqlite3_backup", "floor_none"]
        for name in idle_methods:
            result["idle"][name] = []
        for name in loaded_methods:
            result["loaded"][name] = []
        for name in ("restore_none", "restore_zstd", "cp_restore", "drill_zstd"):
            result["restore"][name] = []
        passes = lib.Passes(db, work)
        result["passes"] = {name: [] for name in passes.names}
        result["output_bytes"] = passes.output_bytes
        loads = []
        for run in range(args.runs):
            # ---- idle, rotated order
            shift = run % len(idle_methods)
            order = idle_methods[shift:] + idle_methods[:shift]
            keep_sets = {}
            for name in order:
                out = os.path.join(work, "out-" + name)
                _clean(out)
                res = METHODS[name](db, out, work=work, timeout=600)
                res.pop("started", None)
                res.pop("ended", None)
                res["load"] = lib.loadavg()[0]
                result["idle"][name].append(res)
                lib.log("backup %d MiB run %d idle %-15s %.2f s rc=%s rss=%s KiB" % (
                    args.size_mib, run + 1, name, res["seconds"], res.get("rc"), res.get("maxrss_kib")))
                if name in ("engine_none", "engine_zstd") and res.get("rc") == 0:
                    keep_sets[name] = (out, res["set"])
                else:
                    _clean(out)
            # ---- restore / drill from this round's sets, side by side with cp
            rorder = ["restore_none", "restore_zstd", "cp_restore", "drill_zstd"]
            rorder = rorder[run % 4:] + rorder[:run % 4]
            for name in rorder:
                scratch = os.path.join(work, "restore-" + name)
                _clean(scratch)
                os.makedirs(scratch)
                if name == "cp_restore":
                    res = {"seconds": round(lib.cp_fsync(db, os.path.join(scratch, "app.db")), 4), "rc": 0}
                else:
                    key = "engine_zstd" if name.endswith("zstd") else "engine_none"
                    if key not in keep_sets:
                        continue
                    res = restore_run(keep_sets[key][0], keep_sets[key][1], scratch, work,
                                      "drill" if name.startswith("drill") else "restore")
                result["restore"][name].append(res)
                lib.log("backup %d MiB run %d %-15s %.2f s rc=%s rss=%s KiB %s" % (
                    args.size_mib, run + 1, name, res["seconds"], res.get("rc"), res.get("maxrss_kib"),
                    res.get("stderr", "")[:200]))
                _clean(scratch)
            for out, _name in keep_sets.values():
                _clean(out)
            # ---- each pass alone, rotated
            shift = run % len(passes.names)
            for name in passes.names[shift:] + passes.names[:shift]:
                seconds = passes.run(name)
                result["passes"][name].append(round(seconds, 4))
                lib.log("backup %d MiB run %d pass %-13s %.2f s" % (args.size_mib, run + 1, name, seconds))
            # ---- under a steady writer
            ours = [r["seconds"] for r in result["idle"]["engine_none"] if r.get("rc") == 0]
            cli_timeout = min(120.0, max(30.0, 3 * max(ours or [10.0])))
            shift = run % len(loaded_methods)
            order = loaded_methods[shift:] + loaded_methods[:shift]
            for name in order:
                out = os.path.join(work, "out-" + name)
                _clean(out)
                writer = Writer(db, args.rate, work)
                if name == "baseline":
                    t0 = time.monotonic()
                    time.sleep(3.0)
                    res = {"seconds": 3.0, "rc": 0}
                    t1 = time.monotonic()
                else:
                    t0 = time.monotonic()
                    res = METHODS[name](db, out, work=work,
                                        timeout=cli_timeout if name == "sqlite3_backup" else 600)
                    t1 = time.monotonic()
                data = writer.stop()
                res.pop("started", None)
                res.pop("ended", None)
                res["writer"] = window(data, t0, t1)
                res["load"] = lib.loadavg()[0]
                if name == "sqlite3_backup":
                    res["timeout"] = cli_timeout
                result["loaded"][name].append(res)
                lib.log("backup %d MiB run %d load %-15s %.2f s rc=%s timed_out=%s writer=%s" % (
                    args.size_mib, run + 1, name, res["seconds"], res.get("rc"), res.get("timed_out"),
                    res["writer"]))
                _clean(out)
            # the writer added rows: checkpoint so every round starts from a quiescent, checkpointed file
            conn = sqlite3.connect(db)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            loads.append(lib.loadavg())
        result["loadavg_after_runs"] = loads
        result["machine"]["loadavg_end"] = lib.loadavg()
        if args.keep_db:
            shutil.copyfile(db, args.keep_db)
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
