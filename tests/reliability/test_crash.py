# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""kill -9 at random moments: backup, restore, secret rotation, certificate installation.

Each fault: measure normal runs of the real engine while polling its directory for the first
``.runbook-tmp-*`` entry (the start of the write window), then RUNS times start it in a subprocess,
wait until it has made its first temp entry, SIGKILL it after a random extra delay drawn from the
measured rest of the run, check the invariants, and run it again. A kill before the first temp
entry finds nothing written, so none is spent there; each test asserts that a share of its kills
really hit the window (temp files left behind, a rename done, or both outcomes seen).
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
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402

DB_MIB = 48 if helpers.SOAK else 24


def _rng(name):
    seed = int(os.environ.get("RUNBOOK_SEED", "0")) or random.SystemRandom().randrange(1 << 30)
    print("%s: RUNBOOK_SEED=%d" % (name, seed))
    return random.Random(seed)


def _calibrate(make_cmd, directory, runs=3, before=None, attempts=12):
    """Medians of ``runs`` normal runs in which the poller saw a temp entry: (temp lifetime, rest
    of the run after the first temp entry, duration). ``before()`` runs ahead of each run (e.g. a
    reset). A temp file that lives about a millisecond (cert_install's) can come and go between two
    polls when the host is loaded, so a run that saw none is run again, up to ``attempts`` runs."""
    lifetimes, rests, durations = [], [], []
    for run in range(attempts):
        if before:
            before()
        seen = helpers.watch_run(make_cmd(run), directory, poll=0.0002)
        assert seen.returncode == 0, seen.stderr
        if seen.first_temp is None:
            continue
        lifetimes.append(seen.last_temp - seen.first_temp)
        rests.append(seen.ended - seen.first_temp)
        durations.append(seen.ended)
        if len(lifetimes) == runs:
            break
    assert len(lifetimes) == runs, "a %s* entry was seen in %s in only %d of %d normal runs" % (
        helpers.TEMP_PREFIX, directory, len(lifetimes), attempts)
    return sorted(lifetimes)[runs // 2], sorted(rests)[runs // 2], sorted(durations)[runs // 2]


def _verify_published(dest, being_pruned=()):
    """Every set under a final name verifies; returns the number of sets.

    ``being_pruned``: sets that existed before a killed run. Retention removes a set's checksum file
    first, then the set (_backupset._prune), so a kill between the two leaves an old, complete set
    without its checksum file: allowed for those only (restore refuses it, the next run prunes it),
    never for a set the killed run published."""
    sets = bs.list_sets(dest)
    for item in sets:
        path = os.path.join(dest, item["name"])
        if not item["verified"]:
            assert item["name"] in being_pruned, "%s has no checksum file" % item["name"]
            with pytest.raises(RunbookError, match="checksum file .* is missing"):
                bs.verify_set(path)
            continue
        helpers.verify_published(path)
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
    writer = helpers.Writer(db, 0)   # measured under the same load as the killed runs
    _lifetime, rest, duration = _calibrate(lambda _run: cmd, str(dest))
    writer.stop()
    next_row = max(helpers.log_rows(db) | {0})
    landed = in_window = left_temps = published_then_killed = orphan_sidecars = half_pruned = lost = 0
    rounds = 0
    while _more_rounds(rounds, in_window >= 0.5 * helpers.RUNS
                       and left_temps + published_then_killed >= 0.3 * helpers.RUNS):
        rounds += 1
        sets_before = set(item["name"] for item in bs.list_sets(str(dest)))
        writer = helpers.Writer(db, next_row)
        seen = helpers.watch_run(cmd, str(dest), kill_after=rng.uniform(0, rest))
        committed = writer.stop()
        # a writer killed between its commit and its report leaves one row it never reported
        next_row = max(committed | helpers.log_rows(db) | {next_row})
        landed += seen.landed
        in_window += seen.in_window
        left = bool(helpers.temps(dest))
        left_temps += left
        published = bool(set(item["name"] for item in bs.list_sets(str(dest))) - sets_before)
        published_then_killed += seen.landed and published
        names = os.listdir(dest)
        orphan_sidecars += sum(1 for n in names if n.endswith(".sha256") and n[:-7] not in names)
        # a kill during retention: the set being pruned may have lost its checksum file already
        _verify_published(dest, being_pruned=sets_before)
        half_pruned += sum(1 for item in bs.list_sets(str(dest)) if not item["verified"])
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
    helpers.record("crash.backup", runs=rounds, faults=rounds, kills_landed_mid_run=landed,
                   kills_in_write_window=in_window, kills_leaving_temp_files=left_temps,
                   kills_after_publish=published_then_killed, orphan_sidecars_after_kill=orphan_sidecars,
                   half_pruned_sets_after_kill=half_pruned,
                   committed_rows_lost=lost, normal_run_seconds=round(duration, 2),
                   write_window_seconds=round(rest, 3), db_mib=DB_MIB)
    # the kills must have hit the write window, not only start-up (kills after it are safe trivially)
    assert left_temps + published_then_killed >= 0.3 * helpers.RUNS, (left_temps, published_then_killed)
    assert in_window >= 0.5 * helpers.RUNS, in_window


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
    sets_before = {name: helpers.sha256(dest / name) for name in os.listdir(dest)}
    config = helpers.write_json(tmp_path / "restore.json", {"src": str(dest), "force": True, "safety_copy": False})
    cmd = helpers.engine_cmd("_backupset", "restore", "--config", config)

    def reset():
        shutil.copy(tmp_path / "old.db", app / "reset.tmp")
        os.replace(app / "reset.tmp", db)
        env_path.write_bytes(old_env)

    _lifetime, rest, duration = _calibrate(lambda _run: cmd, str(app), before=reset)
    assert helpers.sha256(db) == new_db and env_path.read_bytes() == new_env

    landed = in_window = left_temps = got_old = got_new = 0
    new_db_old_env = old_db_new_env = 0
    rounds = 0
    while _more_rounds(rounds, in_window >= 0.5 * helpers.RUNS and left_temps + got_new >= 0.3 * helpers.RUNS):
        rounds += 1
        reset()
        seen = helpers.watch_run(cmd, str(app), kill_after=rng.uniform(0, rest))
        landed += seen.landed
        in_window += seen.in_window
        left = bool(helpers.temps(app))
        left_temps += left
        # each file on its own: byte for byte the old one or the new one, never a mix
        state = helpers.sha256(db)
        assert state in (old_db, new_db), "live database is neither the old nor the new one"
        env_now = env_path.read_bytes()
        assert env_now in (old_env, new_env), "live .env is neither the old nor the new one"
        for extra in ("-wal", "-journal"):   # no stale journal next to the (old or new) file
            assert not os.path.exists(db + extra)
        assert helpers.integrity(db, immutable=True) == ["ok"]
        got_old += state == old_db
        got_new += state == new_db
        # across files a restore is NOT atomic (one rename per file): counted, not forbidden
        new_db_old_env += state == new_db and env_now == old_env
        old_db_new_env += state == old_db and env_now == new_env
        proc, _elapsed = helpers.run_timed(cmd)
        assert proc.returncode == 0, proc.stderr
        assert helpers.sha256(db) == new_db and env_path.read_bytes() == new_env
        assert helpers.temps(app) == []
    # the sets themselves are only read
    assert {name: helpers.sha256(dest / name) for name in os.listdir(dest)} == sets_before
    helpers.record("crash.restore", runs=rounds, faults=rounds, kills_landed_mid_run=landed,
                   kills_in_write_window=in_window, kills_leaving_temp_files=left_temps, left_old_db=got_old,
                   left_new_db=got_new, db_and_env_from_different_states=new_db_old_env + old_db_new_env,
                   new_db_with_old_env=new_db_old_env, old_db_with_new_env=old_db_new_env, mixed_db_files=0,
                   mixed_env_files=0, normal_run_seconds=round(duration, 2), write_window_seconds=round(rest, 3))
    assert left_temps + got_new >= 0.3 * helpers.RUNS, (left_temps, got_new)
    assert in_window >= 0.5 * helpers.RUNS, in_window


def _more_rounds(done, enough):
    """Whether to run another kill round: helpers.RUNS of them, then more, up to 3 times as many,
    while ``enough`` (the test's thresholds, absolute counts checked again after the loop) is false.
    The kills are timed from a calibration, and a loaded host can shift them out of the write
    window; more rounds reach the thresholds instead of lowering them."""
    return done < helpers.RUNS or (not enough and done < 3 * helpers.RUNS)


def _stratified_delay(rng, run, lifetime, rest):
    """Even runs: a moment while the temp file exists (measured lifetime); odd runs: a moment in the
    rest of the run (after the rename: directory fsync, exit). Both are real kills of a real run."""
    if run % 2 == 0:
        return rng.uniform(0, lifetime)
    return rng.uniform(lifetime, max(rest, lifetime))


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
    others = _dotenv.parse(env_path.read_bytes(), str(env_path)).get("OTHER_2999").value
    cmd = [helpers.PYTHON, "-c", SECRETS_SCRIPT % {"build": helpers.BUILD, "count": count}, str(env_path)]
    lifetime, rest, duration = _calibrate(lambda _run: cmd, str(conf))
    landed = in_window = left_temps = all_old = all_new = 0
    rounds = 0
    while _more_rounds(rounds, in_window >= 0.5 * helpers.RUNS and all_old >= 1 and all_new >= 1):
        run = rounds
        rounds += 1
        before = _values(env_path, count)
        seen = helpers.watch_run(cmd, str(conf), kill_after=_stratified_delay(rng, run, lifetime, rest),
                                 poll=0.0002)
        landed += seen.landed
        in_window += seen.in_window
        left_temps += bool(helpers.temps(conf))
        after = _values(env_path, count)   # parses, or the test fails here
        changed = [k for k in before if before[k] != after[k]]
        assert changed in ([], list(before)), "a mix of old and new values: %d of %d changed" % (
            len(changed), len(before))
        assert _dotenv.parse(env_path.read_bytes(), str(env_path)).get("OTHER_2999").value == others
        all_old += not changed
        all_new += bool(changed)
        assert os.stat(env_path).st_mode & 0o777 == 0o600
        proc, _elapsed = helpers.run_timed(cmd)
        assert proc.returncode == 0, proc.stderr
        assert helpers.temps(conf) == []
    helpers.record("crash.secret_rotate", runs=rounds, faults=rounds, kills_landed_mid_run=landed,
                   kills_in_write_window=in_window, kills_leaving_temp_files=left_temps, left_all_old=all_old,
                   left_all_new=all_new, mixed=0, normal_run_seconds=round(duration, 2),
                   temp_file_lifetime_ms=round(lifetime * 1000, 2))
    # kills landed on both sides of the rename: before it (old values) and after it (new values)
    assert all_old >= 1 and all_new >= 1, (all_old, all_new)
    assert in_window >= 0.5 * helpers.RUNS, in_window


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
    helpers.require_module("cryptography")
    rng = _rng("certs")
    certs = tmp_path / "certs"
    certs.mkdir()
    script = CERT_SCRIPT % {"build": helpers.BUILD}

    def cmd_for(run):   # a new name forces a new pair
        return [helpers.PYTHON, "-c", script, str(certs), "host%d.example" % run]

    lifetime, rest, duration = _calibrate(lambda run: cmd_for(1000 + run), str(certs))
    landed = in_window = left_temps = kept_old = got_new = new_key_old_cert = 0
    rounds = 0
    while _more_rounds(rounds, in_window >= 0.5 * helpers.RUNS and kept_old >= 1 and got_new >= 1):
        run = rounds
        rounds += 1
        before = _pair(certs)
        assert before[2], "certificate and key do not match before the kill"
        seen = helpers.watch_run(cmd_for(run), str(certs), kill_after=_stratified_delay(rng, run, lifetime, rest),
                                 poll=0.0002)
        landed += seen.landed
        in_window += seen.in_window
        left_temps += bool(helpers.temps(certs))
        after = _pair(certs)   # both files parse (never a partial file), key mode 0600
        if after[2]:
            kept_old += after == before
            got_new += after != before
        else:
            # the one window left (docs/RELIABILITY.md): the key is renamed first, then the
            # certificate, so a mismatch can only be a new key beside the old certificate, never a
            # new certificate beside an old key
            assert after[0] == before[0] and after[1] != before[1], "new certificate with an old key"
            new_key_old_cert += 1
        proc, _elapsed = helpers.run_timed(cmd_for(run))
        assert proc.returncode == 0, proc.stderr
        assert helpers.temps(certs) == []
        assert _pair(certs)[2], "the next run left a mismatched pair"
    helpers.record("crash.cert_install", runs=rounds, faults=rounds, kills_landed_mid_run=landed,
                   kills_in_write_window=in_window, kills_leaving_temp_files=left_temps, left_old_pair=kept_old,
                   left_new_pair=got_new, new_key_with_old_cert=new_key_old_cert, new_cert_with_old_key=0,
                   normal_run_seconds=round(duration, 2), temp_file_lifetime_ms=round(lifetime * 1000, 2))
    assert kept_old >= 1 and got_new >= 1, (kept_old, got_new)
    assert in_window >= 0.5 * helpers.RUNS, in_window


def _pair(certs):
    """(certificate fingerprint, public key of the key file, whether they match)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    key = serialization.load_pem_private_key((certs / "server.key").read_bytes(), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    key_public = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert os.stat(certs / "server.key").st_mode & 0o777 == 0o600
    return (cert.fingerprint(cert.signature_hash_algorithm).hex(), key_public,
            cert.public_key().public_bytes(serialization.Encoding.DER, spki) == key_public)
