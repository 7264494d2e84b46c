# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Render bench/results/*.json into docs/BENCHMARKS.md and docs/img/bench-*.png.

Run by bench/run.sh with the bench venv's python (matplotlib). Without matplotlib the document is
still written, without plots.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, ".."))
MIB = 1024 * 1024


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_ratio(value):
    return "-" if value is None else "%.2f" % value


def fmt_s(value):
    if value is None:
        return "n/a"
    return "%.2f s" % value if value < 100 else "%.0f s" % value


def fmt_x(value):
    return "n/a" if value is None else "%.2f×" % value


def per(value, base):
    """value as a multiple of base (a ratio to cp), None when either is missing."""
    return value / base if value and base else None


def ok_runs(rows):
    return [r for r in rows if r.get("rc") == 0 and not r.get("timed_out")]


def secs(rows):
    return med([r["seconds"] for r in ok_runs(rows)])


def verdict(value, target, unit="×", lower_is_better=True):
    if value is None:
        return "not measured"
    if (value <= target) if lower_is_better else (value >= target):
        return "**met** (%.2f%s ≤ %.2f%s)" % (value, unit, target, unit)
    return "**missed** by %.2f%s (%.2f%s vs ≤ %.2f%s)" % (value - target, unit, value, unit, target, unit)


def verdict_floor(value, target, floor, floor_what):
    """verdict() with the floor measured beside it: a target below the least a verified set needs
    (``floor``, as a ratio to cp, measured in the same run) is out of reach on this machine."""
    if value is None or value <= target:
        return verdict(value, target)
    if floor is not None and floor > target:
        return ("**out of reach**: %s is %.2f× cp in this run (> %.2f×); ours %.2f×"
                % (floor_what, floor, target, value))
    shown = "" if floor is None else "; %s: %.2f× cp" % (floor_what, floor)
    return verdict(value, target) + shown


def verified_floors(b):
    """Lower bounds for a verified set and for its restore at one size, from the passes timed alone
    in bench_backup's rounds (lib.Passes): {kind: {snapshot, write, check, cpu, seconds, ratio}},
    seconds = snapshot + the largest of the other three, ratio to the cp + fsync its target is set
    against (the idle cp for a set, the restore round's cp for a restore). Every pass counted is one
    the issue requires (the text rendered with the table says which); C is the copy of the bytes
    into the file through the page cache (K: in the kernel, copy_file_range, as a restore copies a
    member of an uncompressed set), Q quick_check (M: through mmap, as a restore checks its copy),
    H sha256 of the database:

    set, none:     write = cp + fsync; check = Q (it needs the whole snapshot); cpu = (C + Q + 2 H) / cores
                   (the member's hash and the set file's);
    set, zstd:     write = zstd -1 with every core (compressing it at all); check = Q;
                   cpu = (zstd -1 + Q + H + H x the compressed share) / cores;
    restore, none: write = cp + fsync; check = K + M; cpu = (K + M + H) / cores (the member's hash:
                   SHA256SUMS covers the manifest and every member, so the set file is not hashed);
    restore, zstd: write = cp + fsync; check = zstd -d + M; cpu = (zstd -d + C + M + H) / cores.
    """
    fs = {name: med(values) for name, values in (b.get("passes") or {}).items()}
    cp, cp_restore = secs(b["idle"]["cp"]), secs(b["restore"].get("cp_restore", []))
    if not cp or not all(fs.get(k) for k in ("backup_api", "quick_check", "sha256", "copy_nofsync")):
        return {}
    cores = (b.get("machine") or {}).get("nproc") or 1
    snap, copy, check, sha = fs["backup_api"], fs["copy_nofsync"], fs["quick_check"], fs["sha256"]
    kernel_copy, mapped = fs.get("copy_range") or copy, fs.get("quick_check_mmap") or check
    sizes = b.get("output_bytes") or {}
    share = sizes["zstd_1"] / sizes["snapshot"] if sizes.get("zstd_1") and sizes.get("snapshot") else None
    found = {}

    def put(kind, base, *, snapshot, write, serial, cpu):
        seconds = snapshot + max(write, serial, cpu)
        found[kind] = {"snapshot": snapshot, "write": write, "check": serial, "cpu": cpu, "seconds": seconds,
                       "ratio": per(seconds, base)}

    put("none", cp, snapshot=snap, write=cp, serial=check, cpu=(copy + check + 2 * sha) / cores)
    if cp_restore:
        put("restore_none", cp_restore, snapshot=0.0, write=cp_restore, serial=kernel_copy + mapped,
            cpu=(kernel_copy + mapped + sha) / cores)
    if fs.get("zstd_1") and share:
        put("zstd", cp, snapshot=snap, write=fs.get("zstd_1_t0") or fs["zstd_1"], serial=check,
            cpu=(fs["zstd_1"] + check + sha + sha * share) / cores)
        if fs.get("zstd_d") and cp_restore:
            put("restore_zstd", cp_restore, snapshot=0.0, write=cp_restore, serial=fs["zstd_d"] + mapped,
                cpu=(fs["zstd_d"] + copy + mapped + sha) / cores)
    return found


def load(results, bench):
    out = []
    for path in sorted(glob.glob(os.path.join(results, "%s*.json" % bench))):
        with open(path, encoding="utf-8") as handle:
            out.append(json.load(handle))
    return out


# ------------------------------------------------------------------------------------------------
# plots


def plots(backups, img_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(img_dir, exist_ok=True)
    made = []
    if backups:
        sizes = [b["size_mib"] for b in backups]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, label, style in (("cp", "cp + fsync (floor)", "k--x"), ("vacuum_into", "VACUUM INTO", "c-^"),
                                  ("sqlite3_backup", "sqlite3 .backup", "m-v"),
                                  ("engine_none", "engine, none", "b-o"), ("engine_zstd", "engine, zstd", "g-s")):
            ys = [secs(b["idle"].get(key, [])) for b in backups]
            ax.plot(sizes, ys, style, label=label + " (idle)")
        for key, label, style in (("engine_none", "engine, none, under writer", "b:o"),
                                  ("engine_zstd", "engine, zstd, under writer", "g:s")):
            ys = [secs(b["loaded"].get(key, [])) for b in backups]
            ax.plot(sizes, ys, style, label=label, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("database size (MiB)")
        ax.set_ylabel("seconds (median)")
        ax.set_title("Backup time vs size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(img_dir, "bench-backup-time.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

        big = backups[-1]
        names = ["baseline", "engine_none", "engine_zstd", "vacuum_into", "sqlite3_backup"]
        p99 = [med([r["writer"].get("p99_ms") for r in big["loaded"].get(n, [])]) or 0 for n in names]
        worst = [max([r["writer"].get("max_ms") or 0 for r in big["loaded"].get(n, [])] or [0]) for n in names]
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], p99, 0.4, label="p99 commit latency (median of runs)")
        ax.bar([x + 0.2 for x in xs], worst, 0.4, label="worst commit stall (max of runs)")
        ax.axhline(50, color="r", linestyle="--", linewidth=1, label="50 ms target")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(["no backup", "engine none", "engine zstd", "VACUUM INTO", "sqlite3 .backup"], fontsize=8)
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")
        ax.set_title("Writer (%d commits/s) during each method, %d MiB" % (big["rate"], big["size_mib"]))
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(img_dir, "bench-writer-stall.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# ------------------------------------------------------------------------------------------------
# document


def machine_block(machine, loads):
    lines = [
        "| | |", "|---|---|",
        "| date (UTC) | %s |" % machine.get("date"),
        "| CPU | %s × `%s` (`nproc`) |" % (machine.get("nproc"), machine.get("cpu", "?")),
        "| memory | %s MiB |" % machine.get("mem_total_mib"),
        "| kernel (`uname -r`) | %s |" % machine.get("kernel"),
        "| Python | %s (sqlite3 module linked against SQLite %s) |" % (
            machine.get("python"), machine.get("sqlite_python")),
        "| sqlite3 CLI | %s |" % machine.get("sqlite_cli", "?"),
        "| zstd | %s |" % next(
            (word.rstrip(",") for word in str(machine.get("zstd", "?")).split() if word.startswith("v")),
            machine.get("zstd", "?")),
        "| disk | %s |" % re.sub(r"/bench-[a-z]+-[^ ]+", "", str(machine.get("disk", "?"))),
        "| load average during the runs | %s |" % loads,
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--doc", default=os.path.join(REPO, "docs", "BENCHMARKS.md"))
    parser.add_argument("--img", default=os.path.join(REPO, "docs", "img"))
    parser.add_argument("--command", default="make bench")
    args = parser.parse_args(argv)

    backups = sorted(load(args.results, "backup-"), key=lambda b: b["size_mib"])
    vacuums = sorted(load(args.results, "vacuum-"), key=lambda b: b["size_mib"])
    retention = load(args.results, "retention")
    apps = load(args.results, "app")
    fleets = load(args.results, "fleet")
    contention = load(args.results, "contention")
    made = plots(backups, args.img)

    all_loads = []
    for group in (backups, vacuums, retention, apps, fleets, contention):
        for item in group:
            machine = item.get("machine", {})
            all_loads.extend(machine.get("loadavg", [])[:1] + machine.get("loadavg_end", [])[:1])
    machine = (backups or retention or apps or fleets or [{}])[0].get("machine", {})
    loads = ("%.1f – %.1f (1-minute, at the start and end of each bench; 2 cores; see the notes for what "
             "else ran)" % (min(all_loads), max(all_loads))) if all_loads else "?"

    out = []
    w = out.append
    w("# Benchmarks")
    w("")
    w("Generated by `%s` (`bench/run.sh`, rendered by `bench/render.py` from `bench/results/*.json`). "
      "Do not edit by hand: change the harness and re-run it. Numbers are from a small, **shared and "
      "busy** machine, so every comparison is made side by side within one run (methods interleaved, "
      "order rotated each round) and reported as the **median of the runs** and as **ratios**; absolute "
      "seconds will differ elsewhere, the ratios are what to compare." % args.command)
    w("")
    w("## Machine")
    w("")
    w(machine_block(machine, loads))
    w("")
    head_lines = out
    out = []
    w = out.append

    targets = []
    # the issue sets its backup and restore targets on a ~1 GiB database: that size's rows are the
    # verdict; the other sizes' rows are listed apart, for reference
    sized = [b["size_mib"] for b in backups]
    issue_size = min(sized, key=lambda size: abs(size - 1024)) if sized else None
    reference = []

    # ---------------------------------------------------------------- backup
    if backups:
        sizes = ", ".join("%d MiB" % b["size_mib"] for b in backups)
        runs = backups[0]["runs"]
        w("## 1. Backup")
        w("")
        w("A WAL database of text-like rows (timestamps, words, hex tokens, one index; zstd compresses it "
          "about 5×) at %s, %d runs each. Every method reads the same file, warm in the page cache (24 GiB "
          "of RAM), and writes into the same filesystem. Methods:" % (sizes, runs))
        w("")
        w("- **cp + fsync** — `cp` of the quiescent database, then `fsync` of the copy: the floor for a "
          "durable copy (our engine fsyncs everything it publishes). Plain `cp` (no fsync) is shown too.")
        w("- **sqlite3 .backup** — `sqlite3 DB \".backup FILE\"` (step-wise online backup API).")
        w("- **VACUUM INTO** — `sqlite3 DB \"VACUUM INTO 'FILE'\"`.")
        w("- **engine none/zstd/gzip** — `python3 -c '...cli()' backup --config` (the systemd timer's "
          "command): snapshot (one-step backup API into a scratch copy without journal or fsync), then, side "
          "by side: the tar stream (+ compression) written back in 32 MiB steps, `quick_check` of the "
          "snapshot, its sha256 for SHA256SUMS (the last member) and the set file's sha256 for the sidecar, "
          "each thread reading the page cache at its own pace (zstd: the relay hashes the compressed stream "
          "and feeds it to `zstd -t`); fsync; gzip: read-back of every member; sidecar. gzip only up to %s." % (
              "%d MiB" % max([b["size_mib"] for b in backups if b["idle"].get("engine_gzip")] or [0])))
        w("- **under a writer** — a separate process commits one small row per transaction "
          "(`BEGIN IMMEDIATE`/`INSERT`/`COMMIT`, `synchronous=NORMAL`) at %d commits/s and records each "
          "commit's latency; \"no backup\" is the same writer for 3 s with nothing else running (its own "
          "noise: WAL auto-checkpoints and the busy disk). `cp` is not run under load: it would not be a "
          "consistent copy." % backups[0]["rate"])
        w("")
        w("### Idle (median seconds; ratio to cp + fsync)")
        w("")
        head = ["size", "cp + fsync", "cp", "sqlite3 .backup", "VACUUM INTO", "engine none", "engine zstd",
                "engine gzip", "none / cp", "zstd / cp"]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for b in backups:
            cp = secs(b["idle"]["cp"])
            methods = ("cp", "cp_nofsync", "sqlite3_backup", "vacuum_into", "engine_none", "engine_zstd", "engine_gzip")
            row = [secs(b["idle"].get(k, [])) for k in methods]
            none, zstd = row[4], row[5]
            w("| %d MiB | %s | %s |" % (b["size_mib"], " | ".join(fmt_s(x) for x in row),
                                        " | ".join(fmt_x(per(x, cp)) for x in (none, zstd))))
        w("")
        w("Set sizes (median): " + "; ".join(
            "%d MiB: none %.0f MiB, zstd %.0f MiB" % (
                b["size_mib"],
                (med([r.get("set_size") for r in ok_runs(b["idle"]["engine_none"])]) or 0) / MIB,
                (med([r.get("set_size") for r in ok_runs(b["idle"]["engine_zstd"])]) or 0) / MIB)
            for b in backups) + ".")
        w("")
        w("### Under a steady writer")
        w("")
        head = ["size", "method", "time (median)", "vs cp idle", "writer p99 (median)", "worst stall (max)",
                "commits > 50 ms (all runs)", "commits/s achieved", "finished"]
        w("| " + " | ".join(head) + " |")
        w("|" + "---|" * len(head))
        for b in backups:
            cp = secs(b["idle"]["cp"])
            for key, label in (("baseline", "no backup"), ("engine_none", "engine none"),
                               ("engine_zstd", "engine zstd"), ("vacuum_into", "VACUUM INTO"),
                               ("sqlite3_backup", "sqlite3 .backup"),
                               ("floor_none", "snapshot + copy + fsync")):
                rows = b["loaded"].get(key, [])
                if not rows:
                    continue
                done = ok_runs(rows)
                t = secs(rows)
                p99 = med([r["writer"].get("p99_ms") for r in rows])
                worst = max([r["writer"].get("max_ms") or 0 for r in rows])
                rate = med([r["writer"].get("rate") for r in rows])
                if key == "baseline":
                    fin, tt, ratio = "—", "3 s window", "—"
                elif len(done) == len(rows):
                    fin, tt, ratio = "%d/%d" % (len(done), len(rows)), fmt_s(t), fmt_x(per(t, cp))
                else:
                    limit = max([r.get("timeout") or 0 for r in rows])
                    fin = "%d/%d: **did not finish in %.0f s**" % (len(done), len(rows), limit)
                    tt, ratio = (fmt_s(t) if done else "> %.0f s" % limit), "—"
                over = [r["writer"].get("over_50ms") for r in rows]
                over = "n/a" if None in over else "%d of %d" % (sum(over), sum(r["writer"].get("commits", 0)
                                                                               for r in rows))
                w("| %d MiB | %s | %s | %s | %s ms | %s ms | %s | %s | %s |" % (
                    b["size_mib"], label, tt, ratio, p99, worst, over, rate, fin))
        w("")
        disk_worst = {}
        for c in contention:
            w("**The disk alone** (`bench/bench_contention.py`): the same writer while a %d MiB file that SQLite "
              "never sees is written on the same filesystem, %d runs, order rotated. `paced` writes it the way "
              "the engine now writes a set (1 MiB writes, fdatasync every 32 MiB in the writing thread)." % (
                  c["size_mib"], c["runs"]))
            w("")
            w("| method | time (median) | writer p99 (median) | worst stall (max) | commits > 50 ms (all runs) |")
            w("|---|---|---|---|---|")
            for key, label in (("baseline", "nothing else"), ("cp", "cp + fsync"), ("paced", "paced write")):
                rows = c["runs_by_method"].get(key, [])
                if not rows:
                    continue
                worst = max(r["writer"].get("max_ms") or 0 for r in rows)
                disk_worst[(c["size_mib"], key)] = worst
                w("| %s | %s | %s ms | %s ms | %d of %d |" % (
                    label, "3 s window" if key == "baseline" else fmt_s(med([r["seconds"] for r in rows])),
                    med([r["writer"].get("p99_ms") for r in rows]), worst,
                    sum(r["writer"].get("over_50ms", 0) for r in rows),
                    sum(r["writer"].get("commits", 0) for r in rows)))
            w("")
        if any(b.get("passes") for b in backups):
            w("**Each pass alone** (`lib.Passes`, in every round beside the methods above, order rotated): what "
              "a verified set and its restore are made of, each timed on its own on a snapshot of the database "
              "(median seconds; ratio to that size's `cp + fsync`).")
            w("")
            w("| pass | " + " | ".join("%d MiB" % b["size_mib"] for b in backups) + " |")
            w("|---|" + "---|" * len(backups))
            for name, label in (("backup_api", "backup API snapshot (no fsync)"),
                                ("quick_check", "quick_check of the snapshot"),
                                ("quick_check_mmap", "quick_check of the snapshot through mmap (as restore checks)"),
                                ("sha256", "sha256 of the snapshot"),
                                ("copy_nofsync", "copy of the snapshot through a 1 MiB buffer, no fsync"),
                                ("copy_range", "copy of the snapshot in the kernel (copy_file_range), no fsync"),
                                ("zstd_1", "zstd -1, 1 thread (the engine's default)"),
                                ("zstd_1_t0", "zstd -1 -T0 (both cores: `compression_threads: 0`)"),
                                ("zstd_3", "zstd -3, 1 thread"), ("zstd_3_t0", "zstd -3 -T0 (both cores)"),
                                ("zstd_d", "zstd -d of the zstd -1 output (a restore decodes it)")):
                cells = []
                for b in backups:
                    value = med((b.get("passes") or {}).get(name, []))
                    cells.append("%s (%s)" % (fmt_s(value), fmt_x(per(value, secs(b["idle"]["cp"]))))
                                 if value is not None else "n/a")
                w("| %s | %s |" % (label, " | ".join(cells)))
            w("")
            zbytes = backups[-1].get("output_bytes") or {}
            if zbytes.get("snapshot") and zbytes.get("zstd_1") and zbytes.get("zstd_3"):
                w("Output at %d MiB: zstd -1 writes %.1f MiB (%.2f× smaller than the database), zstd -3 writes "
                  "%.1f MiB (%.2f×)." % (backups[-1]["size_mib"], zbytes["zstd_1"] / MIB,
                                         zbytes["snapshot"] / zbytes["zstd_1"], zbytes["zstd_3"] / MIB,
                                         zbytes["snapshot"] / zbytes["zstd_3"]))
                w("")
        for path in made:
            w("![%s](img/%s)" % (os.path.basename(path), os.path.basename(path)))
            w("")
        # lower bounds from the passes timed alone in the same rounds; see verified_floors
        least = {b["size_mib"]: verified_floors(b) for b in backups}
        if any(least.values()):
            cores = (backups[0].get("machine") or {}).get("nproc") or 1
            w("**The least a verified set needs.** A lower bound for each target, from the passes timed "
              "alone (\"Each pass alone\" above: the same rounds, the same database), assuming they overlap "
              "perfectly and cost nothing else (no Python, no tar framing, no pipes, no pacing). What the "
              "issue asks of a set before it counts: a consistent snapshot through SQLite (never a plain copy "
              "of the live file; the one-step backup API, the fastest consistent copy measured here), its "
              "`quick_check`, the sha256 of every member (SHA256SUMS) and of the set file (the module returns "
              "it; the `.sha256` sidecar), and the set on disk, which takes the snapshot's bytes copied once "
              "more (SQLite writes a database only at offset 0 of its own file, and a tar header comes first); "
              "a restore must write the copy, check the sha256 of every member and of the manifest "
              "(SHA256SUMS covers both from set format 3 on, so the set file itself need not be hashed "
              "again) and run `quick_check` on the extracted copy before it swaps anything. Each bound is "
              "the largest of three: **write** (the set, or the restored copy, written and fsynced: at "
              "least `cp + fsync`; for zstd, compressing it, even with every core), **check** (the check of "
              "a copy can only start once the copy is complete: the copy through the page cache, in the "
              "kernel for a restore of a `none` set, or zstd -d, then `quick_check`), **CPU** (all of "
              "that work, the copy included, spread over the %d cores). A backup adds the snapshot in front: "
              "the set is made from it, so nothing of the set can start before it ends. The ratio is to the "
              "`cp + fsync` the target is set against (for a restore, the one timed in the restore round)."
              % cores)
            w("")
            w("| size | what | snapshot | then: write | check | CPU | least in all | least / cp | ours | "
              "ours / least |")
            w("|---|---|---|---|---|---|---|---|---|---|")
            for b in backups:
                kinds = least.get(b["size_mib"]) or {}
                rows = (("none", "set, none", b["idle"]["engine_none"]),
                        ("zstd", "set, zstd -1", b["idle"]["engine_zstd"]),
                        ("restore_none", "restore of a none set", b["restore"]["restore_none"]),
                        ("restore_zstd", "restore of a zstd set", b["restore"]["restore_zstd"]))
                for kind, label, runs_of_ours in rows:
                    f = kinds.get(kind)
                    ours = secs(runs_of_ours)
                    if f:
                        w("| %d MiB | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                            b["size_mib"], label, fmt_s(f["snapshot"]) if f["snapshot"] else "—",
                            fmt_s(f["write"]), fmt_s(f["check"]), fmt_s(f["cpu"]), fmt_s(f["seconds"]),
                            fmt_x(f["ratio"]), fmt_s(ours), fmt_x(per(ours, f["seconds"]))))
            w("")
        if backups:
            w("Measured as one job beside the engine (section 1 tables, \"snapshot + copy + fsync\" and "
              "\"snapshot + zstd -1 + fsync\": the snapshot, then one durable copy, nothing checked or "
              "hashed): a lower bound too, though a weaker one; for zstd the larger of the two is used. For "
              "`none` its single unpaced fsync of a 1 GiB file behind 2 GiB of dirty page cache can take "
              "longer than the engine's paced write, so it is shown but not used.")
            w("")
            w("| size | snapshot + copy + fsync, idle | the same under the writer | snapshot + zstd -1 + fsync, "
              "idle | engine none, idle | engine none, under the writer | engine zstd, idle |")
            w("|---|---|---|---|---|---|---|")
            for b in backups:
                cp = secs(b["idle"]["cp"])
                columns = (("idle", "floor_none"), ("loaded", "floor_none"), ("idle", "floor_zstd"),
                           ("idle", "engine_none"), ("loaded", "engine_none"), ("idle", "engine_zstd"))
                cells = [secs(b[g].get(k, [])) for g, k in columns]
                w("| %d MiB | %s |" % (b["size_mib"], " | ".join(
                    "%s (%s)" % (fmt_s(x), fmt_x(per(x, cp))) for x in cells)))
            w("")
        for b in backups:
            cp = secs(b["idle"]["cp"])
            none_idle, zstd_idle = secs(b["idle"]["engine_none"]), secs(b["idle"]["engine_zstd"])
            none_load = secs(b["loaded"]["engine_none"])
            floor_zstd = secs(b["idle"].get("floor_zstd", []))
            stall = max([r["writer"].get("max_ms") or 0 for k in ("engine_none", "engine_zstd")
                         for r in b["loaded"].get(k, [])] or [0])
            base = max([r["writer"].get("max_ms") or 0 for r in b["loaded"].get("baseline", [])] or [0])
            sz = b["size_mib"]
            kinds = least.get(sz, {})
            none_floor = (kinds.get("none") or {}).get("ratio")
            zstd_floor = max([x for x in ((kinds.get("zstd") or {}).get("ratio"), per(floor_zstd, cp)) if x]
                             or [None])
            what = "the least a verified %s set needs (section 1)"
            rows = targets if sz == issue_size else reference
            rows.append(("uncompressed set ≤ 1.5× cp, idle (%d MiB)" % sz,
                         verdict_floor(per(none_idle, cp), 1.5, none_floor, what % "none")))
            rows.append(("uncompressed set ≤ 2.5× cp, under load (%d MiB)" % sz,
                         verdict_floor(per(none_load, cp), 2.5, none_floor, (what % "none") + ", idle")))
            rows.append(("zstd set ≤ 2.5× cp (%d MiB)" % sz,
                         verdict_floor(per(zstd_idle, cp), 2.5, zstd_floor, what % "zstd")))
            stall_text = verdict(stall, 50, " ms") + " — writer's own worst with no backup: %.1f ms" % base
            if stall > 50 and base > 50:
                stall_text += " (the disk's own noise was above the target in this run)"
            rows.append(("worst writer stall during our backup ≤ 50 ms (%d MiB)" % sz, stall_text
                         + ("; during a plain cp + fsync of %d MiB: %.1f ms" % (sz, disk_worst[(sz, "cp")])
                            if (sz, "cp") in disk_worst else "")))

        # ------------------------------------------------------------ restore
        w("## 2. Restore and drill")
        w("")
        w("Restore of the set just written (engine `restore` with `dest_root` into an empty scratch "
          "directory: one pass checks the member headers against the manifest and extracts into a temp file "
          "(a member of a `none` set copied in the kernel while a thread hashes the copy; a `zstd` set's "
          "relayed from `zstd -d` and hashed once complete); then `quick_check` of the copy while threads "
          "hash it (compared with SHA256SUMS, the set's last member, which covers the manifest too) and fsync "
          "it; rename) against `cp` + fsync of the database; `drill` (the same checks on a scratch copy, "
          "never fsynced, plus row counts; nothing live touched). Median seconds.")
        w("")
        w("| size | cp + fsync | restore (none set) | restore (zstd set) | drill (zstd set) | none / cp | zstd / cp |")
        w("|---|---|---|---|---|---|---|")
        for b in backups:
            r = b["restore"]
            cp = secs(r["cp_restore"])
            rn, rz, dz = secs(r["restore_none"]), secs(r["restore_zstd"]), secs(r["drill_zstd"])
            w("| %d MiB | %s | %s | %s | %s | %s | %s |" % (
                b["size_mib"], fmt_s(cp), fmt_s(rn), fmt_s(rz), fmt_s(dz),
                fmt_x(per(rn, cp)), fmt_x(per(rz, cp))))
            kinds = least.get(b["size_mib"], {})
            (targets if b["size_mib"] == issue_size else reference).append((
                "restore with verification ≤ 2× cp (%d MiB, none / zstd set)" % b["size_mib"],
                "%s / %s" % (verdict_floor(per(rn, cp), 2.0, (kinds.get("restore_none") or {}).get("ratio"),
                                           "the least a restore of a none set needs (section 1)"),
                             verdict_floor(per(rz, cp), 2.0, (kinds.get("restore_zstd") or {}).get("ratio"),
                                           "the least a restore of a zstd set needs (section 1)"))))
        w("")

        # ------------------------------------------------------------ memory
        w("## 3. Memory")
        w("")
        w("Peak RSS from `wait4()` of the `cli()` process: the largest of the Python process and any "
          "child it waited for (the `zstd` child for zstd sets), file pages it maps included. Below it, "
          "the process's own anonymous memory (`RssAnon` + `RssShmem`, sampled every 10 ms): what it "
          "allocates. A restore checks its extracted copy through mmap, so its RSS counts the copy's "
          "page-cache pages (up to the database's size; the kernel can reclaim them, they are not memory "
          "the restore allocates); backup and drill map nothing. Max over the runs.")
        w("")
        # (group, key, label, the figure the target is judged on: what the engine needs, which for a
        # restore, whose RSS counts the mapped copy, is its anonymous memory)
        columns = (("idle", "engine_none", "backup none", "maxrss_kib"),
                   ("idle", "engine_zstd", "backup zstd", "maxrss_kib"),
                   ("loaded", "engine_none", "backup none, under writer", "maxrss_kib"),
                   ("restore", "restore_none", "restore none", "maxanon_kib"),
                   ("restore", "restore_zstd", "restore zstd", "maxanon_kib"),
                   ("restore", "drill_zstd", "drill zstd", "maxrss_kib"))
        w("| size | what | " + " | ".join(column[2] for column in columns) + " |")
        w("|---|---|" + "---|" * len(columns))
        peaks = {}
        for b in backups:
            for field, what in (("maxrss_kib", "peak RSS"), ("maxanon_kib", "anonymous")):
                cells = []
                for group, key, _label, judged in columns:
                    vals = [r.get(field) for r in b[group].get(key, []) if r.get(field)]
                    peak = max(vals) / 1024 if vals else None
                    if field == judged:
                        peaks.setdefault(key + group, []).append(peak)
                    cells.append("n/a" if peak is None else "%.0f MiB" % peak)
                w("| %d MiB | %s | %s |" % (b["size_mib"], what, " | ".join(cells)))
        w("")
        biggest = max([p for vals in peaks.values() for p in vals if p] or [0])
        targets.append(("peak RSS ≤ 64 MiB at the largest size (%d MiB), flat (restore: its anonymous memory, "
                        "see section 3)" % backups[-1]["size_mib"],
                        verdict(biggest, 64, " MiB") + "; smallest → largest size: " + ", ".join(
                            "%.0f→%.0f" % (v[0] or 0, v[-1] or 0) for v in peaks.values())))

    # ---------------------------------------------------------------- vacuum
    if vacuums:
        w("## 4. sqlite_vacuum vs the sqlite3 CLI")
        w("")
        w("`bench/bench_vacuum.py`: a database with every other row deleted (a ~50% freelist), a fresh copy per "
          "method and run, the order rotated each run. Three ways to run the same work: the engine in-process "
          "(`maintain(check=quick_check, checkpoint=passive, vacuum=always, analyze=analyze)`), the module as a "
          "user runs it (`ansible localhost -m runbook.sqlite_app.sqlite_vacuum` with those options: Ansible "
          "start-up and module transfer included), and `sqlite3 DB 'PRAGMA quick_check; VACUUM; ANALYZE; PRAGMA "
          "wal_checkpoint(PASSIVE);'`.")
        w("")
        w("| size | file | engine (median) | module via ansible (median) | ansible ping (median) "
          "| sqlite3 CLI (median) | engine / CLI | module / CLI | per-run engine, module ratios |")
        w("|---|---|---|---|---|---|---|---|---|")
        for v in vacuums:
            e = med([r["engine"].get("seconds") for r in v["runs"]])
            m = med([r.get("module", {}).get("seconds") for r in v["runs"]])
            c = med([r["sqlite3_cli"].get("seconds") for r in v["runs"]])
            p = med([r.get("ansible_ping", {}).get("seconds") for r in v["runs"]])
            w("| %d MiB | %.0f MiB | %s | %s | %s | %s | %s | %s | %s |" % (
                v["size_mib"], v["database"]["size_bytes"] / MIB, fmt_s(e), fmt_s(m), fmt_s(p), fmt_s(c),
                fmt_x(v.get("engine_vs_cli")), fmt_x(v.get("module_vs_cli")),
                "; ".join("%.2f, %s" % (r["engine_vs_cli"], fmt_ratio(r.get("module_vs_cli")))
                          for r in v["runs"] if "engine_vs_cli" in r)))
            targets.append(("sqlite_vacuum engine ≤ 1.1× the CLI (%d MiB)" % v["size_mib"],
                            verdict(v.get("engine_vs_cli"), 1.1)))
            if v.get("module_vs_cli") is not None:
                targets.append(("sqlite_vacuum module, Ansible included, ≤ 1.1× the CLI (%d MiB)" % v["size_mib"],
                                verdict(v.get("module_vs_cli"), 1.1)))
        w("")

    # ---------------------------------------------------------------- retention
    if retention:
        r = retention[0]
        w("## 5. Retention over %d sets" % r["sets"])
        w("")
        w("Empty files with valid names plus `.sha256` sidecars, one every 30 minutes going back ~208 days; "
          "rules %s (the backup role's defaults). In-process engine calls, fresh directory per run." % (
              ", ".join("%s=%s" % kv for kv in sorted(r["rules"].items()))))
        w("")
        dec = med([x["decide_seconds"] for x in r["runs"]])
        pru = med([x["prune_seconds"] for x in r["runs"]])
        w("| | median | runs |")
        w("|---|---|---|")
        w("| decision only (check mode: list, parse, sort, select) | %s | %s |" % (
            fmt_s(dec), ", ".join("%.2f" % x["decide_seconds"] for x in r["runs"])))
        w("| decision + prune (removes %d sets and their sidecars, keeps %d) | %s | %s |" % (
            r["runs"][0]["pruned"], r["runs"][0]["kept"], fmt_s(pru),
            ", ".join("%.2f" % x["prune_seconds"] for x in r["runs"])))
        w("")
        targets.append(("retention over %d sets ≤ 2 s (decision / with prune)" % r["sets"],
                        "%s / %s" % (verdict(dec, 2.0, " s"), verdict(pru, 2.0, " s"))))

    # ---------------------------------------------------------------- app
    if apps:
        a = apps[0]
        w("## 6. The sample app under load during a backup")
        w("")
        w("`examples/sample_app/sample_app.py serve` on 127.0.0.1 (TLS off) over a %.0f MiB database (the bulk in "
          "an `events` table; the app's `items` table small). %d client threads loop `POST /items` + "
          "`GET /readyz` (keep-alive HTTP/1.1) for %.0f s per phase; in the \"with\" phase the engine (zstd) "
          "backs the database up back to back for the whole phase. Phases alternate, %d runs." % (
              a["size_bytes"] / MIB, a["threads"], a["seconds"], len(a["runs"])))
        w("")
        w("| phase | requests (median) | req/s | errors (total) | p50 (median) | p99 (median) | worst "
          "| backups during phase |")
        w("|---|---|---|---|---|---|---|---|")
        summary = {}
        for name in ("without", "with"):
            rows = [run[name] for run in a["runs"]]
            errors = sum(r["errors"] for r in rows)
            p99 = med([r["p99_ms"] for r in rows])
            summary[name] = (errors, p99)
            backups_done = [b for r in rows for b in r["backups"]]
            failed_backups = sum(1 for b in backups_done if b["rc"])
            median_backup = fmt_s(med([b["seconds"] for b in backups_done]))
            bk = ("%d (%d failed; median %s each)" % (len(backups_done), failed_backups, median_backup)
                  if name == "with" else "—")
            w("| %s backup | %s | %s | %d | %s ms | %s ms | %s ms | %s |" % (
                name, med([r["requests"] for r in rows]), med([r["rps"] for r in rows]), errors,
                med([r["p50_ms"] for r in rows]), p99, max(r["max_ms"] for r in rows), bk))
        w("")
        targets.append(("app under backup: 0 errors; p99 with/without",
                        "%s errors; p99 %s ms with vs %s ms without (%s)" % (
                            "**0**" if summary["with"][0] == 0 else "**%d**" % summary["with"][0],
                            summary["with"][1], summary["without"][1],
                            fmt_x(summary["with"][1] / summary["without"][1] if summary["without"][1] else None))))

    # ---------------------------------------------------------------- fleet
    if fleets:
        # several fleet files (e.g. one per host count) are merged
        f = dict(fleets[0], rows=sorted([row for item in fleets for row in item["rows"]], key=lambda r: r["hosts"]),
                 backup=[b for item in fleets for b in item["backup"]],
                 skipped=sorted({n for item in fleets for n in item.get("skipped", [])}
                                - {row["hosts"] for item in fleets for row in item["rows"]}))
        w("## 7. Fleet: deploy and backup playbooks on lab containers")
        w("")
        w("Containers from the lab image (`%s`, systemd as PID 1, `--network none`, the flags of "
          "`.config/molecule/config.yml`), connection `community.docker.docker`, forks = hosts. App inputs: "
          "`sqlite_app_name`, `sqlite_app_root`, `sqlite_app_databases: [app.db]` (a small WAL database put in "
          "each container first); no `app_version`, so the app role is skipped: the run covers data_dir, the "
          "backup and maintenance roles (timers) and the checks. The first run is on fresh containers; the "
          "no-op reruns alternate `pipelining` on/off on the same containers (off only up to "
          "`BENCH_FLEET_OFF_MAX_HOSTS` hosts, for time). Full logs: "
          "`bench/results/fleet*.log` (with per-task times from `ansible.posix.profile_tasks`)." % f["image"])
        w("")
        w("| hosts | first run (pipelining on) | changed | no-op rerun, pipelining on (median) | changed | "
          "rerun, pipelining off (median) | rerun / first | failed |")
        w("|---|---|---|---|---|---|---|---|")
        first_one = None
        first_max = None
        for row in f["rows"]:
            first = row["first"]
            on, off = row["rerun"]["on"], row["rerun"]["off"]
            on_s, off_s = med([r["seconds"] for r in on]), med([r["seconds"] for r in off])
            failed = first["failed"] + sum(r["failed"] for r in on + off)
            off_cell = fmt_s(off_s) if off else "not run (time)"
            changed_rerun = max([r["changed"] for r in on + off] or [0])
            w("| %d | %s | %d | %s | %d | %s | %s | %d |" % (
                row["hosts"], fmt_s(first["seconds"]), first["changed"], fmt_s(on_s), changed_rerun,
                off_cell, fmt_x(on_s / first["seconds"] if on_s else None), failed))
            if row["hosts"] == 1:
                first_one = first["seconds"]
                if row.get("first_nopipe"):
                    w("")
                    w("One host, first run with pipelining **off** (fresh container): %s (on: %s)." % (
                        fmt_s(row["first_nopipe"]["seconds"]), fmt_s(first["seconds"])))
                    w("")
            first_max = (row["hosts"], first["seconds"])
            targets.append(("deploy no-op rerun ≤ 0.5× first run with changed=0 (%d hosts)" % row["hosts"],
                            verdict(on_s / first["seconds"] if on_s else None, 0.5)
                            + ("; changed=0" if not changed_rerun
                               else "; **changed=%d, not a clean no-op** (see the notes)" % changed_rerun)))
        if f.get("skipped"):
            w("")
            w("Skipped for the time budget: %s hosts." % ", ".join(str(n) for n in f["skipped"]))
        w("")
        for n in sorted({r["n"] for r in f["backup"]}):
            runs = [r for r in f["backup"] if r["n"] == n]
            on = [r["seconds"] for r in runs if r["pipelining"]]
            off = [r["seconds"] for r in runs if not r["pipelining"]]
            w("Backup playbook on %d hosts: pipelining on %s, off %s (median of %d; failed: %d)." % (
                n, fmt_s(med(on)), fmt_s(med(off)) if off else "not run (time)", len(on),
                sum(r["failed"] for r in runs)))
            w("")
        if first_one and first_max and first_max[0] > 1:
            targets.append(("%d hosts ≤ 3× one host (first run)" % first_max[0],
                            verdict(first_max[1] / first_one, 3.0)))
        pipe_ratios = [med([r["seconds"] for r in row["rerun"]["off"]])
                       / med([r["seconds"] for r in row["rerun"]["on"]])
                       for row in f["rows"] if row["rerun"]["on"] and row["rerun"]["off"]]
        if pipe_ratios:
            w("Pipelining: reruns with it off take %s the time of reruns with it on (per host count: %s)." % (
                fmt_x(med(pipe_ratios)), ", ".join("%.2f×" % x for x in pipe_ratios)))
            w("")

    # ---------------------------------------------------------------- targets first, then the sections
    body = out
    out = head_lines
    w = out.append
    w("## Targets")
    w("")
    w("Issue #3 sets the backup and restore targets on a ~1 GiB database: the rows at that size are the "
      "verdict. A target reported **out of reach** is below the least a verified set (or its restore) "
      "needs, measured in the same run (section 1, \"The least a verified set needs\"): no implementation "
      "can meet it on this machine.")
    w("")

    def verdicts(head, rows):
        w("| %s | result |" % head)
        w("|---|---|")
        for name, result in rows:
            w("| %s | %s |" % (name, result))
        w("")

    verdicts("target", targets)
    if reference:
        w("The same backup and restore targets at the plot's other sizes, for reference: at 64 MiB fixed "
          "costs (starting Python, a handful of fsyncs) dominate, and what happens at 2 GiB is in the notes "
          "below.")
        w("")
        verdicts("at another size", reference)
    notes = os.path.join(HERE, "NOTES.md")
    if os.path.exists(notes):
        with open(notes, encoding="utf-8") as handle:
            w(handle.read().rstrip())
            w("")
    out.extend(body)
    w("## Reproducing")
    w("")
    w("```")
    w("make bench                                   # BENCH_SIZES_MIB=\"64 256 1024 2048\" BENCH_RUNS=3")
    w("BENCH_QUICK=1 make bench                     # smoke: 16 and 64 MiB, 1 run, short app phases, 1-host fleet")
    w("BENCH_SIZES_MIB=\"64 256\" BENCH_FLEET=0 make bench   # no containers")
    w("```")
    w("")
    w("Environment: `BENCH_SIZES_MIB`, `BENCH_RUNS`, `BENCH_QUICK`, `BENCH_RATE` (writer commits/s, 500), "
      "`BENCH_GZIP_MAX_MIB` (256), `BENCH_VACUUM_SIZES_MIB` (256), `BENCH_APP_SECONDS` (20), "
      "`BENCH_APP_MIB` (the largest size ≤ 1024), `BENCH_FLEET` (1 when docker and the lab image are there), "
      "`BENCH_FLEET_COUNTS` (\"1 3 6 10\"), `BENCH_FLEET_MAX_SECONDS` (900: later host counts are skipped), "
      "`BENCH_FLEET_OFF_MAX_HOSTS` (3: pipelining off is timed up to this many hosts), "
      "`BENCH_WORK` (/var/tmp/runbook-bench), `BENCH_RESULTS`, `BENCH_DOC`, `BENCH_IMG`. Raw results: "
      "`bench/results/*.json` (not committed; a run moves the previous run's files to "
      "`bench/results/previous/<UTC time>/`). matplotlib is pinned in `bench/run.sh` and lives in "
      "`build/bench-venv`.")
    os.makedirs(os.path.dirname(args.doc), exist_ok=True)
    with open(args.doc, "w", encoding="utf-8") as handle:
        handle.write("\n".join(out) + "\n")
    print("wrote %s%s" % (args.doc, "".join(" and " + p for p in made)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
