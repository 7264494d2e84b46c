# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""kill -9 at random moments: backup, restore, secret rotation, certificate installation.

Each fault: measure a normal run, then RUNS times start the real engine in a subprocess, SIGKILL it
after a random delay within the measured duration, check the invariants, and run it again.
"""

from __future__ import annotations

import os
import random
import shutil
import sys

import helpers
import pytest

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv  # noqa: E402

DB_MIB = 48 if helpers.SOAK else 24


def _rng(name):
    seed = int(os.environ.get("RUNBOOK_SEED", "0")) or random.SystemRandom().randrange(1 << 30)
    print("%s: RUNBOOK_SEED=%d" % (name, seed))
    return random.Random(seed)


def _verify_published(dest):
    """Every set under a final name verifies; returns the number of sets."""
    sets = bs.list_sets(dest)
    for item in sets:
        assert item["verified"], "%s has no checksum file" % item["name"]
        bs.verify_set(os.path.join(dest, item["name"]))
    for name in os.listdir(dest):
        if name.endswith(".sha256") and not name.startswith(helpers.TEMP_PREFIX):
            assert os.path.exists(os.path.join(dest, name[:-7])) or bs.parse_set_name(name[:-7])
    return len(sets)


def test_kill_backup(tmp_path):
    rng = _rng("backup")
    app, dest = tmp_path / "app", tmp_path / "dest"
    app.mkdir()
    dest.mkdir()
    db = helpers.make_db(app / "app.db", mib=DB_MIB)
    (app / ".env").write_text("SECRET=abc\n")
    config = helpers.write_json(tmp_path / "backup.json", {
        "databases": [db], "extra_paths": [str(app / ".env")], "root": str(app), "dest": str(dest),
        "keep_last": 2, "lock_timeout": 30})
    cmd = helpers.engine_cmd("_backupset", "backup", "--config", config)
    proc, duration = helpers.run_timed(cmd)
    assert proc.returncode == 0, proc.stderr
    landed = left_temps = orphan_sidecars = lost = 0
    next_row = 0
    for _run in range(helpers.RUNS):
        writer = helpers.Writer(db, next_row)
        landed_now, _proc = helpers.kill_at(cmd, rng.uniform(0.05, duration))
        committed = writer.stop()
        next_row = max(committed | {next_row})
        landed += landed_now
        left_temps += bool(helpers.temps(dest))
        names = os.listdir(dest)
        orphan_sidecars += sum(1 for n in names if n.endswith(".sha256") and n[:-7] not in names)
        _verify_published(dest)
        assert helpers.integrity(db) == ["ok"]
        missing = committed - helpers.log_rows(db)
        lost += len(missing)
        assert not missing, "rows reported committed are gone: %s" % sorted(missing)[:10]
        # the next run succeeds and cleans up after the killed one
        proc, _elapsed = helpers.run_timed(cmd)
        assert proc.returncode == 0, proc.stderr
        assert helpers.temps(dest) == []
        assert all(not n.endswith(".sha256") or n[:-7] in os.listdir(dest) for n in os.listdir(dest))
        assert _verify_published(dest) >= 1
    helpers.record("crash.backup", runs=helpers.RUNS, faults=helpers.RUNS, kills_landed_mid_run=landed,
                   kills_leaving_temp_files=left_temps, orphan_sidecars_after_kill=orphan_sidecars,
                   committed_rows_lost=lost, normal_run_seconds=round(duration, 2), db_mib=DB_MIB)


def test_kill_restore(tmp_path):
    rng = _rng("restore")
    app, dest = tmp_path / "app", tmp_path / "dest"
    app.mkdir()
    dest.mkdir()
    db = str(app / "app.db")
    env_path = app / ".env"
    # the set holds NEW; the live files are OLD; a killed restore must leave OLD or NEW per file
    helpers.make_db(db, mib=DB_MIB, seed=2, tag="new")
    env_path.write_text("TOKEN=new-value\n")
    made = bs.backup({"databases": [db], "extra_paths": [str(env_path)], "root": str(app), "dest": str(dest)})
    new_db, new_env = made["databases"][0]["sha256"], env_path.read_bytes()  # the snapshot as stored
    os.unlink(db)
    helpers.make_db(db, mib=DB_MIB / 2, seed=1, tag="old")
    env_path.write_text("TOKEN=old-value\n")
    old_db, old_env = helpers.sha256(db), env_path.read_bytes()
    shutil.copy(db, tmp_path / "old.db")
    config = helpers.write_json(tmp_path / "restore.json", {"src": str(dest), "force": True, "safety_copy": False})
    cmd = helpers.engine_cmd("_backupset", "restore", "--config", config)
    proc, duration = helpers.run_timed(cmd)
    assert proc.returncode == 0, proc.stderr
    assert helpers.sha256(db) == new_db

    def reset():
        shutil.copy(tmp_path / "old.db", app / "reset.tmp")
        os.replace(app / "reset.tmp", db)
        env_path.write_bytes(old_env)

    landed = left_temps = got_old = got_new = mixed = 0
    for _run in range(helpers.RUNS):
        reset()
        landed_now, _proc = helpers.kill_at(cmd, rng.uniform(0.05, duration))
        landed += landed_now
        left_temps += bool(helpers.temps(app))
        state = helpers.sha256(db)
        assert state in (old_db, new_db), "live database is neither the old nor the new one"
        assert env_path.read_bytes() in (old_env, new_env)
        for extra in ("-wal", "-journal"):   # no stale journal next to the (old or new) file
            assert not os.path.exists(db + extra)
        assert helpers.integrity(db, immutable=True) == ["ok"]
        got_old += state == old_db
        got_new += state == new_db
        mixed += (state == new_db) != (env_path.read_bytes() == new_env)
        proc, _elapsed = helpers.run_timed(cmd)
        assert proc.returncode == 0, proc.stderr
        assert helpers.sha256(db) == new_db and env_path.read_bytes() == new_env
        assert helpers.temps(app) == []
    helpers.record("crash.restore", runs=helpers.RUNS, faults=helpers.RUNS, kills_landed_mid_run=landed,
                   kills_leaving_temp_files=left_temps, left_old_db=got_old, left_new_db=got_new,
                   db_and_env_from_different_states=mixed, mixed_db_files=0,
                   normal_run_seconds=round(duration, 2))


SECRETS_SCRIPT = r"""
import sys
sys.path.insert(0, %(build)r)
from ansible_collections.runbook.sqlite_app.plugins.module_utils._secrets import rotate
rotate(sys.argv[1], [{"name": "KEY_%%d" %% i, "format": "hex"} for i in range(%(count)d)], force=True)
"""


def test_kill_secret_rotation(tmp_path):
    rng = _rng("secrets")
    count = 40
    conf = tmp_path / "conf"
    conf.mkdir()
    env_path = conf / ".env"
    # a big .env (many other entries) makes parse/serialize/write take measurable time
    env_path.write_text("".join("OTHER_%d=value-%d # comment\n" % (i, i) for i in range(3000)))
    cmd = [helpers.PYTHON, "-c", SECRETS_SCRIPT % {"build": helpers.BUILD, "count": count}, str(env_path)]
    proc, duration = helpers.run_timed(cmd)
    assert proc.returncode == 0, proc.stderr
    landed = left_temps = all_old = all_new = 0
    for _run in range(helpers.RUNS):
        before = _values(env_path, count)
        landed_now, _proc = helpers.kill_at(cmd, rng.uniform(0.05, duration))
        landed += landed_now
        left_temps += bool(helpers.temps(conf))
        after = _values(env_path, count)   # parses, or the test fails here
        changed = [k for k in before if before[k] != after[k]]
        assert changed in ([], list(before)), "a mix of old and new values: %d of %d changed" % (
            len(changed), len(before))
        all_old += not changed
        all_new += bool(changed)
        assert os.stat(env_path).st_mode & 0o777 == 0o600
        proc, _elapsed = helpers.run_timed(cmd)
        assert proc.returncode == 0, proc.stderr
        assert helpers.temps(conf) == []
    helpers.record("crash.secret_rotate", runs=helpers.RUNS, faults=helpers.RUNS, kills_landed_mid_run=landed,
                   kills_leaving_temp_files=left_temps, left_all_old=all_old, left_all_new=all_new, mixed=0,
                   normal_run_seconds=round(duration, 2))


def _values(path, count):
    env = _dotenv.parse(path.read_bytes(), str(path))
    return {"KEY_%d" % i: env.get("KEY_%d" % i).value for i in range(count)}


CERT_SCRIPT = r"""
import json, sys
sys.path.insert(0, %(build)r)
from ansible_collections.runbook.sqlite_app.plugins.module_utils._x509 import install
install({"source": "self_signed", "common_name": sys.argv[2], "dest_dir": sys.argv[1], "key_type": "rsa",
         "rsa_bits": 2048, "backup": False})
"""


def test_kill_cert_install(tmp_path):
    pytest.importorskip("cryptography")
    rng = _rng("certs")
    certs = tmp_path / "certs"
    certs.mkdir()
    script = CERT_SCRIPT % {"build": helpers.BUILD}
    proc, duration = helpers.run_timed([helpers.PYTHON, "-c", script, str(certs), "first.example"])
    assert proc.returncode == 0, proc.stderr
    landed = left_temps = kept_old = got_new = 0
    for run in range(helpers.RUNS):
        before = _pair(certs)
        cmd = [helpers.PYTHON, "-c", script, str(certs), "host%d.example" % run]  # a new name forces a new pair
        landed_now, _proc = helpers.kill_at(cmd, rng.uniform(0.05, duration * 1.2))
        landed += landed_now
        left_temps += bool(helpers.temps(certs))
        after = _pair(certs)   # asserts the pair matches
        kept_old += after == before
        got_new += after != before
        proc, _elapsed = helpers.run_timed(cmd)
        assert proc.returncode == 0, proc.stderr
        assert helpers.temps(certs) == []
        _pair(certs)
    helpers.record("crash.cert_install", runs=helpers.RUNS, faults=helpers.RUNS, kills_landed_mid_run=landed,
                   kills_leaving_temp_files=left_temps, left_old_pair=kept_old, left_new_pair=got_new,
                   mismatched_pairs=0, normal_run_seconds=round(duration, 2))


def _pair(certs):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        key.public_key().public_bytes(serialization.Encoding.DER, spki), "certificate and key do not match"
    assert os.stat(certs / "server.key").st_mode & 0o777 == 0o600
    return cert.fingerprint(cert.signature_hash_algorithm).hex()
