# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import calendar
import errno
import fcntl
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError

HAVE_ZSTD = shutil.which("zstd") is not None
needs_zstd = pytest.mark.skipif(not HAVE_ZSTD, reason="zstd binary not installed")


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


def make_db(path, rows=100, journal_mode="wal", user_version=0):
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=%s" % journal_mode)
    conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("CREATE TABLE IF NOT EXISTS users (name TEXT)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO items (body) VALUES (?)", [("row %d" % i,) for i in range(rows)])
    conn.execute("INSERT INTO users VALUES ('alice')")
    conn.execute("COMMIT")
    conn.execute("PRAGMA user_version=%d" % user_version)
    conn.close()
    return str(path)


def count(path, table="items"):
    # A long timeout: in rollback-journal mode a busy writer can keep a reader waiting for seconds.
    conn = sqlite3.connect(str(path), timeout=60)
    try:
        return conn.execute("SELECT count(*) FROM %s" % table).fetchone()[0]  # noqa: S608 (fixed table names)
    finally:
        conn.close()


@pytest.fixture
def app(tmp_path):
    root = tmp_path / "app"
    (root / "certs").mkdir(parents=True)
    make_db(root / "app.db", rows=50, user_version=7)
    make_db(root / "tokens.db", rows=3, journal_mode="delete")
    (root / ".env").write_text("API_KEY=secret\n")
    os.chmod(root / ".env", 0o640)
    (root / "certs" / "server.pem").write_text("CERT\n")
    os.symlink("server.pem", str(root / "certs" / "current.pem"))
    dest = tmp_path / "sets"
    dest.mkdir()
    return root, dest


def params(root, dest, **extra):
    base = {"databases": [str(root / "app.db"), str(root / "tokens.db")],
            "extra_paths": [str(root / ".env"), str(root / "certs")],
            "root": str(root), "dest": str(dest), "compression": "gzip"}
    base.update(extra)
    return base


def listing(directory):
    return sorted(os.listdir(str(directory)))


def set_files(dest):
    return [name for name in listing(dest) if not name.startswith(".")]


def fake_set(dest, when, prefix="backup", verified=True, ext=".tar.gz"):
    name = "%s-%s%s" % (prefix, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when)), ext)
    (dest / name).write_bytes(b"x")
    if verified:
        (dest / (name + ".sha256")).write_text("%s  %s\n" % ("0" * 64, name))
    return name


def write_set(path, members, sidecar=True, fmt=bs.FORMAT_VERSION):
    """Craft a set: members is a list of (TarInfo, bytes or None); manifest built from the files,
    their sha256s in a last SHA256SUMS member (formats 2 and 3; from 3 on, with the manifest's) or in
    the manifest (format 1)."""
    manifest = {"format": fmt, "members": [], "databases": []}
    sums = ""
    for info, data in members:
        entry = {"member": info.name, "path": "/nowhere/" + info.name, "type": "file"}
        if info.isfile():
            entry["size"] = len(data)
            if fmt == 1:
                entry["sha256"] = hashlib.sha256(data).hexdigest()
            else:
                sums += "%s  %s\n" % (hashlib.sha256(data).hexdigest(), info.name)
        manifest["members"].append(entry)
    raw = json.dumps(manifest).encode()
    if fmt >= 3:
        sums = "%s  %s\n" % (hashlib.sha256(raw).hexdigest(), bs.MANIFEST) + sums
    with tarfile.open(str(path), "w") as tar:
        info = tarfile.TarInfo(bs.MANIFEST)
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        if fmt >= 2:
            tar.addfile(_info(bs.CHECKSUMS, size=len(sums)), io.BytesIO(sums.encode()))
    if sidecar:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        (path.parent / (path.name + ".sha256")).write_text("%s  %s\n" % (digest, path.name))
    return str(path)


# ---------------------------------------------------------------------------------------------
# backup: set layout and manifest


def test_backup_writes_one_verified_set_with_manifest(app):
    root, dest = app
    result = bs.backup(params(root, dest, label="pre upgrade!", compression="gzip"))
    assert result["changed"] is True
    name = result["name"]
    assert name.startswith("backup-") and name.endswith("-pre-upgrade.tar.gz")
    assert set_files(dest) == [name, name + ".sha256"]
    assert stat.S_IMODE(os.stat(result["path"]).st_mode) == 0o600
    # sha256sum -c works by hand
    out = subprocess.run(["sha256sum", "-c", name + ".sha256"], cwd=str(dest), capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with tarfile.open(result["path"]) as tar:
        names = tar.getnames()
        manifest_bytes = tar.extractfile(bs.MANIFEST).read()
        manifest = json.loads(manifest_bytes)
        sums = tar.extractfile(bs.CHECKSUMS).read().decode()
    assert names[0] == "manifest.json" and names[-1] == "SHA256SUMS"
    assert "databases/app.db" in names and "databases/tokens.db" in names
    assert "files/.env" in names and "files/certs/server.pem" in names and "files/certs/current.pem" in names
    assert manifest["format"] == bs.FORMAT_VERSION
    assert manifest["label"] == "pre upgrade!"
    assert manifest["compression"] == "gzip"
    assert manifest["created_at"].endswith("Z")
    assert manifest["host"]
    dbs = {db["member"]: db for db in manifest["databases"]}
    assert dbs["databases/app.db"]["journal_mode"] == "wal"
    assert dbs["databases/app.db"]["user_version"] == 7
    assert dbs["databases/app.db"]["path"] == str(root / "app.db")
    assert dbs["databases/tokens.db"]["journal_mode"] == "delete"
    assert dbs["databases/app.db"]["page_count"] > 0 and dbs["databases/app.db"]["page_size"] > 0
    assert dbs["databases/app.db"]["check"]["ok"] is True
    env = [m for m in manifest["members"] if m["member"] == "files/.env"][0]
    # the stored manifest has no sha256s: they are in SHA256SUMS, written after the data
    assert "sha256" not in env and manifest["checksums"] == "SHA256SUMS"
    env_sum = "%s  files/.env\n" % hashlib.sha256(b"API_KEY=secret\n").hexdigest()
    assert env_sum in sums
    # SHA256SUMS covers every file of the set, the manifest first
    assert sums.splitlines()[0] == "%s  manifest.json" % hashlib.sha256(manifest_bytes).hexdigest()
    assert sorted(line.split("  ", 1)[1] for line in sums.splitlines()[1:]) == sorted(
        m["member"] for m in manifest["members"] if m["type"] in ("database", "file"))
    # the manifest returned to the caller carries them
    returned = [m for m in result["manifest"]["members"] if m["member"] == "files/.env"][0]
    assert returned["sha256"] == hashlib.sha256(b"API_KEY=secret\n").hexdigest()
    assert all(len(db["sha256"]) == 64 for db in result["databases"])
    assert env["mode"] == 0o640 and env["path"] == str(root / ".env")
    assert result["extra_members"][:1] == ["files/.env"]
    assert [d["member"] for d in result["databases"]] == ["databases/app.db", "databases/tokens.db"]
    # no temp files left, sources untouched
    assert not [n for n in listing(dest) if n.startswith(".runbook-tmp-")]
    assert count(root / "app.db") == 50


def test_members_by_basename_without_root(app):
    root, dest = app
    result = bs.backup({"databases": [str(root / "app.db")], "dest": str(dest), "compression": "none"})
    assert result["name"].endswith(".tar")
    assert [d["member"] for d in result["databases"]] == ["databases/app.db"]


def test_member_name_collision_is_an_error(app, tmp_path):
    root, dest = app
    other = tmp_path / "other"
    other.mkdir()
    make_db(other / "app.db")
    with pytest.raises(RunbookError, match="collides"):
        bs.backup({"databases": [str(root / "app.db"), str(other / "app.db")], "dest": str(dest)})
    assert set_files(dest) == []


@pytest.mark.parametrize("compression", ["none", "gzip", pytest.param("zstd", marks=needs_zstd)])
def test_compression_round_trip(app, tmp_path, compression):
    root, dest = app
    result = bs.backup(params(root, dest, compression=compression))
    assert result["name"].endswith(bs.EXTENSIONS[compression])
    manifest = bs.verify_set(result["path"])
    assert manifest["compression"] == compression
    # by hand: decompress with the usual tools and read the database with sqlite3
    out = tmp_path / "by-hand"
    out.mkdir()
    flags = {"none": [], "gzip": ["-z"], "zstd": ["--zstd"]}[compression]
    subprocess.run(["tar"] + flags + ["-xf", result["path"], "-C", str(out)], check=True)
    assert count(out / "databases" / "app.db") == 50
    assert (out / "files" / ".env").read_text() == "API_KEY=secret\n"


@needs_zstd
@pytest.mark.parametrize(("given", "expected"), [
    ({}, (1, 1)),
    ({"compression_level": 19}, (19, 1)),
    ({"compression_level": "3", "compression_threads": "0"}, (3, 0)),
])
def test_zstd_level_and_threads_reach_zstd(app, tmp_path, monkeypatch, given, expected):
    root, dest = app
    level, threads = expected
    commands = []
    real_popen = bs.subprocess.Popen

    def recording_popen(command, *args, **kwargs):
        commands.append(list(command))
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(bs.subprocess, "Popen", recording_popen)
    result = bs.backup(params(root, dest, compression="zstd", **given))
    writers = [command for command in commands if command[0] == "zstd" and "-c" in command]
    assert len(writers) == 1
    # the set is checked while it is written: one zstd -t reading the stream, none reading the file
    assert [command for command in commands if "-t" in command] == [["zstd", "-q", "-t"]]
    assert "-%d" % level in writers[0]
    assert ("-T%d" % threads in writers[0]) == (threads != 1)
    manifest = bs.verify_set(result["path"])
    assert manifest["compression_level"] == level
    out = tmp_path / "by-hand"
    out.mkdir()
    subprocess.run(["tar", "--zstd", "-xf", result["path"], "-C", str(out)], check=True)
    assert count(out / "databases" / "app.db") == 50


@pytest.mark.parametrize(("level", "xfl"), [(None, 0), (1, 4), (9, 2)])
def test_gzip_level_is_written(app, level, xfl):
    # byte 9 of a gzip header (XFL) records the effort: 4 fastest, 2 best, 0 in between
    root, dest = app
    result = bs.backup(params(root, dest, compression="gzip", compression_level=level))
    with open(result["path"], "rb") as handle:
        assert handle.read(9)[8] == xfl
    assert bs.verify_set(result["path"])["compression_level"] == (level or 6)


@pytest.mark.parametrize(("given", "message"), [
    ({"compression": "none", "compression_level": 3}, "compression_level=3: compression none has no level"),
    ({"compression": "gzip", "compression_level": 10}, "compression_level=10: gzip takes a level from 1 to 9"),
    ({"compression": "gzip", "compression_level": 0}, "compression_level=0: gzip takes a level from 1 to 9"),
    ({"compression": "zstd", "compression_level": 20}, "compression_level=20: zstd takes a level from 1 to 19"),
    ({"compression": "gzip", "compression_threads": 2}, "compression_threads=2: only zstd compresses in threads"),
    ({"compression": "zstd", "compression_threads": -1}, "compression_threads=-1: expected 0 .one per core."),
    ({"compression": "zstd", "compression_level": "fast"}, "compression_level='fast': must be a whole number"),
])
def test_bad_compression_level_or_threads(app, given, message):
    root, dest = app
    if given["compression"] == "zstd" and not HAVE_ZSTD:
        pytest.skip("zstd binary not installed")
    with pytest.raises(RunbookError, match=message):
        bs.backup(params(root, dest, **given))
    with pytest.raises(RunbookError, match=message):  # check mode refuses the same input
        bs.backup(params(root, dest, **given), check_mode=True)
    assert listing(dest) == []


def test_two_runs_in_one_second_get_distinct_names(app):
    root, dest = app
    first = bs.backup(params(root, dest))
    second = bs.backup(params(root, dest))
    assert first["name"] != second["name"]
    assert len(set_files(dest)) == 4


def test_check_mode_writes_nothing(app):
    root, dest = app
    bs.backup(params(root, dest))
    before = listing(dest)
    result = bs.backup(params(root, dest, keep_last=1), check_mode=True)
    assert result["changed"] is True
    assert result["name"].startswith("backup-")
    assert len(result["pruned"]) == 1
    assert listing(dest) == before


def test_metrics_file(app, tmp_path):
    root, dest = app
    prom = tmp_path / "backup.prom"
    bs.backup(params(root, dest, metrics_file=str(prom)))
    text = prom.read_text()
    assert "runbook_sqlite_backup_last_success_timestamp_seconds" in text
    assert "runbook_sqlite_backup_verified" in text and "runbook_sqlite_backup_size_bytes" in text


# ---------------------------------------------------------------------------------------------
# consistent snapshot under a concurrent writer


def _writer(path, stop, started):
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout=30000")
    started.set()
    while not stop.is_set():
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO items (body) VALUES (?)", [("w" * 200,)] * 20)
        conn.execute("COMMIT")
        # A short pause between commits, as an app's request loop has: without it a rollback-journal
        # writer retakes its lock at once and can starve every reader (SQLite's busy handler sleeps).
        time.sleep(0.002)
    conn.close()


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_snapshot_under_concurrent_writer(tmp_path, journal_mode):
    db = make_db(tmp_path / "live.db", rows=20000, journal_mode=journal_mode)
    dest = tmp_path / "sets"
    dest.mkdir()
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    stop, started = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_writer, args=(db, stop, started))
    proc.start()
    try:
        assert started.wait(10)
        time.sleep(0.3)
        committed_before = count(db)
        result = bs.backup({"databases": [db], "dest": str(dest), "compression": "none",
                            "check": "integrity_check", "busy_timeout": 30000})
        time.sleep(0.2)
    finally:
        stop.set()
        proc.join(30)
    assert proc.exitcode == 0
    assert count(db) > committed_before  # the writer kept going
    out = tmp_path / "out"
    out.mkdir()
    with tarfile.open(result["path"]) as tar:
        tar.extract("databases/live.db", str(out))
    copy = out / "databases" / "live.db"
    rows = count(copy)
    assert rows >= committed_before
    conn = sqlite3.connect(str(copy))
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT max(id) FROM items").fetchone()[0] == rows  # no torn transactions
    conn.close()
    assert rows % 20 == 0  # whole 20-row transactions only (20000 seed rows + n * 20)


# ---------------------------------------------------------------------------------------------
# retention


DAY = 86400


def test_retention_keep_last_and_newest_verified(tmp_path):
    now = calendar.timegm((2026, 6, 30, 12, 0, 0))
    names = [fake_set(tmp_path, now - i * 3600) for i in range(5)]
    kept, pruned = bs.select_retained(bs.list_sets(str(tmp_path), "backup"), {"keep_last": 2}, now)
    assert kept == names[:2] and pruned == names[2:]
    # none set: keep everything
    kept, pruned = bs.select_retained(bs.list_sets(str(tmp_path), "backup"), {}, now)
    assert pruned == []


def test_retention_newest_verified_is_never_deleted(tmp_path):
    now = calendar.timegm((2026, 6, 30, 12, 0, 0))
    unverified = fake_set(tmp_path, now, verified=False)
    verified = fake_set(tmp_path, now - DAY)
    kept, pruned = bs.select_retained(bs.list_sets(str(tmp_path), "backup"), {"keep_last": 1}, now)
    assert kept == [unverified, verified]
    kept, pruned = bs.select_retained(bs.list_sets(str(tmp_path), "backup"), {"keep_last": 0}, now)
    assert kept == [verified] and pruned == [unverified]


def test_retention_gfs_union(tmp_path):
    now = calendar.timegm((2026, 6, 30, 23, 0, 0))
    sets = []
    for day in range(120):  # two sets a day for 120 days
        for hour in (1, 13):
            sets.append(fake_set(tmp_path, now - day * DAY - (23 - hour) * 3600))
    listed = bs.list_sets(str(tmp_path), "backup")
    kept, pruned = bs.select_retained(listed, {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 3}, now)
    kept_days = {name.split("-")[1][:8] for name in kept}
    # the 7 newest days each keep their newest set (13:00)
    for day in range(7):
        stamp = time.strftime("%Y%m%d", time.gmtime(now - day * DAY))
        assert "backup-%sT130000Z.tar.gz" % stamp in kept
    assert len(kept_days) <= 7 + 4 + 3
    assert "backup-20260531T130000Z.tar.gz" in kept  # newest of May
    assert "backup-20260430T130000Z.tar.gz" in kept  # newest of April
    assert len(kept) + len(pruned) == 240
    kept2 = bs.select_retained(listed, {"keep_days": 2}, now)[0]
    assert len(kept2) == 4  # everything from the last 48 hours: 29 and 30 June, 01:00 and 13:00


def test_prune_state_removes_sets_and_sidecars_second_run_unchanged(tmp_path):
    now = time.time()
    for i in range(4):
        fake_set(tmp_path, now - i * DAY)
    (tmp_path / "unrelated.txt").write_text("keep me")
    result = bs.backup({"dest": str(tmp_path), "state": "pruned", "keep_last": 2})
    assert result["changed"] is True and len(result["pruned"]) == 2
    assert len([n for n in listing(tmp_path) if n.endswith(".sha256")]) == 2
    assert "unrelated.txt" in listing(tmp_path)
    again = bs.backup({"dest": str(tmp_path), "state": "pruned", "keep_last": 2})
    assert again["changed"] is False and again["pruned"] == []


def test_other_prefix_is_never_pruned(tmp_path):
    now = time.time()
    fake_set(tmp_path, now - 5 * DAY, prefix="other")
    fake_set(tmp_path, now)
    fake_set(tmp_path, now - DAY)
    result = bs.backup({"dest": str(tmp_path), "state": "pruned", "keep_last": 1})
    assert len(result["pruned"]) == 1
    assert any(n.startswith("other-") for n in listing(tmp_path))


def test_retention_over_10000_sets_is_fast(tmp_path):
    now = calendar.timegm((2026, 6, 30, 12, 0, 0))
    names = []
    for i in range(10000):
        name = "backup-%s.tar.zst" % time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now - i * 600))
        names.append(name)
    for name in names:
        open(str(tmp_path / name), "wb").close()
        open(str(tmp_path / (name + ".sha256")), "wb").close()
    started = time.monotonic()
    listed = bs.list_sets(str(tmp_path), "backup")
    kept, pruned = bs.select_retained(listed, {"keep_last": 10, "keep_daily": 7, "keep_weekly": 4,
                                               "keep_monthly": 12, "keep_days": 1}, now)
    assert time.monotonic() - started < 2.0
    assert len(listed) == 10000 and kept[0] == names[0] and len(kept) + len(pruned) == 10000


def test_name_parsing():
    assert bs.parse_set_name("my-app-20260101T010203Z-pre-upgrade.tar.zst") == (
        "my-app", calendar.timegm((2026, 1, 1, 1, 2, 3)), "pre-upgrade")
    assert bs.parse_set_name("backup-20260101T010203Z.tar")[2] == ""
    assert bs.parse_set_name("backup-2026.tar") is None
    assert bs.parse_set_name("backup-20260101T010203Z.tar.sha256") is None
    assert bs.parse_set_name("backup-20261301T010203Z.tar") is None  # month 13
    assert bs.parse_set_name("backup-20260101T250203Z.tar") is None  # hour 25
    assert bs.parse_set_name("backup-20260229T000000Z.tar")[1] == calendar.timegm((2026, 3, 1, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# lock


def test_lock_held_past_timeout(app):
    root, dest = app
    fd = os.open(str(dest / bs.LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(bs.LockTimeout, match="lock_timeout=0.3"):
            bs.backup(params(root, dest, lock_timeout=0.3))
    finally:
        os.close(fd)
    assert set_files(dest) == []


def test_restore_waits_for_a_running_backup(backed_up, tmp_path):
    dest = backed_up[1]
    fd = os.open(str(dest / bs.LOCK_NAME), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(bs.LockTimeout, match="holds the lock"):
            bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(tmp_path), "lock_timeout": 0})
    finally:
        os.close(fd)
    # two readers share the lock
    fd = os.open(str(dest / bs.LOCK_NAME), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        out = bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(tmp_path), "lock_timeout": 0})
    finally:
        os.close(fd)
    assert out["row_counts"]["app.db"]["items"] == 50


def _cli(args, tmp_path, config):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config))
    code = ("import sys; from ansible_collections.runbook.sqlite_app.plugins.module_utils._backupset import cli; "
            "sys.exit(cli())")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", code] + args + ["--config", str(cfg)], capture_output=True,
                          text=True, env=env, check=False)


def test_cli_exit_codes(app, tmp_path):
    root, dest = app
    ok = _cli(["backup"], tmp_path, params(root, dest))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"].startswith("backup-")
    bad = _cli(["backup"], tmp_path, params(root, dest, databases=[str(root / "missing.db")]))
    assert bad.returncode == 1 and "missing.db: database file does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
    fd = os.open(str(dest / bs.LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        busy = _cli(["prune"], tmp_path, {"dest": str(dest), "lock_timeout": 0, "keep_last": 1})
    finally:
        os.close(fd)
    assert busy.returncode == 75 and "holds the lock" in busy.stderr
    drill_dir = tmp_path / "drill"
    drill_dir.mkdir()
    drill = _cli(["drill"], tmp_path, {"src": str(dest), "drill_dir": str(drill_dir)})
    assert drill.returncode == 0, drill.stderr
    assert json.loads(drill.stdout)["row_counts"]["app.db"]["items"] == 50
    unknown = _cli(["backup"], tmp_path, dict(params(root, dest), colour="blue"))
    assert unknown.returncode == 1 and "unknown option(s): colour" in unknown.stderr


# ---------------------------------------------------------------------------------------------
# bad input for backup


def test_cli_json_values_are_typed_like_module_options(app, tmp_path):
    root, dest = app
    result = bs.backup(params(root, dest, databases=str(root / "app.db"), busy_timeout="2000", keep_last="3",
                              lock_timeout="5"))
    assert [d["member"] for d in result["databases"]] == ["databases/app.db"]
    drill_dir = tmp_path / "drill"
    drill_dir.mkdir()
    out = bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(drill_dir), "force": "false",
                      "extra_paths": "no"})
    assert out["row_counts"]["app.db"]["items"] == 50
    with pytest.raises(RunbookError, match="keep_last='many': must be a whole number"):
        bs.backup(params(root, dest, keep_last="many"))
    with pytest.raises(RunbookError, match="force='maybe': must be true or false"):
        bs.restore({"src": str(dest), "force": "maybe"})


def test_missing_database(app):
    root, dest = app
    with pytest.raises(RunbookError, match=r"missing\.db: database file does not exist"):
        bs.backup(params(root, dest, databases=[str(root / "missing.db")]))
    assert listing(dest) == []


def test_not_a_database(app):
    root, dest = app
    with pytest.raises(RunbookError, match=r"\.env: not an SQLite database"):
        bs.backup(params(root, dest, databases=[str(root / ".env")]))
    assert listing(dest) == []


def test_database_locked_past_busy_timeout(app):
    root, dest = app
    db = str(root / "tokens.db")  # rollback-journal mode
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(RunbookError, match=r"tokens\.db: database is locked .*busy_timeout \(200 ms\)"):
            bs.backup(params(root, dest, busy_timeout=200))
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert set_files(dest) == []
    assert not [n for n in listing(dest) if n.startswith(".runbook-tmp-")]


def test_dest_missing_or_not_a_directory(app, tmp_path):
    root, dest = app
    with pytest.raises(RunbookError, match="nope: destination directory does not exist"):
        bs.backup(params(root, tmp_path / "nope"))
    with pytest.raises(RunbookError, match=r"\.env: destination is not a directory"):
        bs.backup(params(root, root / ".env"))


@pytest.fixture
def tiny_mount(tmp_path):
    mounted = []

    def mount(options):
        target = tmp_path / ("mnt%d" % len(mounted))
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                              check=False)
        if done.returncode != 0:
            pytest.skip("cannot mount a tmpfs here: %s" % done.stderr.decode().strip())
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)


def test_unwritable_dest(app, tiny_mount):
    root = app[0]
    if os.geteuid() == 0:
        dest = tiny_mount("ro,size=1m")
    else:
        dest = root.parent / "ro"
        dest.mkdir()
        os.chmod(str(dest), 0o500)
    with pytest.raises(RunbookError, match="%s: destination directory is not writable" % dest):
        bs.backup(params(root, dest))


@pytest.mark.parametrize("compression", ["none", pytest.param("zstd", marks=needs_zstd)])
def test_enospc_on_a_real_tiny_filesystem(tmp_path, tiny_mount, compression):
    db = make_db(tmp_path / "big.db", rows=0)
    conn = sqlite3.connect(db)
    conn.executemany("INSERT INTO items (body) VALUES (?)", [(os.urandom(1024).hex(),) for dummy in range(2000)])
    conn.commit()  # ~4 MiB, ~2 MiB as zstd
    conn.close()
    # room for the scratch snapshot, not for the set next to it
    dest = tiny_mount("size=%dk" % (os.path.getsize(db) // 1024 + 512))
    bs.backup({"dest": str(dest), "state": "pruned"})  # creates the lock file
    with pytest.raises(RunbookError, match="writing the set failed: no space left on device"):
        bs.backup({"databases": [db], "dest": str(dest), "compression": compression})
    assert listing(dest) == [bs.LOCK_NAME]
    assert count(db) == 2000


@pytest.mark.parametrize("compression", ["none", "gzip", pytest.param("zstd", marks=needs_zstd)])
def test_enospc_while_writing_the_set(app, monkeypatch, compression):
    root, dest = app
    real_open = bs._open_writer

    class Full:
        def __init__(self, sink):
            self.sink = sink
            self.left = 3  # fail a few writes in, after the manifest

        def write(self, data):
            self.left -= 1
            if self.left <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.sink.write(data)

        def close(self):
            self.sink.close()

    def full_open(staged, comp, **kwargs):
        sink, proc = real_open(staged, comp, **kwargs)
        return Full(sink), proc

    monkeypatch.setattr(bs, "_open_writer", full_open)
    with pytest.raises(RunbookError, match="writing the set failed: no space left on device"):
        bs.backup(params(root, dest, compression=compression))
    assert listing(dest) == [bs.LOCK_NAME]


def test_unknown_compression(app):
    root, dest = app
    with pytest.raises(RunbookError, match="compression 'xz': unknown"):
        bs.backup(params(root, dest, compression="xz"))
    assert listing(dest) == []


def test_zstd_absent(app, monkeypatch):
    root, dest = app
    monkeypatch.setenv("PATH", str(root))
    with pytest.raises(RunbookError, match="zstd binary is not installed"):
        bs.backup(params(root, dest, compression="zstd"))
    assert listing(dest) == []


def test_verification_failure_never_publishes(app, monkeypatch):
    root, dest = app

    def broken(path, extract_to=None):
        raise RunbookError("%s: member databases/app.db does not match its sha256" % path)

    monkeypatch.setattr(bs, "scan_set", broken)
    with pytest.raises(RunbookError, match="does not match"):
        bs.backup(params(root, dest))
    assert set_files(dest) == []
    assert not [n for n in listing(dest) if n.startswith(".runbook-tmp-")]


# ---------------------------------------------------------------------------------------------
# restore


@pytest.fixture
def backed_up(app):
    root, dest = app
    result = bs.backup(params(root, dest))
    return root, dest, result


def test_restore_needs_force_and_keeps_safety_copy(backed_up):
    root, dest, result = backed_up
    db = root / "app.db"
    os.chmod(str(db), 0o640)
    make_db(db, rows=10)  # the live database moves on
    with pytest.raises(RunbookError, match=r"app\.db: exists and differs .* force=true"):
        bs.restore({"src": str(dest)})
    assert count(db) == 60
    out = bs.restore({"src": str(dest), "force": True})
    assert out["changed"] is True and out["verified"] is True
    assert out["set"] == result["name"]
    # tokens.db is restored too: a snapshot is not byte-identical to its source (header counters)
    assert out["restored"] == [str(db), str(root / "tokens.db")]
    assert count(db) == 50
    assert stat.S_IMODE(os.stat(str(db)).st_mode) == 0o640
    safety = [p for p in out["safety_copies"] if p.startswith(str(db) + ".pre-restore-") and p.endswith("Z")]
    assert len(safety) == 1
    assert count(safety[0]) == 60  # the replaced database, with its -wal, is kept
    for extra in ("-wal", "-shm", "-journal"):
        assert not os.path.exists(str(db) + extra)
    again = bs.restore({"src": str(dest), "force": True})
    assert again["changed"] is False and again["restored"] == []


def _snapshot_tree(root):
    """{relative path: (inode, bytes or link target)} of everything under ``root``."""
    found = {}
    for directory, dirs, names in os.walk(str(root)):
        for name in dirs + names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found[os.path.relpath(path, str(root))] = (os.lstat(path).st_ino, os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    found[os.path.relpath(path, str(root))] = (os.stat(path).st_ino, handle.read())
            else:
                found[os.path.relpath(path, str(root)) + "/"] = None
    return found


def _failing_swap(monkeypatch, victim, rollback_fails=False):
    """os.replace fails (EACCES) when it puts the extracted copy of ``victim`` in place; with
    ``rollback_fails``, also when anything is renamed back over ``victim``'s neighbours."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        extracted = ".runbook-tmp-" in str(src) and os.path.basename(str(src)).startswith("m")
        if (extracted and str(dst) == str(victim)) or (rollback_fails and not extracted):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(bs.os, "replace", replace)


@pytest.mark.parametrize("safety_copy", [True, False])
def test_restore_failing_midway_puts_back_what_it_replaced(backed_up, monkeypatch, safety_copy):
    """The swap of .env (after both databases) fails: the databases, app.db's -wal, the .env and
    the symlink are then the very files they were before (same inodes, same bytes), and nothing
    the run made is left, safety copies included; the message names the failed file and says so."""
    root, dest = backed_up[:2]
    _db_with_wal(root / "app.db", rows=10)  # the live files move on
    (root / "tokens.db").write_bytes((root / "tokens.db").read_bytes())  # a new inode, same bytes
    (root / ".env").write_text("API_KEY=newer\n")
    os.unlink(str(root / "certs" / "current.pem"))
    os.symlink("elsewhere.pem", str(root / "certs" / "current.pem"))
    before = _snapshot_tree(root)
    _failing_swap(monkeypatch, root / ".env")
    expected = (r"^%s: cannot put the restored file in place: permission denied; the restore was undone: "
                r"the (\d+) path\(s\) it had changed are back as they were$" % re.escape(str(root / ".env")))
    with pytest.raises(RunbookError, match=expected) as failed:
        bs.restore({"src": str(dest), "force": True, "force_running": True, "safety_copy": safety_copy})
    # app.db, its -wal, tokens.db (its -journal does not exist): three renames put back
    assert re.match(expected, str(failed.value)).group(1) == "3"
    assert _snapshot_tree(root) == before
    assert count(root / "app.db") == 10  # read through its -wal
    monkeypatch.undo()
    out = bs.restore({"src": str(dest), "force": True, "force_running": True, "safety_copy": safety_copy})
    assert count(root / "app.db") == 50 and (root / ".env").read_text() == "API_KEY=secret\n"
    assert os.readlink(str(root / "certs" / "current.pem")) == "server.pem"
    # app.db (its -wal was checkpointed by count() above), tokens.db, .env, the link
    assert len(out["safety_copies"]) == (4 if safety_copy else 0)


def test_restore_failing_midway_removes_what_it_created(backed_up, tmp_path, monkeypatch):
    """Into an empty dest_root: the last file fails, so the files and directories made before
    it are removed again."""
    root, dest = backed_up[:2]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    _failing_swap(monkeypatch, fresh / str(root / "certs" / "server.pem").lstrip("/"))
    with pytest.raises(RunbookError, match=r"server\.pem: cannot put the restored file in place: permission "
                                           r"denied; the restore was undone: the \d+ path\(s\)"):
        bs.restore({"src": str(dest), "dest_root": str(fresh)})
    assert listing(fresh) == []


def test_restore_unknown_owner_names_the_file_and_changes_nothing(backed_up):
    root, dest = backed_up[:2]
    make_db(root / "app.db", rows=10)
    before = _snapshot_tree(root)
    with pytest.raises(RunbookError, match=r"^%s: .*no-such-user-rb" % re.escape(str(root / "app.db"))) as failed:
        bs.restore({"src": str(dest), "force": True, "owner": "no-such-user-rb"})
    assert ".runbook-tmp-" not in str(failed.value) and "undone" not in str(failed.value)
    assert _snapshot_tree(root) == before


def test_restore_never_overwrites_a_safety_copy(backed_up, monkeypatch):
    """Two restores in the same second would give the same safety copy name: the second refuses
    (and is undone) instead of overwriting the first one's copy of what it replaced."""
    root, dest = backed_up[:2]
    monkeypatch.setattr(bs, "_TS_FORMAT", "fixed")  # the stamp every restore uses here
    make_db(root / "app.db", rows=10)
    first_live = (root / "app.db").read_bytes()
    out = bs.restore({"src": str(dest), "force": True})
    copy = str(root / "app.db.pre-restore-fixed")
    assert copy in out["safety_copies"] and open(copy, "rb").read() == first_live
    make_db(root / "app.db", rows=10)
    before = _snapshot_tree(root)
    with pytest.raises(RunbookError, match=r"^%s: cannot keep a safety copy at %s: it exists already"
                                           % (re.escape(str(root / "app.db")), re.escape(copy))):
        bs.restore({"src": str(dest), "force": True})
    assert _snapshot_tree(root) == before and open(copy, "rb").read() == first_live
    # a run killed between its safety link and its swap left the live file itself under the name:
    # the next run (in the same second) uses it as its safety copy
    os.unlink(copy)
    os.link(str(root / "app.db"), copy)
    out = bs.restore({"src": str(dest), "force": True})
    assert copy in out["safety_copies"] and count(copy) == 60 and count(root / "app.db") == 50


def test_restore_says_what_it_could_not_put_back(backed_up, monkeypatch):
    root, dest = backed_up[:2]
    make_db(root / "app.db", rows=10)
    old = (root / "app.db").read_bytes()
    _failing_swap(monkeypatch, root / "tokens.db", rollback_fails=True)
    with pytest.raises(RunbookError) as failed:
        bs.restore({"src": str(dest), "force": True})
    message = str(failed.value)
    assert message.startswith("%s: cannot put the restored file in place: permission denied; could not put back "
                              "%s: permission denied (its previous content is at %s.pre-restore-"
                              % (root / "tokens.db", root / "app.db", root / "app.db"))
    kept = re.search(r"its previous content is at (\S+)\)", message).group(1)
    assert open(kept, "rb").read() == old and count(root / "app.db") == 50


def _db_with_wal(path, rows):
    """A WAL database whose last ``rows`` rows are only in its -wal (copied while a connection
    that never checkpoints held it, between transactions), and no -shm."""
    source = str(path) + ".source"
    conn = sqlite3.connect(source, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, body TEXT)")
        conn.executemany("INSERT INTO items (body) VALUES (?)", [("late %d" % i,) for i in range(rows)])
        shutil.copyfile(source, str(path))
        shutil.copyfile(source + "-wal", str(path) + "-wal")
    finally:
        conn.close()
    for leftover in (source, source + "-wal", source + "-shm", str(path) + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)


def test_safety_copy_of_a_wal_database_opens_with_its_wal(backed_up):
    root, dest = backed_up[:2]
    db = root / "app.db"
    _db_with_wal(db, rows=7)
    assert os.path.getsize(str(db) + "-wal") > 0  # (not opened here: closing it would checkpoint the -wal)
    out = bs.restore({"src": str(dest), "force": True})
    copy = [p for p in out["safety_copies"] if p.startswith(str(db) + ".pre-restore-") and p.endswith("Z")][0]
    assert copy + "-wal" in out["safety_copies"]
    assert count(copy) == 7 and count(db) == 50


def test_restore_with_nothing_to_do_removes_a_killed_runs_temp_dir(backed_up):
    """A restore killed after its swaps, before its cleanup, leaves its temp directory next to
    files that are now in place; the next run has nothing to restore and still removes it."""
    root, dest = backed_up[:2]
    assert bs.restore({"src": str(dest), "force": True})["changed"] is True  # now in place
    left = root / ".runbook-tmp-killed"
    left.mkdir()
    (left / "m0").write_bytes(b"half a database")
    out = bs.restore({"src": str(dest), "force": True})
    assert out["changed"] is False and out["restored"] == []
    assert not left.exists()
    assert count(root / "app.db") == 50


def test_restore_if_missing(backed_up):
    root, dest = backed_up[:2]
    os.unlink(str(root / "tokens.db"))
    out = bs.restore({"src": str(dest), "if_missing": True})
    assert out["restored"] == [str(root / "tokens.db")]
    assert str(root / "app.db") in out["skipped_paths"]
    assert count(root / "tokens.db") == 3
    assert stat.S_IMODE(os.stat(str(root / "tokens.db")).st_mode) == 0o600
    again = bs.restore({"src": str(dest), "if_missing": True})
    assert again["changed"] is False and again["restored"] == []


def test_restore_decides_same_size_files_from_the_checksums_at_the_end(backed_up):
    """A file of the member's size may or may not hold it: that is known once SHA256SUMS (the
    set's last member) is read. Without force it is refused then, in check mode too, and nothing
    is extracted; with force it is replaced; a file that matches is left alone."""
    root, dest = backed_up[:2]
    bs.restore({"src": str(dest), "force": True})  # the databases as in the set
    env = root / ".env"
    env.write_text("API_KEY=SECRET\n")  # same size as the member, other content
    before = listing(root)
    for check_mode in (True, False):
        with pytest.raises(RunbookError, match=r"\.env: exists and differs .* force=true"):
            bs.restore({"src": str(dest)}, check_mode=check_mode)
        assert env.read_text() == "API_KEY=SECRET\n"
        assert listing(root) == before  # no temp file, no safety copy
    planned = bs.restore({"src": str(dest), "force": True}, check_mode=True)
    assert str(env) in planned["restored"] and planned["changed"] is True
    assert env.read_text() == "API_KEY=SECRET\n"
    out = bs.restore({"src": str(dest), "force": True})
    assert str(env) in out["restored"] and env.read_text() == "API_KEY=secret\n"
    assert any(p.startswith(str(env) + ".pre-restore-") for p in out["safety_copies"])
    # now every file matches: with or without force nothing is replaced, no temp file is left
    for opts in ({}, {"force": True}):
        again = bs.restore(dict({"src": str(dest)}, **opts))
        assert again["changed"] is False and again["restored"] == [] and again["safety_copies"] == []
    assert not [n for n in listing(root) if n.startswith(".runbook-tmp-")]


def test_restore_of_an_unchanged_database_ignores_a_running_app(backed_up):
    """The running-app check guards a replacement: a database that already holds the set's copy is
    left alone, so an app that has it open is no reason to refuse (decided after the checksums)."""
    root, dest = backed_up[:2]
    bs.restore({"src": str(dest), "force": True})
    db = str(root / "app.db")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, db], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert bs._sqlite_locked(db)
        out = bs.restore({"src": str(dest), "force": True})
        assert out["changed"] is False and db not in out["restored"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_restore_to_a_fresh_root_with_extra_files(backed_up, tmp_path):
    root, dest = backed_up[:2]
    fresh = tmp_path / "fresh"
    out = bs.restore({"src": str(dest), "dest_root": str(fresh)})
    new_root = fresh / str(root).lstrip("/")
    assert count(new_root / "app.db") == 50
    assert (new_root / ".env").read_text() == "API_KEY=secret\n"
    assert stat.S_IMODE(os.stat(str(new_root / ".env")).st_mode) == 0o640
    assert os.readlink(str(new_root / "certs" / "current.pem")) == "server.pem"
    assert str(new_root / ".env") in out["restored"]


@needs_zstd
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_zstd_pipes_get_a_one_mib_buffer(app):
    root, dest = app
    out = bs.backup(params(root, dest, compression="zstd"))
    with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as handle:
        if int(handle.read()) < bs.PIPE_SIZE:
            pytest.skip("pipe-max-size below 1 MiB here")
    with bs._Reader(out["path"]) as reader:
        assert fcntl.fcntl(reader.proc.stdout.fileno(), 1032) == bs.PIPE_SIZE  # F_GETPIPE_SZ
        assert reader.tar.next().name == bs.MANIFEST


def test_restore_of_many_files_keeps_open_files_bounded(tmp_path):
    """Extracted files wait for their fsync in a bounded line: 400 files restore with 256 fds."""
    import resource  # noqa: PLC0415 (Unix only, like the engine)

    root = tmp_path / "app"
    (root / "artifacts").mkdir(parents=True)
    make_db(root / "app.db")
    for index in range(400):
        (root / "artifacts" / ("a%03d.txt" % index)).write_text("artifact %d\n" % index)
    dest = tmp_path / "sets"
    dest.mkdir()
    bs.backup({"databases": [str(root / "app.db")], "extra_paths": [str(root / "artifacts")], "dest": str(dest),
               "compression": "none"})
    fresh = tmp_path / "fresh"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    try:
        out = bs.restore({"src": str(dest), "dest_root": str(fresh)})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    restored = fresh / str(root).lstrip("/") / "artifacts"
    assert len(out["restored"]) == 401
    assert sorted(os.listdir(str(restored))) == ["a%03d.txt" % index for index in range(400)]
    assert (restored / "a399.txt").read_text() == "artifact 399\n"
    assert count(fresh / str(root).lstrip("/") / "app.db") == 100


def test_many_large_members_are_hashed_one_at_a_time(tmp_path, monkeypatch):
    """A large member is hashed from its file by a helper thread, on backup and on restore: one
    thread for all of them, so threads, open files and buffers stay bounded whatever the count."""
    monkeypatch.setattr(bs, "CHUNK", 4096)  # "large" (> 4 chunks) from 16 KiB on
    root = tmp_path / "app"
    (root / "artifacts").mkdir(parents=True)
    make_db(root / "app.db", rows=400)
    for index in range(40):
        (root / "artifacts" / ("a%02d.bin" % index)).write_bytes(os.urandom(20 * 1024))
    real = bs._hash_growing
    seen = {"now": 0, "most": 0, "threads": 0, "calls": 0}
    lock = threading.Lock()

    def counting(*args):
        with lock:
            seen["now"] += 1
            seen["calls"] += 1
            seen["most"] = max(seen["most"], seen["now"])
            seen["threads"] = max(seen["threads"], threading.active_count())
        try:
            time.sleep(0.002)  # overlapping calls would show
            return real(*args)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(bs, "_hash_growing", counting)
    dest = tmp_path / "sets"
    dest.mkdir()
    made = bs.backup({"databases": [str(root / "app.db")], "extra_paths": [str(root / "artifacts")],
                      "root": str(root), "dest": str(dest), "compression": "none"})
    # the member files in turn, beside the set file's own hash (its sidecar): two at most
    assert seen["calls"] >= 42 and seen["most"] <= 2 and seen["threads"] < 10, seen
    sums = {m["member"]: m["sha256"] for m in made["manifest"]["members"] if m["type"] == "file"}
    assert sums["files/artifacts/a07.bin"] == hashlib.sha256((root / "artifacts" / "a07.bin").read_bytes()).hexdigest()
    seen.update(most=0, threads=0, calls=0)
    out = bs.restore({"src": str(dest), "dest_root": str(tmp_path / "fresh")})
    # each extracted file in turn, followed while it is copied
    assert seen["calls"] >= 41 and seen["most"] == 1 and seen["threads"] < 12, seen
    assert len(out["restored"]) == 41
    restored = tmp_path / "fresh" / str(root).lstrip("/") / "artifacts" / "a39.bin"
    assert restored.read_bytes() == (root / "artifacts" / "a39.bin").read_bytes()


def test_file_hashes_follow_a_growing_file_and_stop_when_abandoned(tmp_path):
    """A file added as growing is hashed while it is written, to its last byte once completed; a
    closed (failed) run stops following at once and computes nothing more."""
    path = tmp_path / "growing"
    path.write_bytes(b"")
    hashes = bs._FileHashes()
    hashes.add("grown", str(path), growing=True)
    written = b""
    with open(str(path), "ab") as out:
        for step in range(20):
            piece = os.urandom(7000 + step)
            out.write(piece)
            out.flush()
            written += piece
            time.sleep(0.002)  # the thread catches up and waits for more
    hashes.complete("grown")
    assert hashes.digests() == {"grown": hashlib.sha256(written).hexdigest()}
    hashes.close()
    stopped = bs._FileHashes()
    stopped.add("never", str(path), growing=True)  # never completed: only close() ends it
    stopped.close()
    assert stopped.digests().get("never") is None  # abandoned: no digest, and no error


@pytest.mark.parametrize("kernel", ["copies", "refuses", "absent", "sparse"])
def test_restore_copies_large_members_of_an_uncompressed_set_in_the_kernel(app, tmp_path, monkeypatch, kernel):
    """A large member of an uncompressed set is copied with copy_file_range (and hashed from the
    copy as it grows); where the kernel refuses the call (EXDEV: another filesystem, on a kernel
    before 5.19) or Python lacks it, the restore reads and writes instead, with the same checks.
    So does a sparse member (its bytes are not one range of the set; tarfile fills its holes)."""
    monkeypatch.setattr(bs, "CHUNK", 4096)  # "large" from 16 KiB on; copied 32 KiB per call
    root, dest = app
    make_db(root / "app.db", rows=5000)
    made = bs.backup(params(root, dest, compression="none"))
    real = getattr(os, "copy_file_range", None)
    if real is None and kernel != "absent":
        pytest.skip("os.copy_file_range is not available here")
    calls = []

    def kernel_copy(src, dst, size, offset_src=None):
        calls.append(size)
        if kernel == "refuses":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst, size, offset_src)

    if kernel == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        monkeypatch.setattr(os, "copy_file_range", kernel_copy)
    if kernel == "sparse":  # our sets never hold one; tarfile reads this one as the plain file it is
        monkeypatch.setattr(tarfile.TarInfo, "issparse", lambda info: info.name.endswith("app.db"))
    fresh = tmp_path / "fresh"
    out = bs.restore({"src": str(dest), "dest_root": str(fresh)})
    restored = fresh / str(root / "app.db").lstrip("/")
    assert count(restored) == 5050
    expected = [db["sha256"] for db in made["databases"] if db["member"] == "databases/app.db"][0]
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == expected
    assert [db["sha256"] for db in out["manifest"]["databases"] if db["member"] == "databases/app.db"] == [expected]
    if kernel == "copies":
        assert len(calls) > 2  # the whole member, in steps, and nothing else (small members are read)
    else:
        assert len(calls) == (1 if kernel == "refuses" else 0)


def test_restore_cannot_create_its_copy_names_the_target(app, tmp_path, monkeypatch):
    root, dest = app
    bs.backup(params(root, dest))
    real = os.open

    def refusing(path, flags, *args, **kwargs):
        if ".runbook-tmp-" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(bs.os, "open", refusing)
    fresh = tmp_path / "fresh"
    target = re.escape(str(fresh / str(root / "app.db").lstrip("/")))
    with pytest.raises(RunbookError, match=r"^%s \(extracting databases/[^)]*app\.db\): cannot create: disk quota "
                                           r"exceeded$" % target):
        bs.restore({"src": str(dest), "dest_root": str(fresh)})
    left = [os.path.join(d, n) for d, dirs, names in os.walk(str(fresh)) for n in dirs + names]
    assert [n for n in left if n.endswith(".db") or ".runbook-tmp-" in n] == []


@pytest.mark.parametrize("code, cause", [(errno.EIO, "input/output error"), (errno.ENOSPC, "no space left on device")])
def test_restore_kernel_copy_failure_is_named_and_changes_nothing(app, tmp_path, monkeypatch, code, cause):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("os.copy_file_range is not available here")
    monkeypatch.setattr(bs, "CHUNK", 4096)
    root, dest = app
    make_db(root / "app.db", rows=5000)
    bs.backup(params(root, dest, compression="none"))
    real = os.copy_file_range
    calls = []

    def failing(src, dst, size, offset_src=None):
        calls.append(size)
        if len(calls) > 1:  # after a first step was copied: no falling back to read and write then
            raise OSError(code, os.strerror(code))
        return real(src, dst, size, offset_src)

    monkeypatch.setattr(os, "copy_file_range", failing)
    before = (root / "app.db").read_bytes()
    # the message names the database it was to replace (not the set, nor the temp file)
    target = re.escape(str(root / "app.db"))
    expected = r"^%s \(extracting databases/[^)]*app\.db\): cannot write: %s$" % (target, cause)
    with pytest.raises(RunbookError, match=expected):
        bs.restore({"src": str(dest), "force": True})
    assert (root / "app.db").read_bytes() == before
    assert not [n for n in listing(root) if n.startswith(".runbook-tmp-") or ".pre-restore-" in n]


@pytest.mark.parametrize("failing", [("fsync",), ("fdatasync", "fsync")])
def test_restore_write_back_failure_names_the_target_and_leaves_nothing(backed_up, tmp_path, monkeypatch, failing):
    dest = backed_up[1]
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(bs, "FLUSH_EVERY", 4096)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    for name in failing:  # the final fsync alone, or the flusher thread's steps too
        monkeypatch.setattr(bs.os, name, broken)
    # the write-back of an extracted copy ends after the scan, while the copy is checked: its
    # failure is raised before anything is swapped, and names the file it was to replace
    with pytest.raises(RunbookError, match=r"/fresh/.*/app\.db \(extracting databases/[^)]*app\.db\): "
                                           r"cannot write: input/output error"):
        bs.restore({"src": str(dest), "dest_root": str(fresh)})
    left = [os.path.join(d, n) for d, dirs, names in os.walk(str(fresh)) for n in dirs + names]
    assert [n for n in left if n.endswith(".db") or ".runbook-tmp-" in n] == []


def test_restore_selected_database_only(backed_up, tmp_path):
    root, dest = backed_up[:2]
    fresh = tmp_path / "fresh"
    out = bs.restore({"src": str(dest), "dest_root": str(fresh), "databases": ["tokens.db"], "extra_paths": False})
    assert [os.path.basename(p) for p in out["restored"]] == ["tokens.db"]
    with pytest.raises(RunbookError, match="no database 'nope.db' in this set"):
        bs.restore({"src": str(dest), "dest_root": str(fresh), "databases": ["nope.db"]})


def test_restore_check_mode_writes_nothing(backed_up, tmp_path):
    root, dest = backed_up[:2]
    fresh = tmp_path / "fresh"
    out = bs.restore({"src": str(dest), "dest_root": str(fresh)}, check_mode=True)
    assert out["changed"] is True and len(out["restored"]) >= 2
    assert not fresh.exists()


def test_drill_reports_row_counts_and_touches_nothing(backed_up, tmp_path):
    root, dest = backed_up[:2]
    drill = tmp_path / "drill"
    drill.mkdir()
    before = listing(root)
    out = bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(drill)})
    assert out["row_counts"] == {"app.db": {"items": 50, "users": 1}, "tokens.db": {"items": 3, "users": 1}}
    assert out["changed"] is False and out["restored"] == []
    assert listing(drill) == [] and listing(root) == before
    with pytest.raises(RunbookError, match="drill_dir is required"):
        bs.restore({"src": str(dest), "mode": "drill"})


class _CloseFails:
    """A file whose close() reports a write error (as NFS reports a failed write-back at close)."""

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def close(self):
        self._handle.close()
        raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_drill_reports_a_write_error_at_close(backed_up, tmp_path, monkeypatch):
    """A drill's scratch copy is closed on the success path too, and an error there is reported,
    naming the drill directory and the member; the scratch directory is removed."""
    dest = backed_up[1]
    drill = tmp_path / "drill"
    drill.mkdir()

    def opening(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        return _CloseFails(handle) if isinstance(file, int) and mode == "wb" else handle

    monkeypatch.setattr(bs, "open", opening, raising=False)
    with pytest.raises(RunbookError, match=r"^%s \(extracting databases/[^)]*app\.db\): cannot write: "
                                           r"input/output error$" % re.escape(str(drill))):
        bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(drill)})
    assert listing(drill) == []


def test_choose_set_by_before_and_label(tmp_path, app):
    root, dest = app
    first = bs.backup(params(root, dest, label="nightly"))
    second = bs.backup(params(root, dest, label="pre-upgrade"))
    assert bs.choose_set({"src": str(dest), "set": "latest", "name_prefix": None, "label": None,
                          "before": None}).endswith(second["name"])
    assert bs.choose_set({"src": str(dest), "set": "latest", "name_prefix": None, "label": "nightly",
                          "before": None}).endswith(first["name"])
    stamp = bs.parse_set_name(second["name"])[1]
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    assert bs.choose_set({"src": str(dest), "set": "latest", "name_prefix": None, "label": None,
                          "before": before}).endswith(first["name"])
    with pytest.raises(RunbookError, match="no verified backup set matches"):
        bs.choose_set({"src": str(dest), "set": "latest", "name_prefix": None, "label": None,
                       "before": "2000-01-01T00:00:00"})
    with pytest.raises(RunbookError, match="not an ISO 8601 timestamp"):
        bs.choose_set({"src": str(dest), "set": "latest", "name_prefix": None, "label": None, "before": "yesterday"})


def test_select_mode_chooses_and_checks_the_sidecar_only(tmp_path, app, monkeypatch):
    root, dest = app
    first = bs.backup(params(root, dest))
    second = bs.backup(params(root, dest))
    stamp = bs.parse_set_name(second["name"])[1]
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
    live = (root / "app.db").read_bytes()

    def no_child(*_args, **_kwargs):
        raise AssertionError("select must not start zstd, age or anything else")

    monkeypatch.setattr(bs.subprocess, "Popen", no_child)
    monkeypatch.setattr(bs, "scan_set", lambda *a, **k: pytest.fail("select must not read the set's members"))
    latest = bs.restore({"src": str(dest), "mode": "select"})
    assert (latest["set"], latest["verified"], latest["changed"]) == (second["name"], False, False)
    assert latest["sha256"] == second["sha256"] == bs.read_sidecar(second["path"])
    older = bs.restore({"src": str(dest), "mode": "select", "before": before})
    assert older["set_path"] == first["path"]
    with open(first["path"], "r+b") as handle:  # one flipped byte: the sidecar no longer matches
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(RunbookError, match="sha256 mismatch"):
        bs.restore({"src": str(dest), "mode": "select", "before": before})
    assert (root / "app.db").read_bytes() == live


# ---------------------------------------------------------------------------------------------
# bad sets


def test_wrong_sidecar_refuses_a_format_2_set(tmp_path):
    """In a format 2 set the sidecar's hash is the only check of the manifest: restore hashes it."""
    members = [(_info("files/a.txt", size=1), b"a")]
    path = tmp_path / "backup-20260101T000000Z.tar"
    _write_raw_set(path, _v2_manifest(members), members, bs.CHECKSUMS, _sums(members))
    assert bs.verify_set(str(path))["members"][0]["sha256"] == hashlib.sha256(b"a").hexdigest()
    (tmp_path / (path.name + ".sha256")).write_text("%s  %s\n" % ("a" * 64, path.name))
    with pytest.raises(RunbookError, match="sha256 mismatch"):
        bs.restore({"src": str(tmp_path), "dest_root": str(tmp_path / "fresh")})
    assert not (tmp_path / "fresh").exists()


def test_format_3_manifest_is_checked_against_sha256sums(app, tmp_path):
    """From format 3 on SHA256SUMS covers the manifest too: a manifest changed after the fact (still
    valid JSON, another target path) is refused before anything is extracted or replaced, with the
    sidecar made to match; and the sidecar is not hashed by restore (select mode checks it)."""
    root, dest = app
    result = bs.backup(params(root, dest, compression="none"))
    path = dest / result["name"]
    data = path.read_bytes()
    wanted = json.dumps(str(root / "app.db")).encode()
    assert data.count(wanted) == 2  # the manifest's mentions of the database's path (member and database)
    moved = json.dumps(str(root / "xpp.db")).encode()
    path.write_bytes(data.replace(wanted, moved))
    (dest / (path.name + ".sha256")).write_text(
        "%s  %s\n" % (hashlib.sha256(path.read_bytes()).hexdigest(), path.name))
    fresh = tmp_path / "fresh"
    with pytest.raises(RunbookError, match="member manifest.json does not match its sha256 in SHA256SUMS"):
        bs.restore({"src": str(dest), "dest_root": str(fresh)})
    assert not fresh.exists()
    path.write_bytes(data)  # intact again, with a wrong sidecar: restore relies on SHA256SUMS
    (dest / (path.name + ".sha256")).write_text("%s  %s\n" % ("a" * 64, path.name))
    out = bs.restore({"src": str(dest), "dest_root": str(fresh)})
    assert count(fresh / str(root / "app.db").lstrip("/")) == 50 and out["verified"] is True
    with pytest.raises(RunbookError, match="sha256 mismatch"):
        bs.restore({"src": str(dest), "mode": "select"})


def test_format_3_sha256sums_must_list_the_manifest(tmp_path):
    members = [(_info("files/a.txt", size=1), b"a")]
    path = tmp_path / "backup-20260101T000000Z.tar"
    _write_raw_set(path, dict(_v2_manifest(members), format=3), members, bs.CHECKSUMS, _sums(members))
    with pytest.raises(RunbookError, match="damaged set: SHA256SUMS does not list manifest.json"):
        bs.verify_set(str(path))


def test_missing_sidecar(backed_up):
    root, dest, result = backed_up
    os.unlink(str(dest / (result["name"] + ".sha256")))
    with pytest.raises(RunbookError, match="checksum file .* is missing"):
        bs.restore({"src": str(dest), "set": result["name"], "force": True})


@pytest.mark.parametrize("compression", ["none", "gzip", pytest.param("zstd", marks=needs_zstd)])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_or_truncated_set(app, tmp_path, damage, compression):
    root, dest = app
    result = bs.backup(params(root, dest, compression=compression))
    path = dest / result["name"]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    # refresh the sidecar so the damage is found by reading the archive itself
    (dest / (result["name"] + ".sha256")).write_text("%s  %s\n" % (hashlib.sha256(data).hexdigest(), path.name))
    fresh = tmp_path / "fresh"
    with pytest.raises(RunbookError, match="damaged|truncated|does not match|CRC|manifest"):
        bs.restore({"src": str(dest), "dest_root": str(fresh)})
    assert not fresh.exists()


def test_not_a_set(tmp_path):
    path = tmp_path / "backup-20260101T000000Z.tar"
    path.write_bytes(b"hello, not a tar at all" * 100)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / (path.name + ".sha256")).write_text("%s  %s\n" % (digest, path.name))
    with pytest.raises(RunbookError, match=str(path)):
        bs.verify_set(str(path))


def _info(name, kind=tarfile.REGTYPE, linkname="", size=0):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = size
    return info


@pytest.mark.parametrize("member,reason", [
    (_info("/etc/evil", size=1), "absolute path"),
    (_info("files/../../evil", size=1), "'..'"),
    (_info("files/certs/link", tarfile.SYMTYPE, "../../../etc/passwd"), "points outside"),
    (_info("files/certs/abs", tarfile.SYMTYPE, "/etc/passwd"), "points outside"),
    (_info("files/certs/hard", tarfile.LNKTYPE, "files/certs/x"), "hard link"),
    (_info("files/dev", tarfile.CHRTYPE), "device"),
    (_info("files/fifo", tarfile.FIFOTYPE), "device, fifo"),
])
def test_malicious_members_are_refused_before_extraction(tmp_path, member, reason):
    src = tmp_path / "sets"
    src.mkdir()
    good = _info("files/ok.txt", size=2)
    data = b"x" if member.isfile() else None
    path = write_set(src / "backup-20260101T000000Z.tar", [(good, b"ok"), (member, data)])
    with pytest.raises(RunbookError, match="unsafe archive member"):
        bs.restore({"src": str(src), "dest_root": str(tmp_path / "out")})
    with pytest.raises(RunbookError, match=reason.replace("(", r"\(").replace(".", r"\.")):
        bs.verify_set(path)
    assert not (tmp_path / "out").exists()
    assert not os.path.exists("/etc/evil")


@pytest.mark.parametrize("fmt, expected", [
    (1, "not in the manifest"),
    (2, "'files/extra.txt' follows SHA256SUMS, which must be the last"),
])
def test_member_appended_to_a_set_is_refused(tmp_path, fmt, expected):
    src = tmp_path / "sets"
    src.mkdir()
    path = src / "backup-20260101T000000Z.tar"
    write_set(path, [(_info("files/ok.txt", size=2), b"ok")], fmt=fmt)
    with tarfile.open(str(path), "a") as tar:
        tar.addfile(_info("files/extra.txt", size=1), io.BytesIO(b"e"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (src / (path.name + ".sha256")).write_text("%s  %s\n" % (digest, path.name))
    with pytest.raises(RunbookError, match=expected):
        bs.verify_set(str(path))


def test_member_not_in_manifest_is_refused(tmp_path):
    members = [(_info("files/ok.txt", size=2), b"ok"), (_info("files/extra.txt", size=1), b"e")]
    path = tmp_path / "backup-20260101T000000Z.tar"
    _write_raw_set(path, _v2_manifest(members[:1]), members, bs.CHECKSUMS, _sums(members))
    with pytest.raises(RunbookError, match="'files/extra.txt' is not in the manifest"):
        bs.verify_set(str(path))


def _sums(members):
    return "".join("%s  %s\n" % (hashlib.sha256(data).hexdigest(), info.name) for info, data in members)


def _write_raw_set(path, manifest, members, trailer_name=None, trailer=""):
    """A set exactly as given (manifest, members, then an optional trailer member), with its sidecar."""
    raw = json.dumps(manifest).encode()
    with tarfile.open(str(path), "w") as tar:
        tar.addfile(_info(bs.MANIFEST, size=len(raw)), io.BytesIO(raw))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        if trailer_name:
            tar.addfile(_info(trailer_name, size=len(trailer.encode())), io.BytesIO(trailer.encode()))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / (path.name + ".sha256")).write_text("%s  %s\n" % (digest, path.name))


def _v2_manifest(members):
    return {"format": 2, "checksums": bs.CHECKSUMS, "databases": [],
            "members": [{"member": info.name, "path": "/nowhere/" + info.name, "type": "file", "size": len(data)}
                        for info, data in members]}


@pytest.mark.parametrize("case, trailer_name, trailer, expected", [
    ("no checksums member", None, "", "damaged or truncated set: no SHA256SUMS member"),
    ("a wrong sha256", bs.CHECKSUMS, "%s  files/a.txt\n%s  files/b.txt\n" % ("0" * 64, "1" * 64),
     "member files/a.txt does not match its sha256 in SHA256SUMS"),
    ("a file missing from it", bs.CHECKSUMS, "SUMS:a", "member files/b.txt does not match its sha256 in SHA256SUMS"),
    ("a name that is not a file of the set", bs.CHECKSUMS, "SUMS:ab+extra",
     "SHA256SUMS lists files/ghost.txt, not a file of this set"),
    ("a line not in sha256sum format", bs.CHECKSUMS, "SUMS:ab+garbage", "SHA256SUMS is not in sha256sum format"),
    ("a name listed twice", bs.CHECKSUMS, "SUMS:ab+twice", "SHA256SUMS lists files/a.txt twice"),
])
def test_format_2_checksums_member_is_required_and_exact(tmp_path, case, trailer_name, trailer, expected):
    members = [(_info("files/a.txt", size=1), b"a"), (_info("files/b.txt", size=1), b"b")]
    sums = {"SUMS:a": _sums(members[:1]), "SUMS:ab+extra": _sums(members) + "%s  files/ghost.txt\n" % ("2" * 64),
            "SUMS:ab+garbage": _sums(members) + "not a checksum line\n",
            "SUMS:ab+twice": _sums(members) + _sums(members[:1])}
    path = tmp_path / "backup-20260101T000000Z.tar"
    _write_raw_set(path, _v2_manifest(members), members, trailer_name, sums.get(trailer, trailer))
    with pytest.raises(RunbookError, match=re.escape(expected)):
        bs.verify_set(str(path))


def test_format_2_checksums_with_escaped_names_round_trip(tmp_path):
    """A member name with a backslash or a newline is written the way sha256sum escapes it."""
    names = ["files/back\\slash.txt", "files/new\nline.txt", "files/plain.txt"]
    members = [(_info(name, size=len(name)), name.encode()) for name in names]
    text = "".join(bs._checksum_line(hashlib.sha256(data).hexdigest(), info.name) for info, data in members)
    assert text.splitlines()[0].startswith("\\") and text.splitlines()[2][0] != "\\"
    assert bs._parse_checksums("x", text.encode()) == {
        info.name: hashlib.sha256(data).hexdigest() for info, data in members}
    path = tmp_path / "backup-20260101T000000Z.tar"
    _write_raw_set(path, _v2_manifest(members), members, bs.CHECKSUMS, text)
    manifest = bs.verify_set(str(path))
    assert [m["sha256"] for m in manifest["members"]] == [hashlib.sha256(n.encode()).hexdigest() for n in names]


def test_damaged_database_in_set_is_not_restored(app, tmp_path):
    root, dest = app
    src = tmp_path / "bad-sets"
    src.mkdir()
    garbage = b"SQLite format 3\x00" + b"\xff" * 4080
    info = _info("databases/app.db", size=len(garbage))
    path = write_set(src / "backup-20260101T000000Z.tar", [(info, garbage)])
    manifest_members = bs.verify_set(path)["members"]
    assert manifest_members[0]["member"] == "databases/app.db"
    # make the crafted member a database entry pointing at the live path
    data = json.loads(json.dumps(manifest_members))
    data[0].update(type="database", path=str(root / "app.db"))
    manifest = json.dumps({"format": 1, "members": data, "databases": []}).encode()
    with tarfile.open(path, "w") as tar:
        minfo = _info(bs.MANIFEST, size=len(manifest))
        tar.addfile(minfo, io.BytesIO(manifest))
        tar.addfile(info, io.BytesIO(garbage))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    (src / "backup-20260101T000000Z.tar.sha256").write_text("%s  x\n" % digest)
    before = (root / "app.db").read_bytes()
    with pytest.raises(RunbookError, match=r"app\.db: quick_check of the restored copy failed"):
        bs.restore({"src": str(src), "force": True})
    assert (root / "app.db").read_bytes() == before
    assert not [n for n in listing(root) if n.startswith(".runbook-tmp-") or ".pre-restore-" in n]


# ---------------------------------------------------------------------------------------------
# encryption at rest (age), running-app detection, orphan checksum files


needs_age = pytest.mark.skipif(shutil.which("age") is None or shutil.which("age-keygen") is None,
                               reason="age not installed")


def age_keypair(directory, name="id.txt"):
    identity = str(directory / name)
    proc = subprocess.run(["age-keygen", "-o", identity], capture_output=True, text=True, check=True)
    return identity, proc.stderr.split()[-1]


@needs_age
@pytest.mark.parametrize("compression", ["gzip", "none"] + (["zstd"] if HAVE_ZSTD else []))
def test_encrypted_set_roundtrip(app, tmp_path, compression):
    root, dest = app
    identity, recipient = age_keypair(tmp_path)
    result = bs.backup(params(root, dest, compression=compression, encrypt_recipients=[recipient]))
    assert result["encrypted"] is True and result["manifest"]["encrypted"] is True
    assert result["name"].endswith(bs.EXTENSIONS[compression] + ".age")
    data = open(result["path"], "rb").read()
    assert data.startswith(b"age-encryption.org/v1") and b"API_KEY=secret" not in data
    assert bs.list_sets(str(dest))[0]["encrypted"] is True
    assert [n for n in listing(dest) if n.startswith(".runbook-tmp-")] == []
    manifest = bs.verify_set(result["path"], identity=identity)
    assert manifest["encrypted"] is True
    (root / ".env").write_text("API_KEY=changed\n")
    restored = bs.restore({"src": str(dest), "force": True, "identity_file": identity})
    assert (root / ".env").read_text() == "API_KEY=secret\n"
    assert str(root / ".env") in restored["restored"]


@needs_age
def test_encrypted_set_needs_the_right_identity(app, tmp_path):
    root, dest = app
    _identity, recipient = age_keypair(tmp_path)
    stranger, _public = age_keypair(tmp_path, "other.txt")
    result = bs.backup(params(root, dest, encrypt_recipients=[recipient]))
    with pytest.raises(RunbookError, match="encrypted with age; give identity_file"):
        bs.restore({"src": str(dest), "force": True})
    with pytest.raises(RunbookError, match="no identity matched.*wrong identity_file"):
        bs.restore({"src": str(dest), "force": True, "identity_file": stranger})
    with pytest.raises(RunbookError, match="identity_file .*cannot read"):
        bs.restore({"src": str(dest), "force": True, "identity_file": str(tmp_path / "missing.txt")})
    assert (root / ".env").read_text() == "API_KEY=secret\n"
    assert os.path.exists(result["path"])


@needs_age
def test_select_mode_needs_no_identity_for_an_encrypted_set(app, tmp_path):
    root, dest = app
    _identity, recipient = age_keypair(tmp_path)
    result = bs.backup(params(root, dest, encrypt_recipients=[recipient]))
    chosen = bs.restore({"src": str(dest), "mode": "select"})
    assert (chosen["set"], chosen["encrypted"], chosen["sha256"]) == (result["name"], True, result["sha256"])


@needs_age
def test_encrypt_recipients_validated(app, tmp_path):
    root, dest = app
    identity, _recipient = age_keypair(tmp_path)
    secret_line = [line for line in open(identity).read().splitlines() if line.startswith("AGE-SECRET-KEY-")][0]
    with pytest.raises(RunbookError, match="encrypt_recipients") as err:
        bs.backup(params(root, dest, encrypt_recipients=[secret_line]))
    assert secret_line not in str(err.value)
    assert set_files(dest) == []


def test_encrypt_without_age_binary(app, tmp_path, monkeypatch):
    root, dest = app
    monkeypatch.setattr(bs.shutil, "which", lambda name: None)
    with pytest.raises(RunbookError, match="age binary is not installed"):
        bs.backup(params(root, dest, encrypt_recipients=["age1" + "q" * 58]))


def test_set_names_with_age_suffix():
    assert bs.parse_set_name("backup-20261123T030000Z-pre.tar.zst.age")[0] == "backup"
    assert bs.parse_set_name("backup-20261123T030000Z.tar.age")[2] == ""
    assert bs.parse_set_name("backup-20261123T030000Z.age") is None


_HOLDER = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
           "c.execute('SELECT count(*) FROM items').fetchone(); print('open', flush=True); time.sleep(60)")


def test_restore_refuses_while_another_process_holds_the_db(app):
    root, dest = app
    bs.backup(params(root, dest))
    db = str(root / "app.db")
    make_db(db, rows=5)  # differs from the set now
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, db], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert any(str(holder.pid) in item for item in bs.processes_holding(db))
        assert bs._sqlite_locked(db)  # WAL: the -shm lock of an open connection
        before = open(db, "rb").read()
        with pytest.raises(RunbookError, match="running process.*force_running=true"):
            bs.restore({"src": str(dest), "force": True})
        assert open(db, "rb").read() == before
        result = bs.restore({"src": str(dest), "force": True, "force_running": True})
        assert db in result["restored"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_orphan_checksum_file_is_removed_by_the_next_backup(app):
    root, dest = app
    orphan = dest / "backup-20200101T000000Z.tar.gz.sha256"
    orphan.write_text("0" * 64 + "  backup-20200101T000000Z.tar.gz\n")
    unrelated = dest / "notes.sha256"
    unrelated.write_text("x")
    bs.backup(params(root, dest))
    assert not orphan.exists() and unrelated.exists()


# ---------------------------------------------------------------------------------------------
# the single-pass writer and reader


@pytest.mark.parametrize("name", ["databases/app.db", "files/" + "long-name/" * 20 + "x.bin",  # a pax path record
                                  "files/\u00e9t\u00e9.bin"])
def test_aligned_header_puts_the_data_on_a_block_boundary_from_any_offset(name):
    for at in range(0, 2 * bs.ALIGN, tarfile.BLOCKSIZE):
        info = bs._tarinfo(name, "file", size=bs.ALIGN * 5)
        header = bs._aligned_header(info, at)
        assert (at + len(header)) % bs.ALIGN == 0
        assert len(header) <= bs.ALIGN + 3 * tarfile.BLOCKSIZE + len(bs._tar_header(bs._tarinfo(name, "file")))
        # what a reader sees: the same member, the padding only as an ignored pax comment
        read = tarfile.TarInfo.frombuf(header[-tarfile.BLOCKSIZE:], tarfile.ENCODING, "surrogateescape")
        assert read.size == bs.ALIGN * 5
        if at == 0:  # what comes before it in the archive: nothing, a directory, or a file of at - 512 bytes
            before = b""
        elif at == tarfile.BLOCKSIZE:
            before = bs._tar_header(bs._tarinfo("files/d", "dir"))
        else:
            before = bs._tar_header(bs._tarinfo("manifest.json", "file", size=at - 512)) + b"{" * (at - 512)
        assert len(before) == at
        archive = before + header + b"\0" * (bs.ALIGN * 5) + b"\0" * tarfile.RECORDSIZE
        with tarfile.open(fileobj=io.BytesIO(archive)) as parsed:
            member = parsed.getmembers()[-1]
        assert member.name == name and member.size == bs.ALIGN * 5 and member.offset_data == at + len(header)


def test_uncompressed_set_is_a_plain_tar_manifest_first_and_its_sidecar_matches(app, tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "CHUNK", 4096)  # "large" from 16 KiB on: such members start on a 4 KiB block
    root, dest = app
    make_db(root / "app.db", rows=5000)
    result = bs.backup(params(root, dest, compression="none"))
    path = result["path"]
    data = open(path, "rb").read()
    assert len(data) % tarfile.RECORDSIZE == 0  # padded like tarfile pads
    assert hashlib.sha256(data).hexdigest() == result["sha256"]  # digest of the bytes written, no read-back
    out = subprocess.run(["sha256sum", "-c", result["name"] + ".sha256"], cwd=str(dest), capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    listed = subprocess.run(["tar", "-tvf", path], capture_output=True, text=True, check=True).stdout.splitlines()
    assert listed[0].split()[-1] == "manifest.json" and listed[-1].split()[-1] == "SHA256SUMS"
    # by hand at 3 am: extract, then sha256sum -c SHA256SUMS checks every file
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xf", path, "-C", str(unpacked)], check=True)
    out = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=str(unpacked), capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 and "databases/app.db: OK" in out.stdout, out.stdout + out.stderr
    returned = {m["member"]: m for m in result["manifest"]["members"]}
    aligned = 0
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile(bs.MANIFEST))
        for member in manifest["members"]:
            info = tar.getmember(member["member"])
            if member["type"] in ("database", "file"):
                digest = hashlib.sha256(tar.extractfile(info).read()).hexdigest()
                assert digest == returned[member["member"]]["sha256"]
                assert info.size == member["size"] and info.mode == member["mode"]
                large = info.size > 4 * bs.CHUNK
                assert (info.offset_data % bs.ALIGN == 0) if large else ("comment" not in info.pax_headers)
                aligned += large
            elif member["type"] == "symlink":
                assert info.issym() and info.linkname == member["target"]
            else:
                assert info.isdir()
    assert all(db["check"] == {"kind": "quick_check", "ok": True, "errors": []} for db in manifest["databases"])
    assert aligned >= 1  # the fixture's database is large enough to be aligned


def test_sets_written_by_tarfile_still_restore(tmp_path):
    """Sets of earlier versions were written by tarfile (manifest first, gzip or plain): same reader."""
    src = tmp_path / "sets"
    src.mkdir()
    db = make_db(tmp_path / "orig.db", rows=20)
    raw = open(db, "rb").read()
    info = _info("databases/orig.db", size=len(raw))
    path = write_set(src / "backup-20260101T000000Z.tar", [(info, raw)], fmt=1)
    manifest = bs.verify_set(path)
    manifest["members"][0].update(type="database", path=str(tmp_path / "restored" / "orig.db"), mode=0o600)
    blob = json.dumps(manifest).encode()
    with tarfile.open(path, "w:gz") as tar:  # what the old writer produced for compression=gzip
        tar.addfile(_info(bs.MANIFEST, size=len(blob)), io.BytesIO(blob))
        tar.addfile(info, io.BytesIO(raw))
    gz = src / "backup-20260101T000000Z.tar.gz"
    os.rename(path, str(gz))
    os.unlink(path + ".sha256")
    (src / (gz.name + ".sha256")).write_text("%s  %s\n" % (hashlib.sha256(gz.read_bytes()).hexdigest(), gz.name))
    result = bs.restore({"src": str(src)})
    assert result["restored"] == [str(tmp_path / "restored" / "orig.db")]
    assert count(tmp_path / "restored" / "orig.db") == 20
    # format 1 has the sha256s in its manifest: a rerun finds the file in place before extracting
    again = bs.restore({"src": str(src)})
    assert again["changed"] is False and again["restored"] == []


def test_flusher_writes_back_in_steps(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(bs.os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    path = tmp_path / "big"
    with open(str(path), "wb") as handle:
        flusher = bs._Flusher(handle.fileno(), every=64 * 1024, poll=0.001)
        for _dummy in range(8):
            handle.write(b"x" * 64 * 1024)
            handle.flush()
            time.sleep(0.02)
        flusher.stop()
    assert flusher.flushes >= 4 and len(calls) == flusher.flushes


def test_inline_flusher_writes_back_each_step_in_the_producer(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(bs.os, "fdatasync", lambda fd: (calls.append(threading.current_thread()), real(fd)))
    with open(str(tmp_path / "big"), "wb") as handle:
        flusher = bs._Flusher(handle.fileno(), every=64 * 1024, inline=True)
        for _dummy in range(6):
            handle.write(b"x" * 32 * 1024)
            handle.flush()
            flusher.throttle()
        flusher.stop()
    # one write-back per full 64 KiB step, done by the writing thread itself (no helper thread)
    assert flusher.flushes == 3 and calls == [threading.current_thread()] * 3


def test_threaded_flusher_holds_a_producer_two_steps_ahead(tmp_path):
    every = 64 * 1024
    with open(str(tmp_path / "big"), "wb") as handle:
        flusher = bs._Flusher(handle.fileno(), every=every, poll=0.005)
        for _dummy in range(12):
            handle.write(b"x" * every)
            handle.flush()
            flusher.throttle()
            assert os.fstat(handle.fileno()).st_size - flusher._flushed <= 2 * every
        flusher.stop()
        handle.write(b"x" * 4 * every)
        handle.flush()
        flusher.throttle()  # the thread has ended: returns at once instead of waiting forever
    assert flusher.flushes >= 4


@pytest.mark.parametrize("compression", ["none", pytest.param("zstd", marks=needs_zstd)])
def test_write_back_failure_fails_the_backup_and_leaves_nothing(app, monkeypatch, compression):
    # zstd's file is written back by a thread: its failure must still fail the run, although a later
    # fsync on the same file would succeed (Linux reports a write-back error once per open file)
    root, dest = app
    conn = sqlite3.connect(str(root / "app.db"))
    conn.executemany("INSERT INTO items (body) VALUES (?)", [(os.urandom(2048).hex(),) for dummy in range(4000)])
    conn.commit()  # ~16 MiB (8 MiB as zstd): many steps, so the write-back thread sees one
    conn.close()
    monkeypatch.setattr(bs, "FLUSH_EVERY", 256 * 1024)
    monkeypatch.setattr(bs, "FLUSH_POLL", 0.0005)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bs.os, "fdatasync", full)
    with pytest.raises(RunbookError, match=r"writing the set failed: .*[Nn]o space left"):
        bs.backup(params(root, dest, compression=compression))
    assert set_files(dest) == []
    assert not [n for n in listing(dest) if n.startswith(".runbook-tmp-")]


@pytest.mark.parametrize("compression", ["none", pytest.param("zstd", marks=needs_zstd)])
def test_backup_writes_back_while_writing(app, monkeypatch, compression):
    root, dest = app
    conn = sqlite3.connect(str(root / "app.db"))
    conn.executemany("INSERT INTO items (body) VALUES (?)", [(os.urandom(2048).hex(),) for dummy in range(4000)])
    conn.commit()  # ~16 MiB that does not compress
    conn.close()
    monkeypatch.setattr(bs, "FLUSH_EVERY", 256 * 1024)
    monkeypatch.setattr(bs, "FLUSH_POLL", 0.0005)
    flushes = []
    real = bs._Flusher.stop

    def stop(self):
        real(self)
        flushes.append(self.flushes)

    monkeypatch.setattr(bs._Flusher, "stop", stop)
    result = bs.backup(params(root, dest, compression=compression))
    assert bs.verify_set(result["path"])
    assert max(flushes) >= 2


def test_failed_snapshot_check_never_publishes(app, monkeypatch):
    root, dest = app
    monkeypatch.setattr(bs, "run_check", lambda conn, kind: (False, ["*** in database main *** Page 3: bad"]))
    with pytest.raises(RunbookError, match=r"app\.db: quick_check of the snapshot failed, set not written: .*Page 3"):
        bs.backup(params(root, dest, compression="none"))
    assert set_files(dest) == []
    assert not [n for n in listing(dest) if n.startswith(".runbook-tmp-")]


@needs_zstd
def test_zstd_set_failing_its_check_is_never_published(app, monkeypatch):
    root, dest = app
    real_popen = bs.subprocess.Popen

    class Flipping:
        """zstd -t's stdin, with one bit flipped in the first chunk (a bit lost on the way)."""

        def __init__(self, pipe):
            self.pipe = pipe
            self.flipped = False

        def write(self, data):
            if not self.flipped and len(data) > 64:
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
                self.flipped = True
            return self.pipe.write(data)

        def close(self):
            self.pipe.close()

        def fileno(self):
            return self.pipe.fileno()

    def popen(command, *args, **kwargs):
        proc = real_popen(command, *args, **kwargs)
        if list(command) == ["zstd", "-q", "-t"]:
            proc.stdin = Flipping(proc.stdin)
        return proc

    monkeypatch.setattr(bs.subprocess, "Popen", popen)
    with pytest.raises(RunbookError, match="verification of the written set failed, not published: zstd -t"):
        bs.backup(params(root, dest, compression="zstd"))
    assert set_files(dest) == []
    assert not [n for n in listing(dest) if n.startswith(".runbook-tmp-")]


def _tampered_set(src, live, content, intact):
    """A set whose one database member names ``live``; ``intact`` False: the member's bytes do not
    match the manifest (the sidecar is made for the damaged file, so only the member check sees it)."""
    info = _info("databases/app.db", size=len(content))
    path = write_set(src / "backup-20260101T000000Z.tar", [(info, content)], sidecar=False)
    entry = {"member": "databases/app.db", "path": str(live), "type": "database", "size": len(content),
             "sha256": hashlib.sha256(content).hexdigest(), "mode": 0o600}
    blob = json.dumps({"format": 1, "members": [entry], "databases": []}).encode()
    stored = content if intact else content[:-1] + bytes([content[-1] ^ 0xFF])
    with tarfile.open(path, "w") as tar:
        tar.addfile(_info(bs.MANIFEST, size=len(blob)), io.BytesIO(blob))
        tar.addfile(info, io.BytesIO(stored))
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    (src / "backup-20260101T000000Z.tar.sha256").write_text("%s  x\n" % digest)
    return path


def test_single_pass_restore_refuses_a_tampered_member_before_touching_live_files(app, tmp_path):
    root, dest = app
    src = tmp_path / "bad-sets"
    src.mkdir()
    donor = make_db(tmp_path / "donor.db", rows=5)
    content = open(donor, "rb").read()
    _tampered_set(src, root / "app.db", content, intact=False)
    before = (root / "app.db").read_bytes()
    with pytest.raises(RunbookError, match=r"member databases/app\.db does not match its sha256"):
        bs.restore({"src": str(src), "force": True})
    assert (root / "app.db").read_bytes() == before
    assert not [n for n in listing(root) if n.startswith(".runbook-tmp-") or ".pre-restore-" in n]
    # the same into a fresh root: the directories the pass made for its temp files are gone again
    fresh = tmp_path / "fresh"
    with pytest.raises(RunbookError, match="does not match its sha256"):
        bs.restore({"src": str(src), "dest_root": str(fresh)})
    assert not fresh.exists()
    # intact: restores
    os.unlink(str(src / "backup-20260101T000000Z.tar"))
    _tampered_set(src, root / "app.db", content, intact=True)
    result = bs.restore({"src": str(src), "dest_root": str(fresh)})
    assert count(fresh / str(root / "app.db").lstrip("/")) == 5
    assert result["restored"] == [str(fresh / str(root / "app.db").lstrip("/"))]


def test_sidecar_mismatch_is_reported_first_even_when_members_are_bad(app, tmp_path):
    root, dest = app
    src = tmp_path / "bad-sets"
    src.mkdir()
    content = open(make_db(tmp_path / "donor.db", rows=5), "rb").read()
    _tampered_set(src, root / "app.db", content, intact=False)
    (src / "backup-20260101T000000Z.tar.sha256").write_text("%s  x\n" % ("b" * 64))
    with pytest.raises(RunbookError, match="sha256 mismatch"):
        bs.restore({"src": str(src), "force": True})


def test_drill_single_pass(backed_up, tmp_path):
    root, dest, result = backed_up
    drill = tmp_path / "drill"
    drill.mkdir()
    out = bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(drill)})
    assert out["drilled"] == ["app.db", "tokens.db"] and out["row_counts"]["app.db"]["items"] == 50
    assert out["manifest"]["name"] == result["name"]
    assert listing(drill) == []
