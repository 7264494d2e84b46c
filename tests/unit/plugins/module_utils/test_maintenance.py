# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _maintenance
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError
from ansible_collections.runbook.sqlite_app.plugins.module_utils._maintenance import (
    MaintenanceError,
    cli,
    diff,
    free_space_problem,
    maintain,
    plan,
)

QUIET = {"analyze": "none"}


# --- helpers ---------------------------------------------------------------------------------

def make_db(path, *, rows=4000, keep_every=0, wal=False, auto_vacuum=None, payload=200):
    """A real database with a table and an index; keep_every=N deletes all rows but every N-th."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    if auto_vacuum:
        conn.execute(f"PRAGMA auto_vacuum = {auto_vacuum}")
    if wal:
        conn.execute("PRAGMA journal_mode = wal")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, body TEXT)")
    conn.execute("CREATE INDEX items_name ON items (name)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO items (name, body) VALUES (?, ?)",
                     [(f"n{i:05d}", "x" * payload) for i in range(rows)])
    conn.execute("COMMIT")
    if keep_every:
        conn.execute("DELETE FROM items WHERE id % ? != 0", (keep_every,))
    conn.close()
    return str(path)


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def fingerprint(path):
    st = os.stat(path)
    return sha256(path), st.st_mtime_ns, st.st_size


def pragma(path, name):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def damage(path):
    """Overwrite pages 3..6 of a multi-page database with garbage (header and schema page intact)."""
    page_size = pragma(path, "page_size")
    assert pragma(path, "page_count") > 10
    with open(path, "r+b") as handle:
        handle.seek(2 * page_size)
        handle.write(b"\xde\xad\xbe\xef" * (page_size * 4 // 4))


@pytest.fixture
def big_freelist(tmp_path):
    return make_db(tmp_path / "big.db", rows=4000, keep_every=10)


@pytest.fixture
def compact(tmp_path):
    path = make_db(tmp_path / "compact.db", rows=500)
    maintain([path], vacuum="always", analyze="none")
    return path


# --- vacuum policy ---------------------------------------------------------------------------

def test_big_freelist_auto_vacuums_then_second_run_not_changed(big_freelist):
    before = os.path.getsize(big_freelist)
    result = maintain([big_freelist], **QUIET)
    assert result["changed"] is True
    report = result["databases"][0]
    assert report["vacuumed"] == "full"
    assert report["freelist_count_before"] > 0 and report["freelist_count_after"] == 0
    assert report["page_count_after"] < report["page_count_before"]
    assert report["bytes_reclaimed"] == (report["page_count_before"] - report["page_count_after"]) * report["page_size"]
    assert report["size_before"] == before and report["size_after"] < before
    assert report["check"] == {"kind": "quick_check", "ok": True, "errors": []}
    assert pragma(big_freelist, "freelist_count") == 0

    again = maintain([big_freelist])  # default analyze=optimize
    assert again["changed"] is False
    assert again["databases"][0]["vacuumed"] == "none"
    assert again["databases"][0]["analyzed"] == "optimize"
    assert again["databases"][0]["stats_changed"] is False


def test_compact_database_not_changed(compact):
    before = fingerprint(compact)
    result = maintain([compact])
    assert result["changed"] is False
    assert result["databases"][0]["would_vacuum"] == "none"
    assert "below vacuum_threshold" in result["databases"][0]["vacuum_reason"]
    assert sha256(compact) == before[0]


def test_threshold_boundary_is_inclusive():
    stats = {"auto_vacuum": "none", "page_count": 100, "freelist_count": 10}
    opts = dict(_maintenance.DEFAULTS)
    assert plan(stats, opts)["vacuum"] == "full"
    assert plan(dict(stats, freelist_count=9), opts)["vacuum"] == "none"
    assert plan(dict(stats, freelist_count=0), dict(opts, vacuum_threshold=0.0))["vacuum"] == "none"
    assert plan(dict(stats, freelist_count=0), dict(opts, vacuum="always"))["vacuum"] == "full"
    assert plan(stats, dict(opts, vacuum="never"))["vacuum"] == "none"


def test_vacuum_never_leaves_freelist(big_freelist):
    before = sha256(big_freelist)
    result = maintain([big_freelist], vacuum="never", **QUIET)
    assert result["changed"] is False
    assert result["databases"][0]["vacuumed"] == "none"
    assert sha256(big_freelist) == before


def test_analyze_always_changed_optimize_only_when_stats_differ(compact):
    assert maintain([compact], analyze="analyze")["changed"] is True
    assert maintain([compact], analyze="analyze")["databases"][0]["stats_changed"] is True
    result = maintain([compact], analyze="optimize")
    assert result["changed"] is False and result["databases"][0]["analyzed"] == "optimize"


def test_temp_dir_is_used_for_vacuum(big_freelist, tmp_path):
    temp = tmp_path / "vacuum-tmp"
    temp.mkdir()
    result = maintain([big_freelist], temp_dir=str(temp), **QUIET)
    assert result["databases"][0]["vacuumed"] == "full"
    assert list(temp.iterdir()) == []


# --- auto_vacuum modes ---------------------------------------------------------------------------

def test_auto_vacuum_mode_change_runs_vacuum(compact):
    result = maintain([compact], auto_vacuum="incremental", **QUIET)
    report = result["databases"][0]
    assert result["changed"] is True
    assert report["vacuumed"] == "full" and "needs a VACUUM" in report["vacuum_reason"]
    assert (report["auto_vacuum_before"], report["auto_vacuum_after"]) == ("none", "incremental")
    assert pragma(compact, "auto_vacuum") == 2
    assert maintain([compact], auto_vacuum="incremental", **QUIET)["changed"] is False


def test_full_to_incremental_is_a_pragma_not_a_vacuum(tmp_path):
    path = make_db(tmp_path / "full.db", rows=200, auto_vacuum="full")
    result = maintain([path], auto_vacuum="incremental", **QUIET)
    assert result["changed"] is True
    assert result["databases"][0]["vacuumed"] == "none"
    assert pragma(path, "auto_vacuum") == 2


def test_mode_change_with_vacuum_never_warns_and_changes_nothing(compact):
    before = sha256(compact)
    result = maintain([compact], auto_vacuum="full", vacuum="never", **QUIET)
    assert result["changed"] is False
    assert any("needs a VACUUM and vacuum=never" in text for text in result["warnings"])
    assert sha256(compact) == before


def test_incremental_database_gets_incremental_vacuum(tmp_path):
    path = make_db(tmp_path / "inc.db", rows=4000, keep_every=10, auto_vacuum="incremental")
    assert pragma(path, "freelist_count") > 0
    result = maintain([path], **QUIET)
    report = result["databases"][0]
    assert result["changed"] is True
    assert report["would_vacuum"] == "incremental" and report["vacuumed"] == "incremental"
    assert report["freelist_count_after"] == 0 and report["bytes_reclaimed"] > 0
    assert maintain([path], **QUIET)["changed"] is False


# --- damaged, missing, locked, read-only, no space --------------------------------------------------

def test_damaged_database_fails_check_and_is_not_touched(tmp_path):
    path = make_db(tmp_path / "bad.db", rows=4000, keep_every=10)
    damage(path)
    before = fingerprint(path)
    with pytest.raises(MaintenanceError) as caught:
        maintain([path], vacuum="always", analyze="analyze")
    message = str(caught.value)
    assert path in message and "quick_check failed" in message and "untouched" in message
    report = caught.value.result["databases"][0]
    assert report["check"]["ok"] is False and report["check"]["errors"]
    assert report["vacuumed"] == "none" and report["analyzed"] == "none"
    assert caught.value.result["changed"] is False
    assert fingerprint(path) == before


def test_damaged_database_does_not_stop_the_others(tmp_path, big_freelist):
    bad = make_db(tmp_path / "bad.db", rows=4000, keep_every=10)
    damage(bad)
    bad_sha = sha256(bad)
    with pytest.raises(MaintenanceError) as caught:
        maintain([bad, big_freelist], check="integrity_check", **QUIET)
    reports = {r["path"]: r for r in caught.value.result["databases"]}
    assert reports[bad]["error"] and reports[bad]["vacuumed"] == "none"
    assert reports[big_freelist]["error"] is None and reports[big_freelist]["vacuumed"] == "full"
    assert caught.value.result["changed"] is True
    assert sha256(bad) == bad_sha
    assert bad in str(caught.value) and big_freelist not in str(caught.value)


def test_missing_file_fails_before_anything_is_touched(tmp_path, big_freelist):
    before = sha256(big_freelist)
    missing = str(tmp_path / "nope.db")
    with pytest.raises(RunbookError, match="nope.db: database file does not exist"):
        maintain([big_freelist, missing])
    assert sha256(big_freelist) == before


def test_not_a_database(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, not sqlite\n" * 100)
    with pytest.raises(RunbookError, match="notes.txt: not an SQLite database"):
        maintain([str(path)])
    assert path.read_bytes() == b"hello, not sqlite\n" * 100


@pytest.mark.parametrize("name,value,match", [
    ("vacuum_threshold", 1.5, "vacuum_threshold"),
    ("vacuum", "sometimes", "vacuum="),
    ("busy_timeout", -1, "busy_timeout"),
    ("temp_dir", "/nonexistent/dir", "temp_dir does not exist"),
])
def test_bad_options(compact, name, value, match):
    with pytest.raises(RunbookError, match=match):
        maintain([compact], **{name: value})


HOLD_LOCK = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()
""")


def test_locked_past_busy_timeout(big_freelist):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, big_freelist],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sha256(big_freelist)
        started = time.monotonic()
        with pytest.raises(MaintenanceError) as caught:
            maintain([big_freelist], busy_timeout=300)
        assert time.monotonic() - started >= 0.25
        assert str(caught.value) == (
            f"{big_freelist}: database is locked by another process past busy_timeout (300 ms)")
        assert caught.value.result["databases"][0]["vacuumed"] == "none"
        assert sha256(big_freelist) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_read_only_file_message(big_freelist, monkeypatch):
    """Root ignores modes: fake what os.access says for a 0444 file owned by someone else."""
    before = sha256(big_freelist)
    real_access = os.access
    monkeypatch.setattr(_maintenance.os, "access",
                        lambda p, mode: False if p == big_freelist else real_access(p, mode))
    with pytest.raises(MaintenanceError, match="big.db: database is read-only for this user"):
        maintain([big_freelist])
    assert sha256(big_freelist) == before


def test_read_only_sqlite_error_is_described(big_freelist, monkeypatch):
    """SQLite's own "attempt to write a readonly database" becomes the read-only message."""
    real_connect = _maintenance.connect
    monkeypatch.setattr(_maintenance, "connect", lambda path, busy_timeout_ms, readonly: real_connect(
        path, busy_timeout_ms=busy_timeout_ms, readonly=True))
    before = sha256(big_freelist)
    with pytest.raises(MaintenanceError, match="big.db: database is read-only for this user"):
        maintain([big_freelist], **QUIET)
    assert sha256(big_freelist) == before


def _mount_tmpfs(directory, options):
    directory.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                              capture_output=True, check=False)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")


def _umount(directory):
    subprocess.run(["umount", str(directory)], check=False)


def test_read_only_filesystem_for_real(tmp_path, big_freelist):
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "size=16m")
    try:
        path = str(mnt / "big.db")
        with open(big_freelist, "rb") as src, open(path, "wb") as dest:
            dest.write(src.read())
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = fingerprint(path)
        with pytest.raises(MaintenanceError, match="ro/big.db: database is read-only for this user"):
            maintain([path])
        assert fingerprint(path) == before
    finally:
        _umount(mnt)


def test_free_space_refusal_on_a_small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "size=2m")
    try:
        path = make_db(mnt / "big.db", rows=6000, keep_every=10, payload=100)
        size = os.path.getsize(path)
        assert 700 * 1024 < size < 1900 * 1024, size
        before = fingerprint(path)
        with pytest.raises(MaintenanceError) as caught:
            maintain([path], temp_dir=str(mnt), **QUIET)
        message = str(caught.value)
        assert message.startswith(f"{path}: not enough free space for VACUUM: needs {2 * size} bytes")
        assert str(mnt) in message and "nothing was changed" in message
        assert fingerprint(path) == before
    finally:
        _umount(mnt)


class FakeVfs:
    def __init__(self, free):
        self.f_bavail = free // 4096
        self.f_frsize = 4096


def test_free_space_refusal_names_both_paths(big_freelist, tmp_path, monkeypatch):
    temp = tmp_path / "t"
    temp.mkdir()
    db_dir = os.path.dirname(big_freelist)
    monkeypatch.setattr(_maintenance.os, "statvfs",
                        lambda p: FakeVfs(10 ** 9 if os.path.abspath(p) == db_dir else 4096))
    # Pretend the temp dir is another filesystem.
    real_stat = os.stat

    def fake_stat(p, *args, **kwargs):
        st = real_stat(p, *args, **kwargs)
        if os.path.abspath(str(p)) == str(temp):
            return os.stat_result(tuple(st)[:2] + (4242,) + tuple(st)[3:])
        return st

    monkeypatch.setattr(_maintenance.os, "stat", fake_stat)
    before = sha256(big_freelist)
    with pytest.raises(MaintenanceError) as caught:
        maintain([big_freelist], temp_dir=str(temp), **QUIET)
    message = str(caught.value)
    size = caught.value.result["databases"][0]["page_count_before"] * 4096
    assert f"needs {size} bytes for the journal/WAL in {db_dir}" in message
    assert f"{size} bytes for the temp copy in {temp} (4096 bytes free)" in message
    assert sha256(big_freelist) == before


def test_free_space_same_filesystem_needs_twice(tmp_path):
    text = free_space_problem(str(tmp_path / "x.db"), 1000, str(tmp_path), statvfs=lambda p: FakeVfs(1999))
    assert text is not None and "needs 2000 bytes" in text
    assert free_space_problem(str(tmp_path / "x.db"), 1000, str(tmp_path), statvfs=lambda p: FakeVfs(8192)) is None


# --- WAL checkpoints -----------------------------------------------------------------------------

@pytest.fixture
def wal_with_reader(tmp_path):
    """A WAL database whose reader holds a snapshot older than the last commits."""
    path = make_db(tmp_path / "wal.db", rows=200, wal=True)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("INSERT INTO items (name, body) VALUES ('a', 'b')")
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM items").fetchone()
    writer.executemany("INSERT INTO items (name, body) VALUES (?, ?)", [(f"w{i}", "y" * 500) for i in range(200)])
    yield path
    reader.execute("COMMIT")
    reader.close()
    writer.close()


def test_checkpoint_complete_in_wal_mode(tmp_path):
    path = make_db(tmp_path / "wal.db", rows=200, wal=True)
    holder = sqlite3.connect(path, isolation_level=None)  # keeps the WAL from being removed on close
    holder.execute("PRAGMA wal_autocheckpoint = 0")
    holder.execute("INSERT INTO items (name, body) VALUES ('a', 'b')")
    try:
        result = maintain([path], **QUIET)
        checkpoint = result["databases"][0]["checkpoint"]
        assert checkpoint["complete"] is True and checkpoint["busy"] == 0
        assert checkpoint["log"] > 0 and checkpoint["checkpointed"] == checkpoint["log"]
        assert result["warnings"] == [] and result["changed"] is False
    finally:
        holder.close()


def test_checkpoint_incomplete_warns(wal_with_reader):
    result = maintain([wal_with_reader], **QUIET)
    checkpoint = result["databases"][0]["checkpoint"]
    assert checkpoint["complete"] is False
    assert checkpoint["checkpointed"] < checkpoint["log"]
    assert len(result["warnings"]) == 1
    assert result["warnings"][0].startswith(wal_with_reader + ": WAL checkpoint (passive) incomplete")


def test_checkpoint_incomplete_fails_when_asked(wal_with_reader):
    with pytest.raises(MaintenanceError, match="checkpoint_incomplete=fail") as caught:
        maintain([wal_with_reader], checkpoint_incomplete="fail", vacuum="always", analyze="analyze")
    report = caught.value.result["databases"][0]
    assert report["vacuumed"] == "none" and report["analyzed"] == "none"


def test_truncate_checkpoint_with_reader_reports_busy(wal_with_reader):
    result = maintain([wal_with_reader], checkpoint="truncate", busy_timeout=200, **QUIET)
    checkpoint = result["databases"][0]["checkpoint"]
    assert checkpoint["mode"] == "truncate" and checkpoint["busy"] == 1 and checkpoint["complete"] is False


def test_vacuum_in_wal_mode_shrinks_the_file(tmp_path):
    path = make_db(tmp_path / "walbig.db", rows=4000, keep_every=10, wal=True)
    before = os.path.getsize(path)
    result = maintain([path], checkpoint="truncate", **QUIET)
    report = result["databases"][0]
    assert report["vacuumed"] == "full" and report["checkpoint_after_vacuum"]["complete"] is True
    assert os.path.getsize(path) < before and report["size_after"] < before
    assert maintain([path], **QUIET)["changed"] is False


# --- several databases, check mode, diff, metrics, cli --------------------------------------------

def test_multiple_databases_in_one_call(big_freelist, compact):
    result = maintain([big_freelist, compact, big_freelist], **QUIET)
    assert [r["path"] for r in result["databases"]] == [big_freelist, compact]
    assert [r["changed"] for r in result["databases"]] == [True, False]
    assert result["changed"] is True
    assert maintain([big_freelist, compact], **QUIET)["changed"] is False


@pytest.mark.parametrize("wal", [False, True])
def test_check_mode_changes_nothing(tmp_path, wal):
    path = make_db(tmp_path / "cm.db", rows=4000, keep_every=10, wal=wal)
    before = fingerprint(path)
    result = maintain([path], check_mode=True, auto_vacuum="incremental", analyze="analyze")
    report = result["databases"][0]
    assert result["changed"] is True and result["check_mode"] is True
    assert report["would_vacuum"] == "full" and report["vacuumed"] == "none"
    assert report["would_analyze"] == "analyze" and report["analyzed"] == "none"
    assert report["checkpoint"] is None
    assert report["freelist_count_after"] == 0 and report["bytes_reclaimed"] > 0
    assert report["auto_vacuum_after"] == "incremental"
    assert fingerprint(path) == before
    assert pragma(path, "auto_vacuum") == 0


def test_check_mode_predicts_not_changed_after_real_run(big_freelist):
    maintain([big_freelist], **QUIET)
    before = fingerprint(big_freelist)
    assert maintain([big_freelist], check_mode=True)["changed"] is False
    assert fingerprint(big_freelist) == before


def test_check_mode_does_not_write_metrics(big_freelist, tmp_path):
    metrics = tmp_path / "m.prom"
    maintain([big_freelist], check_mode=True, metrics_file=str(metrics))
    assert not metrics.exists()


def test_diff_shows_sizes(big_freelist):
    result = maintain([big_freelist], **QUIET)
    shown = diff(result)
    report = result["databases"][0]
    assert f"page_count={report['page_count_before']}" in shown["before"]
    assert f"page_count={report['page_count_after']}" in shown["after"]
    assert shown["before"].startswith(big_freelist + ": size=")


def test_metrics_file(big_freelist, tmp_path):
    bad = make_db(tmp_path / "bad.db", rows=4000, keep_every=10)
    damage(bad)
    metrics = tmp_path / "textfile" / "sqlite.prom"
    metrics.parent.mkdir()
    with pytest.raises(MaintenanceError):
        maintain([big_freelist, bad], metrics_file=str(metrics), now=lambda: 1700000000.0, **QUIET)
    text = metrics.read_text()
    assert oct(os.stat(metrics).st_mode & 0o777) == "0o644"
    assert f'runbook_sqlite_maintenance_last_run_timestamp_seconds{{db="{big_freelist}"}} 1700000000.0' in text
    assert f'runbook_sqlite_maintenance_check_ok{{db="{big_freelist}"}} 1' in text
    assert f'runbook_sqlite_maintenance_check_ok{{db="{bad}"}} 0' in text
    assert f'runbook_sqlite_maintenance_success{{db="{bad}"}} 0' in text
    assert "runbook_sqlite_maintenance_bytes_reclaimed{" in text
    assert "runbook_sqlite_maintenance_duration_seconds{" in text
    assert text.count("# TYPE runbook_sqlite_maintenance_check_ok gauge") == 1


def test_cli_ok_and_failure(big_freelist, tmp_path, capsys):
    assert cli([big_freelist, "--analyze", "none"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] is True and out["databases"][0]["vacuumed"] == "full"

    bad = make_db(tmp_path / "bad.db", rows=4000, keep_every=10)
    damage(bad)
    assert cli([bad]) == 1
    captured = capsys.readouterr()
    assert f"error: {bad}: quick_check failed" in captured.err
    assert json.loads(captured.out)["databases"][0]["check"]["ok"] is False

    assert cli([str(tmp_path / "missing.db")]) == 1
    assert "missing.db: database file does not exist" in capsys.readouterr().err
