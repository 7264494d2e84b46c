# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Two backups at once, a backup during VACUUM, a restore while the app holds the database."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import helpers
import pytest

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402


def _backup_cmd(tmp_path, dest, db, lock_timeout, name="b.json", **extra):
    config = helpers.write_json(tmp_path / name, dict({"databases": [db], "dest": str(dest),
                                                       "lock_timeout": lock_timeout}, **extra))
    return helpers.engine_cmd("_backupset", "backup", "--config", config)


def _spawn(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=helpers.env())


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for_temp(proc, dest, timeout=60):
    """Poll (1 ms) until the running backup has made its work dir in ``dest``: it holds the lock."""
    deadline = time.monotonic() + timeout
    while not helpers.temps(dest):
        assert proc.poll() is None, "the first backup ended before it was seen writing: %s" % (proc.communicate(),)
        assert time.monotonic() < deadline, "no temp entry in %s after %ss" % (dest, timeout)
        time.sleep(0.001)


def _verify_all(dest, db):
    for item in bs.list_sets(str(dest)):
        helpers.verify_published(os.path.join(str(dest), item["name"]))
    assert helpers.temps(dest) == [] and helpers.integrity(db) == ["ok"]


@contextlib.contextmanager
def _hold_dest_lock(dest):
    """The destination's lock exactly as DestLock takes it (flock LOCK_EX on dest/.runbook-backup.lock)."""
    fd = os.open(os.path.join(str(dest), bs.LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)   # releases the flock


def test_lock_held_backup_exits_75_and_publishes_nothing(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=1)
    with _hold_dest_lock(dest):
        before = helpers.list_dir(dest)
        started = time.monotonic()
        code, out, err = _finish(_spawn(_backup_cmd(tmp_path, dest, db, lock_timeout=1)))
        waited = time.monotonic() - started
        assert code == bs.EX_TEMPFAIL == 75, (code, err)
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err   # one clear line, no traceback
        assert str(dest / bs.LOCK_NAME) in lines[0] and "holds the lock" in lines[0] and "lock_timeout=1" in lines[0]
        assert waited >= 1.0, "gave up after %.2fs, before lock_timeout=1" % waited
        assert helpers.list_dir(dest) == before, "a run that did not get the lock wrote into dest"
    assert bs.list_sets(str(dest)) == []
    helpers.record("concurrency.lock_held", runs=1, exit_75=1, published=0)


def test_lock_released_in_time_backup_waits_then_succeeds(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=1)
    with _hold_dest_lock(dest):
        proc = _spawn(_backup_cmd(tmp_path, dest, db, lock_timeout=30))
        time.sleep(1.5)
        # still waiting: running, and nothing written while the lock is held
        assert proc.poll() is None, "the backup did not wait for the lock: %s" % (proc.communicate(),)
        assert bs.list_sets(str(dest)) == [] and helpers.temps(dest) == []
        released = time.monotonic()
    code, out, err = _finish(proc)
    assert code == 0, err
    assert time.monotonic() - released < 20
    result = json.loads(out)
    assert [item["name"] for item in bs.list_sets(str(dest))] == [result["name"]]
    _verify_all(dest, db)
    helpers.record("concurrency.lock_held", runs=1, waited=1)


def test_two_backups_no_wait_second_exits_75(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    # gzip: the slow path (read back after writing), so the first run is still holding the lock
    # well after the second has started
    db = helpers.make_db(tmp_path / "app.db", mib=16)
    first = _spawn(_backup_cmd(tmp_path, dest, db, lock_timeout=0, compression="gzip"))
    _wait_for_temp(first, dest)
    second = _spawn(_backup_cmd(tmp_path, dest, db, lock_timeout=0, name="b2.json", compression="gzip"))
    code2, _out2, err2 = _finish(second)
    assert first.poll() is None, "the first backup finished before the second was refused: no contention"
    code1, out1, err1 = _finish(first)
    assert (code1, code2) == (0, 75), (err1, err2)
    assert "holds the lock" in err2 and bs.LOCK_NAME in err2 and "Traceback" not in err2
    assert [item["name"] for item in bs.list_sets(str(dest))] == [json.loads(out1)["name"]]
    _verify_all(dest, db)
    helpers.record("concurrency.two_backups", runs=1, exit_75=1, corrupted=0)


def test_two_backups_second_waits(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=16)
    first = _spawn(_backup_cmd(tmp_path, dest, db, lock_timeout=60, compression="gzip"))
    _wait_for_temp(first, dest)
    second = _spawn(_backup_cmd(tmp_path, dest, db, lock_timeout=60, name="b2.json", compression="gzip"))
    code1, out1, err1 = _finish(first)
    assert second.poll() is None, "the second backup was not waiting for the first"
    code2, out2, err2 = _finish(second)
    assert (code1, code2) == (0, 0), (err1, err2)
    names = [json.loads(out1)["name"], json.loads(out2)["name"]]
    assert sorted(item["name"] for item in bs.list_sets(str(dest))) == sorted(names) and names[0] != names[1]
    _verify_all(dest, db)
    helpers.record("concurrency.two_backups", runs=1, waited=1, corrupted=0)


def _vacuum_temp_open(pid, temp_dir):
    """True while process ``pid`` holds SQLite's VACUUM temp database (an unlinked ``etilqs_*`` file
    in ``temp_dir``) open: it is inside VACUUM."""
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith(temp_dir + "/"):
                return True
        except OSError:
            pass
    return False


def test_backup_during_vacuum(tmp_path):
    helpers.require(os.path.isdir("/proc/self/fd"), "needs /proc to see the VACUUM in progress")
    dest, vacuum_tmp, drill = tmp_path / "dest", tmp_path / "vacuum-tmp", tmp_path / "drill"
    for directory in (dest, vacuum_tmp, drill):
        directory.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=48)
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM items WHERE id % 2 = 0")   # free pages so VACUUM has work to do
    conn.commit()
    counts = {"items": conn.execute("SELECT count(*) FROM items").fetchone()[0], "log": 0}
    conn.close()
    vacuum = subprocess.Popen(helpers.engine_cmd("_maintenance", db, "--vacuum", "always", "--busy-timeout",
                                                 "30000", "--temp-dir", str(vacuum_tmp)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=helpers.env())
    outcome = {}

    def run_backup():
        try:
            outcome["result"] = bs.backup({"databases": [db], "dest": str(dest), "busy_timeout": 30000})
        except Exception as exc:  # noqa: BLE001 (reported by the assertion below)
            outcome["error"] = exc

    try:
        while not _vacuum_temp_open(vacuum.pid, str(vacuum_tmp)):   # wait until VACUUM is under way
            assert vacuum.poll() is None, "VACUUM ended before it was seen running: %s" % (vacuum.communicate(),)
            time.sleep(0.001)
        # the real engine, in this process (no interpreter start-up between "VACUUM seen" and the backup)
        backup = threading.Thread(target=run_backup)
        backup.start()
        overlap = False
        while backup.is_alive():
            if helpers.temps(dest) and _vacuum_temp_open(vacuum.pid, str(vacuum_tmp)):
                overlap = True   # the backup was writing its set while VACUUM was still running
            time.sleep(0.0005)
        backup.join()
    finally:
        out, err = vacuum.communicate(timeout=120)
    assert vacuum.returncode == 0, err
    assert "error" not in outcome, outcome.get("error")
    assert json.loads(out)["databases"][0]["vacuumed"] == "full"
    assert overlap, "the backup did not run while VACUUM was in progress"
    assert helpers.integrity(db) == ["ok"]
    _verify_all(dest, db)
    drilled = bs.restore({"src": str(dest), "mode": "drill", "drill_dir": str(drill)})
    assert list(drilled["row_counts"].values()) == [counts], drilled["row_counts"]
    helpers.record("concurrency.backup_during_vacuum", runs=1, both_succeeded=1, overlap_observed=1)


HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1])
conn.execute("SELECT count(*) FROM items").fetchone()
print("open", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_restore_refuses_while_app_holds_db(tmp_path, journal_mode):
    sets = tmp_path / "sets"
    sets.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=0.2, journal_mode=journal_mode, seed=1)
    bs.backup({"databases": [db], "dest": str(sets)})
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO log (n) VALUES (1)")
    conn.commit()
    conn.close()
    app = subprocess.Popen([helpers.PYTHON, "-c", HOLDER, db], stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout.readline().strip() == "open"
        live = helpers.sha256(db)
        with pytest.raises(RunbookError, match="running process") as err:
            bs.restore({"src": str(sets), "force": True})
        assert str(app.pid) in str(err.value) and "force_running" in str(err.value)
        with pytest.raises(RunbookError, match="running process"):
            bs.restore({"src": str(sets), "force": True}, check_mode=True)
        assert helpers.sha256(db) == live
        # the SQLite lock probe on its own (what a process in another PID namespace still shows)
        if journal_mode == "wal":
            assert bs._sqlite_locked(db)
        # force_running: the operator takes responsibility
        result = bs.restore({"src": str(sets), "force": True, "force_running": True})
        assert db in result["restored"]
    finally:
        app.kill()
        app.wait()
        app.stdout.close()
    assert bs.processes_holding(db) == []
    helpers.record("concurrency.restore_while_running", runs=1, refused=2)
