# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: what writing a large file on the same disk does to a SQLite writer's commits.

The reference for the "worst writer stall" target: a steady writer (the one bench_backup.py uses)
commits to a small WAL database while, in rotated order each round,
  baseline: nothing else runs (3 s);
  cp:       cp of an unrelated --size-mib file on the same filesystem, then fsync of the copy;
  paced:    the same bytes written in 1 MiB writes with an fdatasync every 32 MiB in the writing
            thread (how the backup engine writes a set back since it was changed to do so).
No SQLite snapshot is involved, so any stall here is the disk's, not a lock's. Prints/writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as lib  # noqa: E402
from bench_backup import Writer, window  # noqa: E402

STEP = 32 * lib.MIB


def paced_copy(src: str, dst: str) -> float:
    started = time.monotonic()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pending = 0
        with open(src, "rb") as source:
            for chunk in iter(lambda: source.read(lib.MIB), b""):
                os.write(fd, chunk)
                pending += len(chunk)
                if pending >= STEP:
                    os.fdatasync(fd)
                    pending = 0
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with lib.scratch_dir("contention", args.dir) as work:
        db = os.path.join(work, "app.db")
        lib.build_text_db(db, 16)
        src = os.path.join(work, "unrelated.bin")
        with open(src, "wb") as handle:  # incompressible bytes nobody else touches
            for _dummy in range(args.size_mib):
                handle.write(os.urandom(lib.MIB))
            handle.flush()
            os.fsync(handle.fileno())
        dst = os.path.join(work, "copy.bin")
        methods = ["baseline", "cp", "paced"]
        result = {"bench": "contention", "size_mib": args.size_mib, "runs": args.runs, "rate": args.rate,
                  "machine": lib.machine(work), "runs_by_method": {name: [] for name in methods}}
        for run in range(args.runs):
            order = methods[run % 3:] + methods[:run % 3]
            for name in order:
                with open(src, "rb") as handle:  # warm, as the engine's snapshot is
                    while handle.read(8 * lib.MIB):
                        pass
                writer = Writer(db, args.rate, work)
                t0 = time.monotonic()
                if name == "baseline":
                    time.sleep(3.0)
                    seconds = 3.0
                elif name == "cp":
                    seconds = lib.cp_fsync(src, dst)
                else:
                    seconds = paced_copy(src, dst)
                t1 = time.monotonic()
                res = {"seconds": round(seconds, 4), "writer": window(writer.stop(), t0, t1),
                       "load": lib.loadavg()[0]}
                result["runs_by_method"][name].append(res)
                lib.log("contention %d MiB run %d %-8s %.2f s writer=%s"
                        % (args.size_mib, run + 1, name, seconds, res["writer"]))
                if os.path.exists(dst):
                    os.unlink(dst)
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
