# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: retention over --sets backup sets (empty files with valid names + .sha256 sidecars,
one every 30 minutes going back in time).

Per run (fresh directory each time): the decision alone (state=pruned in check mode: list, parse,
sort, select) and the real prune (the same plus removing every pruned set and its sidecar), both
through the engine in-process, with keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=6 (the
backup role's defaults). Writes one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as lib  # noqa: E402

RULES = {"keep_last": 3, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}


def populate(directory: str, count: int, now: float, engine) -> None:
    for i in range(count):
        when = datetime.datetime.fromtimestamp(int(now) - i * 1800, datetime.timezone.utc)
        name = engine.set_name("backup", when, None, "zstd")
        open(os.path.join(directory, name), "wb").close()
        with open(os.path.join(directory, name + ".sha256"), "w", encoding="ascii") as handle:
            handle.write("%s  %s\n" % ("0" * 64, name))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--sets", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, lib.collection_root())
    from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as engine

    result = {"bench": "retention", "sets": args.sets, "rules": RULES, "runs": [], "machine": lib.machine(
        args.dir or tempfile.gettempdir())}
    for run in range(args.runs):
        with lib.scratch_dir("retention", args.dir) as work:
            now = time.time()
            populate(work, args.sets, now, engine)
            params = dict(RULES, dest=work, state="pruned")
            started = time.monotonic()
            plan = engine.backup(dict(params), check_mode=True, now=now)
            decide = time.monotonic() - started
            started = time.monotonic()
            real = engine.backup(dict(params), now=now)
            prune = time.monotonic() - started
            left = len([n for n in os.listdir(work) if not n.endswith(".sha256") and not n.startswith(".")])
            row = {"decide_seconds": round(decide, 4), "prune_seconds": round(prune, 4),
                   "planned_prune": len(plan["pruned"]), "pruned": len(real["pruned"]), "kept": len(real["kept"]),
                   "left": left, "load": lib.loadavg()[0]}
            result["runs"].append(row)
            lib.log("retention run %d: %s" % (run + 1, row))
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
