# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Two backups at once, a backup during VACUUM, a restore while the app holds the database."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import helpers
import pytest

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402


def _two_backups(tmp_path, lock_timeout):
    dest = tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    db = helpers.make_db(tmp_path / "app.db", mib=16)
    config = helpers.write_json(tmp_path / "b.json", {"databases": [db], "dest": str(dest),
                                                      "lock_timeout": lock_timeout})
    cmd = helpers.engine_cmd("_backupset", "backup", "--config", config)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=helpers.env())
             for _run in range(2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for item in bs.list_sets(str(dest)):
        bs.verify_set(os.path.join(str(dest), item["name"]))
    assert helpers.temps(dest) == [] and helpers.integrity(db) == ["ok"]
    return dest, results


def test_two_backups_no_wait_one_exits_75(tmp_path):
    dest, results = _two_backups(tmp_path, lock_timeout=0)
    codes = sorted(result[0] for result in results)
    assert codes in ([0, 75], [0, 0]), results   # [0, 0] only if the first finished before the second started
    for code, _out, err in results:
        if code == 75:
            assert "holds the lock" in err and ".runbook-backup.lock" in err
    assert len(bs.list_sets(str(dest))) == codes.count(0)
    helpers.record("concurrency.two_backups", runs=1, exit_75=codes.count(75), corrupted=0)


def test_two_backups_second_waits(tmp_path):
    dest, results = _two_backups(tmp_path, lock_timeout=60)
    assert [result[0] for result in results] == [0, 0], results
    assert len(bs.list_sets(str(dest))) == 2
    helpers.record("concurrency.two_backups", runs=1, waited=1, corrupted=0)


def test_backup_during_vacuum(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=24)
    conn = __import__("sqlite3").connect(db)
    conn.execute("DELETE FROM items WHERE id % 2 = 0")   # free pages so VACUUM has work to do
    conn.commit()
    conn.close()
    vacuum = subprocess.Popen(helpers.engine_cmd("_maintenance", db, "--vacuum", "always", "--busy-timeout",
                                                 "30000"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=helpers.env())
    time.sleep(0.3)
    config = helpers.write_json(tmp_path / "b.json", {"databases": [db], "dest": str(dest), "busy_timeout": 30000})
    backup, _elapsed = helpers.run_timed(helpers.engine_cmd("_backupset", "backup", "--config", config))
    out, err = vacuum.communicate(timeout=120)
    assert vacuum.returncode == 0, err
    assert backup.returncode == 0, backup.stderr
    assert helpers.integrity(db) == ["ok"]
    for item in bs.list_sets(str(dest)):
        bs.verify_set(os.path.join(str(dest), item["name"]))
    helpers.record("concurrency.backup_during_vacuum", runs=1, both_succeeded=1)


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
    conn = __import__("sqlite3").connect(db)
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
