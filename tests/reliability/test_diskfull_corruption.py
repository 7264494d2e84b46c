# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Disk full (real tmpfs mounts) and corrupted sets / databases."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import helpers
import pytest

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _maintenance  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402


def _pubkey(tmp_path):
    identity = tmp_path / "id.txt"
    proc = subprocess.run(["age-keygen", "-o", str(identity)], capture_output=True, text=True, check=True)
    return identity, proc.stderr.split()[-1]


def _snapshot_dir(directory):
    """{name: sha256} of every file in ``directory`` (sets, sidecars, the lock file)."""
    return {name: helpers.sha256(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


@pytest.mark.parametrize("variant", ["zstd", "gzip", "none", "age"])
def test_backup_disk_full(tmp_path, tmpfs, variant):
    if variant == "age":
        helpers.require_tools("age", "age-keygen")
    dest = tmpfs("dest", "1m")
    small = helpers.make_db(tmp_path / "small.db", mib=0.05)
    big = helpers.make_db(tmp_path / "big.db", mib=3)   # incompressible: cannot fit in 1 MiB
    extra = {}
    if variant == "age":
        identity, pub = _pubkey(tmp_path)
        extra["encrypt_recipients"] = [pub]
    compression = "zstd" if variant == "age" else variant
    base = dict({"databases": [small], "dest": dest, "compression": compression, "name_prefix": "backup"}, **extra)
    # two existing sets (one per second: the engine waits for the next second itself)
    existing = [bs.backup(base)["name"] for _run in range(2)]
    assert [item["name"] for item in bs.list_sets(dest)] == existing[::-1]
    before = _snapshot_dir(dest)
    assert len([name for name in before if name.endswith(".sha256")]) == 2
    source = helpers.sha256(big)
    # keep_last=2: on success the new set would be kept with the newer existing one and the older
    # existing set pruned; a run that fails must prune nothing
    with pytest.raises(RunbookError, match="no space left") as err:
        bs.backup(dict(base, databases=[big], keep_last=2))
    assert dest in str(err.value)
    assert helpers.temps(dest) == []
    assert _snapshot_dir(dest) == before, "existing sets or sidecars changed, or retention deleted one"
    for name in existing:
        bs.verify_set(os.path.join(dest, name), identity=str(identity) if variant == "age" else None)
    assert helpers.sha256(big) == source and helpers.integrity(big) == ["ok"]
    # the same retention on a run that fits prunes exactly the older set: the check above could fail
    made = bs.backup(dict(base, keep_last=2))
    assert made["pruned"] == [existing[0]] and sorted(made["kept"]) == sorted([existing[1], made["name"]])
    helpers.record("disk_full.backup", faults=1, clear_error=1, existing_sets=len(existing), sets_lost=0,
                   sidecars_changed=0)


@pytest.mark.parametrize("compression", ["none", "zstd"])  # copied in the kernel, or decompressed and written
def test_restore_disk_full(tmp_path, tmpfs, compression):
    live = tmpfs("live", "1m")
    sets = tmp_path / "sets"
    sets.mkdir()
    db = os.path.join(live, "app.db")
    big = helpers.make_db(tmp_path / "app.db", mib=3, seed=5)
    bs.backup({"databases": [big], "dest": str(sets), "compression": compression})
    # the live database (small) sits on the full file system; the set maps to it via dest_root
    helpers.make_db(db, mib=0.05)
    source_path = os.path.join(live, str(tmp_path / "app.db").lstrip("/"))
    os.makedirs(os.path.dirname(source_path))
    shutil.copy(db, source_path)
    live_hash = helpers.sha256(source_path)
    sets_before = _snapshot_dir(sets)
    live_before = sorted(os.listdir(os.path.dirname(source_path)))
    with pytest.raises(RunbookError) as err:
        bs.restore({"src": str(sets), "dest_root": live, "force": True})
    # named by the database it was to replace, not by the set (on another disk) nor a temp file
    assert str(err.value).startswith(source_path + " (extracting databases/"), err.value
    assert str(err.value).endswith("): cannot write: no space left on device"), err.value
    assert helpers.sha256(source_path) == live_hash
    assert sorted(os.listdir(os.path.dirname(source_path))) == live_before   # no temp, no safety copy
    assert _snapshot_dir(sets) == sets_before, "the sets directory changed"
    helpers.record("disk_full.restore", faults=1, clear_error=1, live_db_changed=0, sets_changed=0)


def test_drill_disk_full(tmp_path, tmpfs):
    scratch = tmpfs("scratch", "1m")
    sets = tmp_path / "sets"
    sets.mkdir()
    bs.backup({"databases": [helpers.make_db(tmp_path / "app.db", mib=3, seed=6)], "dest": str(sets)})
    sets_before = _snapshot_dir(sets)
    with pytest.raises(RunbookError) as err:
        bs.restore({"src": str(sets), "mode": "drill", "drill_dir": scratch})
    assert str(err.value).startswith(scratch + " (extracting databases/"), err.value
    assert str(err.value).endswith("): cannot write: no space left on device"), err.value
    assert os.listdir(scratch) == []  # its temp directory is gone
    assert _snapshot_dir(sets) == sets_before, "the sets directory changed"
    helpers.record("disk_full.drill", faults=1, clear_error=1, sets_changed=0)


# ---------------------------------------------------------------------------------------------
# corruption


def _damage(kind, path, sets_dir):
    name = os.path.basename(path)
    data = open(path, "rb").read()
    out = os.path.join(sets_dir, name.replace("backup-", "damaged%s-" % kind.replace("_", "")))
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "bit_flipped":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1:]
    with open(out, "wb") as handle:
        handle.write(data)
    digest = helpers.sha256(out)
    if kind == "wrong_checksum":
        digest = "0" * 64
    with open(out + ".sha256", "w", encoding="ascii") as handle:   # a consistent sidecar for the damaged file
        handle.write("%s  %s\n" % (digest, os.path.basename(out)))
    if kind == "bit_flipped_bad_sidecar":
        with open(out, "r+b") as handle:
            handle.seek(len(data) // 3)
            byte = handle.read(1)
            handle.seek(len(data) // 3)
            handle.write(bytes([byte[0] ^ 1]))
    return os.path.basename(out)


def _backed_up_then_changed(tmp_path, compression):
    """A set of app.db, then app.db replaced by a different database: (app, sets, db, backup result)."""
    app, sets = tmp_path / "app", tmp_path / "sets"
    app.mkdir()
    sets.mkdir()
    db = helpers.make_db(app / "app.db", mib=0.5, seed=3)
    made = bs.backup({"databases": [db], "dest": str(sets), "compression": compression})
    os.unlink(db)
    helpers.make_db(db, mib=0.2, seed=4)   # the live database differs from the set
    return app, sets, db, made


@pytest.mark.parametrize("compression", ["none", "zstd", "gzip"])
@pytest.mark.parametrize("kind", ["truncated", "bit_flipped", "bit_flipped_bad_sidecar"])
def test_damaged_set_refused_before_touching_live(tmp_path, compression, kind):
    app, sets, db, made = _backed_up_then_changed(tmp_path, compression)
    live = helpers.sha256(db)
    name = _damage(kind, made["path"], str(sets))
    with pytest.raises(RunbookError) as err:
        bs.restore({"src": str(sets), "set": name, "force": True})
    text = str(err.value)
    assert name in text and any(word in text for word in ("damaged", "sha256", "truncated", "zstd", "not a backup"))
    assert helpers.sha256(db) == live
    assert helpers.temps(app) == []
    assert not [n for n in os.listdir(app) if "pre-restore" in n]
    helpers.record("corruption.sets", faults=1, refused=1, live_db_changed=0)


@pytest.mark.parametrize("compression", ["none", "zstd", "gzip"])
def test_wrong_sidecar_beside_an_intact_set(tmp_path, compression):
    """Restore checks every byte it uses against SHA256SUMS (the manifest included), not the set
    file against its sidecar: an intact set whose sidecar is wrong still restores, exactly what was
    backed up; select mode, which checks the sidecar and nothing else, refuses it."""
    _app, sets, db, made = _backed_up_then_changed(tmp_path, compression)
    name = _damage("wrong_checksum", made["path"], str(sets))
    with pytest.raises(RunbookError, match="sha256 mismatch"):
        bs.restore({"src": str(sets), "set": name, "mode": "select"})
    out = bs.restore({"src": str(sets), "set": name, "force": True})
    assert out["verified"] is True and out["restored"] == [db]
    assert helpers.sha256(db) == made["databases"][0]["sha256"]  # the snapshot the set was made of
    helpers.record("corruption.sets", wrong_sidecar_intact_restored=1)


def _corrupt_db(path):
    """Overwrite the middle of the file with garbage (a table's b-tree pages)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\xa5" * 8192)


def test_damaged_live_db_backup_publishes_nothing(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    db = helpers.make_db(tmp_path / "app.db", mib=1)
    _corrupt_db(db)
    with pytest.raises(RunbookError, match="check") as err:
        bs.backup({"databases": [db], "dest": str(dest), "check": "integrity_check"})
    assert "set not written" in str(err.value) or "damaged" in str(err.value)
    assert bs.list_sets(str(dest)) == [] and helpers.temps(dest) == []
    proc, _elapsed = helpers.run_timed(helpers.engine_cmd("_backupset", "backup", "--config", helpers.write_json(
        tmp_path / "c.json", {"databases": [db], "dest": str(dest), "check": "integrity_check"})))
    assert proc.returncode == 1 and "check" in proc.stderr and "Traceback" not in proc.stderr
    assert bs.list_sets(str(dest)) == []
    helpers.record("corruption.live_db_backup", faults=2, refused=2)


def test_damaged_live_db_vacuum_refuses(tmp_path):
    db = helpers.make_db(tmp_path / "app.db", mib=1)
    _corrupt_db(db)
    damaged = helpers.sha256(db)
    with pytest.raises(RunbookError) as err:
        _maintenance.maintain([db], vacuum="always")
    assert db in str(err.value)
    assert helpers.sha256(db) == damaged   # left untouched
    proc, _elapsed = helpers.run_timed(helpers.engine_cmd("_maintenance", db, "--vacuum", "always"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    helpers.record("corruption.live_db_vacuum", faults=2, refused=2)
