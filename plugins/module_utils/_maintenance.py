# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the maintenance role runs this engine on hosts that have no Ansible.
"""SQLite maintenance that is safe to schedule: check, WAL checkpoint, VACUUM / incremental
vacuum when it pays off, statistics refresh, and a node_exporter textfile.

Per database, in this order: open (busy timeout), read the stats, run the check (a damaged
database is reported and never touched again), decide what to do (``plan``), refuse a VACUUM
the free space cannot hold, checkpoint the WAL, vacuum, checkpoint again so the file shrinks,
refresh statistics. Check mode opens read-only and stops after deciding.

The module ``sqlite_vacuum`` and the maintenance role's systemd timer (``cli()``) share this code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import sys
import time

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError
from ansible_collections.runbook.sqlite_app.plugins.module_utils._fileio import describe_oserror
from ansible_collections.runbook.sqlite_app.plugins.module_utils._metrics import write_textfile
from ansible_collections.runbook.sqlite_app.plugins.module_utils._sqlite import (
    CHECKS,
    connect,
    db_stats,
    describe_sqlite_error,
    require_database,
    run_check,
    sqlite_temp_dir,
    wal_checkpoint,
)

CHECKPOINTS = ("passive", "truncate", "none")
CHECKPOINT_INCOMPLETE = ("warn", "fail")
VACUUMS = ("auto", "always", "never")
AUTO_VACUUM_MODES = ("none", "full", "incremental")
ANALYZES = ("none", "analyze", "optimize")

# PRAGMA optimize mask: 0x02 = analyze where it helps; 0x10000 = look at every table, not only
# those this connection queried (SQLite >= 3.46; older versions ignore the bit).
OPTIMIZE_MASK = 0x10002

DEFAULTS = {
    "check": "quick_check",
    "checkpoint": "passive",
    "checkpoint_incomplete": "warn",
    "vacuum": "auto",
    "vacuum_threshold": 0.1,
    "auto_vacuum": None,
    "analyze": "optimize",
    "busy_timeout": 5000,
    "temp_dir": None,
    "metrics_file": None,
}


class MaintenanceError(RunbookError):
    """One or more databases failed; ``result`` holds the full report (what ran, what failed)."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


# --- options -----------------------------------------------------------------------------------

def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise RunbookError("{}={!r}: expected one of {}".format(name, value, ", ".join(str(c) for c in choices)))


def validate_options(databases, options: dict) -> tuple[list[str], dict]:
    """Check every option and every path before anything is touched; returns (paths, options)."""
    opts = dict(DEFAULTS)
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise RunbookError("unknown option(s): {}".format(", ".join(sorted(unknown))))
    opts.update({key: value for key, value in options.items() if value is not None})
    if isinstance(databases, str):
        databases = [databases]
    if not databases:
        raise RunbookError("databases: at least one database path is required")
    _choice("check", opts["check"], CHECKS)
    _choice("checkpoint", opts["checkpoint"], CHECKPOINTS)
    _choice("checkpoint_incomplete", opts["checkpoint_incomplete"], CHECKPOINT_INCOMPLETE)
    _choice("vacuum", opts["vacuum"], VACUUMS)
    _choice("analyze", opts["analyze"], ANALYZES)
    if opts["auto_vacuum"] is not None:
        _choice("auto_vacuum", opts["auto_vacuum"], AUTO_VACUUM_MODES)
    try:
        opts["vacuum_threshold"] = float(opts["vacuum_threshold"])
    except (TypeError, ValueError):
        raise RunbookError(f"vacuum_threshold={opts['vacuum_threshold']!r}: expected a number from 0 to 1") from None
    if not 0.0 <= opts["vacuum_threshold"] <= 1.0:
        raise RunbookError("vacuum_threshold={!r}: expected a number between 0 and 1".format(opts["vacuum_threshold"]))
    try:
        opts["busy_timeout"] = int(opts["busy_timeout"])
    except (TypeError, ValueError):
        raise RunbookError(f"busy_timeout={opts['busy_timeout']!r}: expected milliseconds (an integer >= 0)") from None
    if opts["busy_timeout"] < 0:
        raise RunbookError("busy_timeout={!r}: expected milliseconds (an integer >= 0)".format(opts["busy_timeout"]))
    if opts["temp_dir"]:
        temp_dir = opts["temp_dir"]
        if not os.path.isdir(temp_dir):
            raise RunbookError(f"{temp_dir}: temp_dir does not exist or is not a directory")
        if not os.access(temp_dir, os.W_OK | os.X_OK):
            raise RunbookError(f"{temp_dir}: temp_dir is not writable by this user")
        opts["temp_dir"] = os.path.abspath(temp_dir)
    paths = []
    for given in databases:
        path = os.path.abspath(os.path.expanduser(str(given)))
        require_database(path)  # missing, not a file, not SQLite: fail before any database is touched
        if path not in paths:
            paths.append(path)
    return paths, opts


# --- deciding --------------------------------------------------------------------------------

def plan(stats: dict, opts: dict) -> dict:
    """What to do to one healthy database, from its stats alone (pure: check mode reports this).

    Returns ``vacuum`` (none|full|incremental), ``set_auto_vacuum`` (the mode to set, or None),
    ``reason`` and ``warnings``.
    """
    current = stats["auto_vacuum"]
    desired = opts.get("auto_vacuum")
    page_count = stats["page_count"]
    free = stats["freelist_count"]
    ratio = (float(free) / page_count) if page_count else 0.0
    over = free > 0 and ratio >= opts["vacuum_threshold"]
    policy = opts["vacuum"]
    warnings = []
    set_mode = desired if desired is not None and desired != current else None
    # none <-> full/incremental only takes effect through a VACUUM; full <-> incremental is a pragma.
    mode_needs_vacuum = set_mode is not None and "none" in (current, set_mode)
    effective_mode = set_mode or current

    vacuum = "none"
    threshold = opts["vacuum_threshold"]
    share = f"freelist {free} of {page_count} pages ({ratio * 100:.1f}%)"
    reason = f"{share} is below vacuum_threshold {threshold * 100:.1f}%"
    if policy == "always":
        vacuum, reason = "full", "vacuum=always"
    elif policy == "auto":
        if mode_needs_vacuum:
            vacuum, reason = "full", f"auto_vacuum {current} -> {set_mode} needs a VACUUM"
        elif over:
            vacuum = "incremental" if effective_mode == "incremental" else "full"
            reason = f"{share} is at or above vacuum_threshold {threshold * 100:.1f}%"
    else:
        reason = "vacuum=never"
        if mode_needs_vacuum:
            warnings.append(f"auto_vacuum stays {current}: changing it to {set_mode} needs a VACUUM and vacuum=never")
            set_mode = None
    return {"vacuum": vacuum, "set_auto_vacuum": set_mode, "reason": reason,
            "freelist_ratio": round(ratio, 6), "warnings": warnings}


def free_space_problem(path: str, size: int, temp_dir: str, statvfs=None) -> str | None:
    """None when the database filesystem and the temp directory can hold a VACUUM, else why not.

    VACUUM builds a copy in the temp directory (up to the database size) and then rewrites the
    database through its journal or WAL (up to the database size again). When both live on one
    filesystem it needs twice the size there.
    """
    statvfs = statvfs or os.statvfs
    db_dir = os.path.dirname(path)
    try:
        db_vfs = statvfs(db_dir)
        tmp_vfs = statvfs(temp_dir)
    except OSError as exc:
        return f"{path}: cannot read free space: {describe_oserror(exc)}"
    db_free = db_vfs.f_bavail * db_vfs.f_frsize
    tmp_free = tmp_vfs.f_bavail * tmp_vfs.f_frsize
    try:
        same_fs = os.stat(db_dir).st_dev == os.stat(temp_dir).st_dev
    except OSError:
        same_fs = False
    if same_fs:
        need = 2 * size
        if db_free < need:
            return (f"{path}: not enough free space for VACUUM: needs {need} bytes (temp copy + journal/WAL) "
                    f"on the filesystem holding {db_dir} and temp directory {temp_dir}, {db_free} bytes free")
        return None
    if db_free < size or tmp_free < size:
        return (f"{path}: not enough free space for VACUUM: needs {size} bytes for the journal/WAL in {db_dir} "
                f"({db_free} bytes free) and {size} bytes for the temp copy in {temp_dir} ({tmp_free} bytes free)")
    return None


# --- acting ----------------------------------------------------------------------------------

def _stat_fingerprint(conn: sqlite3.Connection) -> str | None:
    """A digest of the planner statistics (sqlite_stat1/stat4), None when there are none."""
    names = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('sqlite_stat1', 'sqlite_stat4') "
        "ORDER BY name")]
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        # name is one of the two fixed sqlite_stat table names selected above
        for row in conn.execute(f"SELECT * FROM {name} ORDER BY 1, 2"):  # noqa: S608
            digest.update(repr(row).encode())
    return digest.hexdigest()


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _writable_problem(path: str) -> str | None:
    directory = os.path.dirname(path)
    if not os.access(path, os.W_OK):
        return f"{path}: database is read-only for this user (the file is not writable)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (f"{path}: database is read-only for this user (directory {directory} is not writable; SQLite needs it "
                "for the journal/WAL)")
    return None


def _new_report(path: str, opts: dict) -> dict:
    return {
        "path": path,
        "size_before": _file_size(path), "size_after": None,
        "page_size": None,
        "page_count_before": None, "page_count_after": None,
        "freelist_count_before": None, "freelist_count_after": None,
        "bytes_reclaimed": 0,
        "journal_mode": None,
        "auto_vacuum_before": None, "auto_vacuum_after": None,
        "check": {"kind": opts["check"], "ok": None, "errors": []},
        "checkpoint": None, "checkpoint_after_vacuum": None,
        "would_vacuum": "none", "vacuum_reason": None, "vacuumed": "none",
        "would_analyze": "none", "analyzed": "none", "stats_changed": False,
        "changed": False, "error": None, "warnings": [], "duration": 0.0,
    }


def _maintain_one(path: str, opts: dict, check_mode: bool) -> dict:
    report = _new_report(path, opts)
    busy = opts["busy_timeout"]
    conn = connect(path, busy_timeout_ms=busy, readonly=check_mode)
    try:
        _run_steps(conn, path, opts, check_mode, report)
    except sqlite3.Error as exc:
        report["error"] = describe_sqlite_error(path, exc, busy)
    finally:
        conn.close()
    report["size_after"] = _file_size(path) if not check_mode else report["size_after"]
    return report


def _run_steps(conn, path, opts, check_mode, report) -> None:
    # 1. check first: a damaged database may not even yield its stats.
    ok, errors = run_check(conn, opts["check"])
    report["check"].update(ok=ok, errors=errors)
    if not ok:
        first = "; ".join(errors[:5])
        report["error"] = (f"{path}: {opts['check']} failed, database left untouched "
                           f"(no checkpoint, VACUUM or ANALYZE): {first}")
        return
    try:
        before = db_stats(conn)
    except sqlite3.DatabaseError as exc:
        if "malformed" in str(exc) or "not a database" in str(exc):
            report["check"].update(ok=False, errors=[str(exc)])
            report["error"] = f"{path}: database is damaged, left untouched: {exc}"
            return
        raise
    page_size = before["page_size"]
    report.update(page_size=page_size, page_count_before=before["page_count"],
                  freelist_count_before=before["freelist_count"], journal_mode=before["journal_mode"],
                  auto_vacuum_before=before["auto_vacuum"])
    wal = before["journal_mode"] == "wal"

    # 2. decide.
    decision = plan(before, opts)
    report["warnings"].extend(decision["warnings"])
    report["would_vacuum"] = decision["vacuum"]
    report["vacuum_reason"] = decision["reason"]
    report["would_analyze"] = opts["analyze"]
    stats_before = _stat_fingerprint(conn) if opts["analyze"] == "optimize" else None

    if check_mode:
        _predict(report, before, decision, opts)
        return

    writes = (decision["vacuum"] != "none" or decision["set_auto_vacuum"] or opts["analyze"] != "none"
              or (wal and opts["checkpoint"] != "none"))
    if writes:
        problem = _writable_problem(path)
        if problem:
            report["error"] = problem
            return
    temp_dir = opts["temp_dir"] or sqlite_temp_dir()
    if decision["vacuum"] == "full":
        problem = free_space_problem(path, page_size * before["page_count"], temp_dir)
        if problem:
            report["error"] = problem + "; nothing was changed"
            return

    # 3. checkpoint the WAL (a rollback-journal database has nothing to checkpoint).
    if wal and opts["checkpoint"] != "none":
        result = wal_checkpoint(conn, opts["checkpoint"])
        report["checkpoint"] = result
        if not result["complete"]:
            text = (f"{path}: WAL checkpoint ({opts['checkpoint']}) incomplete: busy={result['busy']}, "
                    f"{result['checkpointed']} of {result['log']} frames checkpointed "
                    "(another connection holds a snapshot or a write lock)")
            if opts["checkpoint_incomplete"] == "fail":
                report["error"] = text + "; checkpoint_incomplete=fail, no VACUUM or ANALYZE ran"
                return
            report["warnings"].append(text)

    # 4. vacuum.
    if decision["set_auto_vacuum"]:
        conn.execute("PRAGMA auto_vacuum = {}".format(decision["set_auto_vacuum"].upper()))
    if decision["vacuum"] == "full":
        if opts["temp_dir"]:
            conn.execute("PRAGMA temp_store_directory = '{}'".format(temp_dir.replace("'", "''")))
        try:
            conn.execute("VACUUM")
        finally:
            if opts["temp_dir"]:
                conn.execute("PRAGMA temp_store_directory = ''")
        report["vacuumed"] = "full"
    elif decision["vacuum"] == "incremental":
        # The pragma frees one page per step and Python's execute() steps a row-less statement
        # once; executescript() steps it to the end.
        conn.executescript("PRAGMA incremental_vacuum;")
        report["vacuumed"] = "incremental"
    if report["vacuumed"] != "none" and wal and opts["checkpoint"] != "none":
        # After a VACUUM in WAL mode the new pages sit in the WAL; the file shrinks at a checkpoint.
        result = wal_checkpoint(conn, opts["checkpoint"])
        report["checkpoint_after_vacuum"] = result
        if not result["complete"]:
            report["warnings"].append(
                f"{path}: WAL checkpoint after VACUUM incomplete ({result['checkpointed']} of {result['log']} "
                "frames): the file shrinks at a later checkpoint")

    # 5. statistics.
    if opts["analyze"] == "analyze":
        conn.execute("ANALYZE")
        report["analyzed"] = "analyze"
        report["stats_changed"] = True
    elif opts["analyze"] == "optimize":
        conn.execute(f"PRAGMA optimize({OPTIMIZE_MASK})").fetchall()
        report["analyzed"] = "optimize"
        report["stats_changed"] = _stat_fingerprint(conn) != stats_before

    after = db_stats(conn)
    report.update(page_count_after=after["page_count"], freelist_count_after=after["freelist_count"],
                  auto_vacuum_after=after["auto_vacuum"])
    mode_changed = after["auto_vacuum"] != before["auto_vacuum"]
    reclaimed = max(0, (before["page_count"] - after["page_count"]) * page_size)
    report["bytes_reclaimed"] = reclaimed
    report["changed"] = bool(reclaimed or mode_changed or report["stats_changed"])


def _predict(report: dict, before: dict, decision: dict, opts: dict) -> None:
    """Check mode: fill the "after" fields with what the run would most likely produce."""
    page_count = before["page_count"]
    free = before["freelist_count"]
    mode_after = decision["set_auto_vacuum"] or before["auto_vacuum"]
    if decision["vacuum"] in ("full", "incremental"):
        page_count_after, free_after = page_count - free, 0
    else:
        page_count_after, free_after = page_count, free
    reclaimed = (page_count - page_count_after) * before["page_size"]
    report.update(page_count_after=page_count_after, freelist_count_after=free_after,
                  auto_vacuum_after=mode_after, bytes_reclaimed=reclaimed,
                  size_after=max(0, report["size_before"] - reclaimed))
    # ANALYZE always rewrites the statistics; what PRAGMA optimize would do cannot be known
    # without running it, so check mode does not count it as a change.
    report["stats_changed"] = opts["analyze"] == "analyze"
    report["changed"] = bool(reclaimed or mode_after != before["auto_vacuum"] or report["stats_changed"])


# --- the whole run ---------------------------------------------------------------------------

def maintain(databases, check_mode: bool = False, now=None, **options) -> dict:
    """Maintain each database; returns ``{"changed", "databases", "warnings"}``.

    Bad options or a missing / non-SQLite path raise RunbookError before any database is touched.
    A database that fails (damaged, locked, read-only, not enough space, incomplete checkpoint with
    checkpoint_incomplete=fail) is left as it was, the others are still maintained, and a
    MaintenanceError carrying the full report is raised at the end.
    """
    paths, opts = validate_options(databases, options)
    clock = now or time.time
    reports = []
    for path in paths:
        started = time.monotonic()
        try:
            report = _maintain_one(path, opts, check_mode)
        except RunbookError as exc:  # raised by connect(): cannot open
            report = _new_report(path, opts)
            report["error"] = str(exc)
        report["duration"] = round(time.monotonic() - started, 6)
        reports.append(report)
    warnings = [text for report in reports for text in report["warnings"]]
    result = {"changed": any(report["changed"] for report in reports), "databases": reports,
              "warnings": warnings, "check_mode": check_mode}
    if opts["metrics_file"] and not check_mode:
        try:
            write_textfile(opts["metrics_file"], metrics_rows(reports, clock()))
        except OSError as exc:
            raise MaintenanceError("{}: cannot write metrics: {}".format(opts["metrics_file"], describe_oserror(exc)),
                                   result) from None
        except RunbookError as exc:
            raise MaintenanceError(str(exc), result) from None
    errors = [report["error"] for report in reports if report["error"]]
    if errors:
        raise MaintenanceError("; ".join(errors), result)
    return result


def metrics_rows(reports: list[dict], timestamp: float) -> list:
    """node_exporter textfile rows, grouped by metric name (the format wants families together)."""
    families = [
        ("runbook_sqlite_maintenance_last_run_timestamp_seconds", "gauge",
         "Unix time the maintenance run finished for this database.", lambda r: timestamp),
        ("runbook_sqlite_maintenance_success", "gauge",
         "1 when maintenance of this database completed without error.", lambda r: 0 if r["error"] else 1),
        ("runbook_sqlite_maintenance_check_ok", "gauge",
         "1 when the integrity/quick check passed (or was not asked for).", lambda r: 1 if r["check"]["ok"] else 0),
        ("runbook_sqlite_maintenance_bytes_reclaimed", "gauge",
         "Bytes the last VACUUM or incremental vacuum gave back.", lambda r: r["bytes_reclaimed"]),
        ("runbook_sqlite_maintenance_size_bytes", "gauge",
         "Size of the database file after maintenance.", lambda r: r["size_after"] or r["size_before"] or 0),
        ("runbook_sqlite_maintenance_duration_seconds", "gauge",
         "Seconds the maintenance of this database took.", lambda r: r["duration"]),
    ]
    rows = []
    for name, kind, help_text, value in families:
        for report in reports:
            rows.append((name, kind, help_text, {"db": report["path"]}, value(report)))
    return rows


def diff(result: dict) -> dict:
    """Ansible diff: one line per database with size, page and freelist counts."""
    def line(report, when):
        return "{}: size={} page_count={} freelist_count={} auto_vacuum={}\n".format(
            report["path"], report[f"size_{when}"], report[f"page_count_{when}"],
            report[f"freelist_count_{when}"], report[f"auto_vacuum_{when}"])
    return {"before": "".join(line(r, "before") for r in result["databases"]),
            "after": "".join(line(r, "after") for r in result["databases"])}


# --- host-side entry point -------------------------------------------------------------------

def cli(argv=None) -> int:
    """``python3 -m ...._maintenance DB [DB ...] [--options]``: the maintenance timer's command.

    Prints the JSON report on stdout, warnings and the error on stderr; exits 0 when every
    database is fine, 1 when one failed, 2 on bad arguments.
    """
    parser = argparse.ArgumentParser(prog="runbook-sqlite-maintenance",
                                     description="Check, checkpoint, vacuum and analyze SQLite databases.")
    parser.add_argument("databases", nargs="+", metavar="DATABASE")
    parser.add_argument("--check", choices=CHECKS, default=DEFAULTS["check"])
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default=DEFAULTS["checkpoint"])
    parser.add_argument("--checkpoint-incomplete", choices=CHECKPOINT_INCOMPLETE,
                        default=DEFAULTS["checkpoint_incomplete"])
    parser.add_argument("--vacuum", choices=VACUUMS, default=DEFAULTS["vacuum"])
    parser.add_argument("--vacuum-threshold", type=float, default=DEFAULTS["vacuum_threshold"])
    parser.add_argument("--auto-vacuum", choices=AUTO_VACUUM_MODES, default=None)
    parser.add_argument("--analyze", choices=ANALYZES, default=DEFAULTS["analyze"])
    parser.add_argument("--busy-timeout", type=int, default=DEFAULTS["busy_timeout"], metavar="MS")
    parser.add_argument("--temp-dir", default=None)
    parser.add_argument("--metrics-file", default=None)
    parser.add_argument("--check-mode", action="store_true", help="report what would be done, change nothing")
    args = parser.parse_args(argv)
    options = {key: getattr(args, key) for key in DEFAULTS}
    try:
        result = maintain(args.databases, check_mode=args.check_mode, **options)
        code = 0
    except MaintenanceError as exc:
        result, code = exc.result, 1
        result["msg"] = str(exc)
    except RunbookError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    for text in result.get("warnings", []):
        sys.stderr.write(f"warning: {text}\n")
    if code:
        sys.stderr.write("error: {}\n".format(result["msg"]))
    sys.stdout.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return code


if __name__ == "__main__":
    raise SystemExit(cli())
