# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: each pass a verified backup set needs, timed alone next to the cp floor.

On one warm --size-mib WAL database, rounds interleaved and rotated:
  cp:           cp + fsync of the database file (the floor the targets are relative to)
  backup_api:   SQLite's one-step backup API into a scratch file (no journal, no fsync): the
                consistent snapshot, which must exist before the set can be written
  quick_check:  PRAGMA quick_check of that snapshot
  sha256:       hashlib.sha256 of that snapshot
  zstd_1, zstd_1_t0, zstd_3, zstd_3_t0: the zstd binary compressing the snapshot to /dev/null
                (-T0: one thread per core; level 1 single-threaded is the engine's default);
                output_bytes: what -1 and -3 write, measured once outside the timed rounds
  zstd_d:       zstd -d of the snapshot's level-1 output to /dev/null (what a restore of a zstd set
                decodes)
  copy_nofsync: the snapshot copied through a 1 MiB buffer, no fsync: the fastest a restore can have
                its extracted copy complete for the check (not cp: its copy_file_range of a file that
                was just written is slower here, see lib.floor_set)
Lower bounds for a verified set and for its restore follow from these (render.py, "The least a
verified set needs"). Prints/writes one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as lib  # noqa: E402


def quick_check(path: str) -> None:
    conn = sqlite3.connect("file:%s?mode=ro&immutable=1" % path, uri=True)
    try:
        if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise SystemExit("quick_check of %s failed" % path)
    finally:
        conn.close()


def sha256(path: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(lib.MIB), b""):
            digest.update(chunk)


def copy_buffered(src: str, dst: str) -> None:
    with open(src, "rb") as source, open(dst, "wb") as target:
        shutil.copyfileobj(source, target, lib.MIB)


def zstd(path: str, *flags: str) -> None:
    subprocess.run(["zstd", "-q", *flags, "-c", path], stdout=subprocess.DEVNULL, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with lib.scratch_dir("floor", args.dir) as work:
        db = os.path.join(work, "app.db")
        lib.build_text_db(db, args.size_mib)
        snap = os.path.join(work, "snapshot.db")
        lib.snapshot(db, snap)
        packed = os.path.join(work, "snapshot.db.zst")
        subprocess.run(["zstd", "-q", "-1", "--check", "-o", packed, snap], check=True)
        methods = {
            "cp": lambda: lib.cp_fsync(db, os.path.join(work, "cp.db")),
            "backup_api": lambda: lib.snapshot(db, os.path.join(work, "again.db")),
            "quick_check": lambda: quick_check(snap),
            "sha256": lambda: sha256(snap),
            "zstd_3": lambda: zstd(snap, "-3", "-T1"),
            "zstd_3_t0": lambda: zstd(snap, "-3", "-T0"),
            "zstd_1": lambda: zstd(snap, "-1", "-T1"),
            "zstd_1_t0": lambda: zstd(snap, "-1", "-T0"),
            "zstd_d": lambda: zstd(packed, "-d"),
            "copy_nofsync": lambda: copy_buffered(snap, os.path.join(work, "cp.db")),
        }
        names = list(methods)
        result = {"bench": "floor", "size_mib": args.size_mib, "runs": args.runs, "machine": lib.machine(work),
                  "seconds": {name: [] for name in names}}
        for run in range(args.runs):
            for name in names[run % len(names):] + names[:run % len(names)]:
                for leftover in ("cp.db", "again.db"):
                    if os.path.exists(os.path.join(work, leftover)):
                        os.unlink(os.path.join(work, leftover))
                started = time.monotonic()
                methods[name]()
                seconds = round(time.monotonic() - started, 4)
                result["seconds"][name].append(seconds)
                lib.log("floor %d MiB run %d %-12s %.2f s" % (args.size_mib, run + 1, name, seconds))
        # what each level writes (outside the timed rounds: counting bytes is not free)
        result["output_bytes"] = {"snapshot": os.path.getsize(snap)}
        for level in ("1", "3"):
            out = subprocess.run(["zstd", "-q", "-" + level, "-c", snap], stdout=subprocess.PIPE, check=True)
            result["output_bytes"]["zstd_" + level] = len(out.stdout)
        result["machine"]["loadavg_end"] = lib.loadavg()
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
