"""End-to-end runbook on real systemd containers, driven by the collection's own playbooks.

Runs after converge (deploy of release 1 on runbook-app1..3, idempotent, check mode clean):
write data over loopback -> backup with an off-host copy -> upgrade to 2 (schema migration) ->
data still there -> upgrade to the broken 3, whose migration rewrites every row before its health
gate fails: automatic rollback of code and data on the first host, the rollout stops there ->
destroy runbook-app1 -> disaster_recovery onto runbook-fresh from the off-host copy on
runbook-store -> same data, healthy. Every playbook runs at -vvv --diff and its output is kept:
the last test searches it for every secret of the app hosts. The steps share state and run in order.
"""

import base64
import binascii
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import testinfra

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
DIST = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "dist")
BACKUPS = "/var/backups/gateway"
DATA = "/srv/gateway/.data"
STATE = {}
# (command, output) of every playbook run, for the leak check at the end.
OUTPUTS = []
SET_TIME = re.compile(r"-(\d{8}T\d{6}Z)")
PLAYBOOK_LOGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "build",
                             "molecule-runbook-playbooks")
shutil.rmtree(PLAYBOOK_LOGS, ignore_errors=True)  # this run's outputs only


def _host(name):
    return testinfra.get_host("ansible://%s?ansible_inventory=%s" % (name, INVENTORY))


def _playbook(name, *extra):
    # -vvv --diff: the most an operator can ask for; none of it may show a secret (test_99).
    cmd = ["ansible-playbook", "-vvv", "--diff", "-i", INVENTORY, "runbook.sqlite_app." + name, *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    out = run.stdout + run.stderr
    OUTPUTS.append((" ".join(cmd), out))
    # Kept next to the scenario's log (build/molecule-runbook-playbooks/NN-NAME.log): an assertion
    # shows only the end of one output, and a failure after a passing play needs the whole of it.
    os.makedirs(PLAYBOOK_LOGS, exist_ok=True)
    with open(os.path.join(PLAYBOOK_LOGS, "%02d-%s.log" % (len(OUTPUTS), name)), "w", encoding="utf-8") as handle:
        handle.write("$ %s\n# rc %d\n%s" % (" ".join(cmd), run.returncode, out))
    return run.returncode, out


def _flat(out):
    # The yaml result format wraps long strings at spaces: compare phrases with whitespace collapsed.
    return " ".join(out.split())


def _get(host, path):
    out = host.check_output("curl -sf http://127.0.0.1:8080%s" % path)
    return json.loads(out)


def _post(host, body):
    host.check_output("curl -sf -X POST -H 'Content-Type: application/json' -d %s http://127.0.0.1:8080/items"
                      % json.dumps(json.dumps({"body": body})))


def _items(host):
    return _get(host, "/items")


def _bodies(host):
    return sorted(item["body"] for item in _items(host))


def _sets(host, pattern=""):
    """Set file names (no sidecars) in the backup directory, oldest first."""
    cmd = "ls %s | grep -v 'sha256$' | grep -E %s || true" % (BACKUPS, shlex.quote(pattern or "."))
    names = [name for name in host.check_output(cmd).split() if SET_TIME.search(name)]
    return sorted(names, key=lambda name: SET_TIME.search(name).group(1))


def _set_time(name):
    return datetime.datetime.strptime(SET_TIME.search(name).group(1), "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)


def _assert_healthy_on_2(host, name):
    live = host.run("curl -sf http://127.0.0.1:8080/healthz")
    # Not answering at all: show what systemd and the app said, the only trace once the container is gone.
    assert live.rc == 0, (name, live.rc, host.run(
        "systemctl status gateway.service --no-pager; journalctl -u gateway.service -n 40 --no-pager").stdout)
    assert json.loads(live.stdout)["version"] == 2, name
    ready = host.run("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/readyz")
    assert ready.stdout.strip() == "200", (name, ready.stdout)
    assert _get(host, "/stats")["schema"] == 2, name
    assert host.file("/srv/gateway/current").linked_to.endswith("/2"), name


# user_version and the sorted bodies of a sample_app database (argv[1]), as JSON.
READ_DB = (
    "import json, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
    "print(json.dumps([c.execute('PRAGMA user_version').fetchone()[0], "
    "sorted(r[0] for r in c.execute('SELECT body FROM items'))]))"
)

AUDIT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "reliability", "audit.py")


def _audit(host, expression):
    # The reliability suite's audit, run inside the container: `expression` is the list of problems.
    with open(AUDIT, "rb") as handle:
        encoded = base64.b64encode(handle.read()).decode()
    host.check_output("echo %s | base64 -d > /root/runbook_audit.py" % encoded)
    script = (
        "import sys; sys.path.insert(0, '/root'); from runbook_audit import audit_tree, format_report; "
        "p = %s; print(format_report(p)); sys.exit(1 if p else 0)" % expression
    )
    run = host.run("python3 -c %s" % shlex.quote(script))
    assert run.rc == 0, run.stdout + run.stderr


# .data/ owned by the app user; the app root (root-owned releases) for modes only; every file in the
# backup directory root-owned and 0600 or stricter (backup_dirs: sets, sidecars, anything else).
AUDIT_APP = (
    "audit_tree('%s', app_user='gateway', app_group='gateway') + audit_tree('/srv/gateway') "
    "+ audit_tree('%s', app_user='root', backup_dirs=['%s'])" % (DATA, BACKUPS, BACKUPS)
)


def _assert_sets_private(host, name, at_least):
    sets = _sets(host)
    assert len(sets) >= at_least, (name, sets)
    for item in sets:
        for path in ("%s/%s" % (BACKUPS, item), "%s/%s.sha256" % (BACKUPS, item)):
            f = host.file(path)
            assert f.exists and f.user == "root" and f.mode == 0o600, (name, path, oct(f.mode), f.user)


def test_01_deployed_release_1_is_healthy_everywhere():
    for name in ("runbook-app1", "runbook-app2", "runbook-app3"):
        host = _host(name)
        assert host.service("gateway.service").is_running, name
        assert _get(host, "/healthz")["version"] == 1, name
        assert host.file("/srv/gateway/.data/.env").mode == 0o600, name
        assert host.file("/etc/systemd/system/runbook-backup-gateway.timer").exists, name


def test_01b_permissions_audit_after_deploy():
    _audit(_host("runbook-app2"), AUDIT_APP)


def test_02_write_data_through_the_app():
    app1 = _host("runbook-app1")
    for n in range(5):
        _post(app1, "row-%d" % n)
    assert _get(app1, "/stats")["items"] == 5


def test_03_backup_with_off_host_copy():
    rc, out = _playbook("backup", "-e", "sqlite_app_hosts=runbook-app1")
    assert rc == 0, out[-3000:]
    store = _host("runbook-store")
    sets = _sets(store)
    assert sets, "no set reached the store host"
    assert store.run("cd %s && sha256sum --check --strict %s.sha256" % (BACKUPS, sets[-1])).rc == 0
    STATE["offhost_first"] = sets[-1]


def test_04_upgrade_to_2_migrates_and_keeps_the_data():
    before = _bodies(_host("runbook-app1"))
    rc, out = _playbook("upgrade", "-e", "sqlite_app_hosts=app_hosts", "-e", "app_version=2",
                        "-e", "app_archive_src=%s/sample-app-2.tar.gz" % DIST)
    assert rc == 0, out[-3000:]
    for name in ("runbook-app1", "runbook-app2", "runbook-app3"):
        host = _host(name)
        assert _get(host, "/healthz")["version"] == 2, name
        assert _get(host, "/stats")["schema"] == 2, name
    app1 = _host("runbook-app1")
    assert _bodies(app1) == before
    STATE["pre_upgrade_sets"] = _sets(app1, "pre-upgrade")
    assert STATE["pre_upgrade_sets"], "no pre-upgrade set was written"
    _post(app1, "row-after-v2")
    STATE["bodies_before_v3"] = _bodies(app1)
    STATE["items_before_v3"] = _items(app1)


def test_05_broken_upgrade_rolls_back_code_and_data_and_stops_the_rollout():
    rc, out = _playbook("upgrade", "-e", "sqlite_app_hosts=app_hosts", "-e", "app_version=3",
                        "-e", "app_archive_src=%s/sample-app-3.tar.gz" % DIST)
    assert rc != 0, "the upgrade to the broken release 3 must fail"
    # the report of a completed rollback (a task name also says "rolled back")
    assert "to 3 FAILED and was rolled back" in _flat(out), out[-3000:]
    app1 = _host("runbook-app1")
    # Code back on 2, data back to the pre-upgrade set: schema 2 and every row as it was (release 3's
    # migration rewrote them and set user_version 3; release 2 alone would serve those).
    _assert_healthy_on_2(app1, "runbook-app1")
    assert _items(app1) == STATE["items_before_v3"]
    # The attempt wrote its own pre-upgrade set and restored from it (the report names it).
    new_sets = [s for s in _sets(app1, "pre-upgrade") if s not in STATE["pre_upgrade_sets"]]
    assert len(new_sets) == 1, new_sets
    assert "restored from %s/%s" % (BACKUPS, new_sets[0]) in _flat(out), out[-3000:]
    # The replaced database was kept as a safety copy, and it holds what release 3 did to the data:
    # so the restore above is what brought the rows back.
    copies = app1.check_output("ls %s | grep -E '^app[.]db[.]pre-restore-[0-9]{8}T[0-9]{6}Z$' || true" % DATA).split()
    assert len(copies) == 1, copies
    safety = "%s/%s" % (DATA, copies[0])
    assert safety in _flat(out), "the rollback report does not name the safety copy"
    # Read on a copy in /tmp: opening the safety copy in place would add root-owned -shm/-wal to .data/.
    probe = (
        "d=$(mktemp -d) && cp %(s)s $d/a.db && { [ ! -e %(s)s-wal ] || cp %(s)s-wal $d/a.db-wal; } && "
        "python3 -c %(py)s $d/a.db; rc=$?; rm -rf $d; exit $rc"
    ) % {"s": shlex.quote(safety), "py": shlex.quote(READ_DB)}
    user_version, bodies = json.loads(app1.check_output(probe))
    assert user_version == 3
    assert bodies == sorted(body.upper() for body in STATE["bodies_before_v3"])
    # serial 1: the first host failed, the others were never touched and stay healthy on 2.
    for name in ("runbook-app2", "runbook-app3"):
        host = _host(name)
        _assert_healthy_on_2(host, name)
        assert not host.file("/srv/gateway/releases/3").exists, name


def test_05b_permissions_audit_after_backups_and_rollback():
    # runbook-app1 now holds backup sets (plain and pre-upgrade) and the rollback's safety copies.
    app1 = _host("runbook-app1")
    _assert_sets_private(app1, "runbook-app1", at_least=3)
    _audit(app1, AUDIT_APP)


def _secrets_of(host):
    """KEY -> value of every assignment in the app's .env."""
    found = {}
    for raw in host.check_output("cat %s/.env" % DATA).splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        key = key[len("export "):].strip() if key.startswith("export ") else key
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key] = value
    return found


def test_06_fresh_backup_goes_off_host_then_the_host_is_lost():
    STATE["secrets"] = {"runbook-app1": _secrets_of(_host("runbook-app1"))}
    rc, out = _playbook("backup", "-e", "sqlite_app_hosts=runbook-app1")
    assert rc == 0, out[-3000:]
    STATE["offhost_last"] = _sets(_host("runbook-store"))[-1]
    assert STATE["offhost_last"] != STATE["offhost_first"]
    subprocess.run(["docker", "rm", "-f", "runbook-app1"], check=True, capture_output=True)


def test_07a_fresh_host_chooses_the_set_before_a_given_time_on_the_source_host():
    # sqlite_app_dr_before between the two off-host sets: the older one must be chosen and fetched.
    # Limited to the store host, only the source play runs (the recovery play matches no host).
    first, last = STATE["offhost_first"], STATE["offhost_last"]
    before = _set_time(first) + datetime.timedelta(seconds=1)
    assert before < _set_time(last), (first, last)
    stage = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "dr-stage-before")
    shutil.rmtree(stage, ignore_errors=True)
    rc, out = _playbook("disaster_recovery", "--limit", "runbook-store", "-e", "sqlite_app_hosts=fresh",
                        "-e", "sqlite_app_dr_mode=fresh_host", "-e", "sqlite_app_dr_source_host=runbook-store",
                        "-e", "sqlite_app_dr_before=%s" % before.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "-e", "sqlite_app_dr_stage=%s" % stage)
    assert rc == 0, out[-4000:]
    assert "chose %s in %s on runbook-store" % (first, BACKUPS) in _flat(out), out[-4000:]
    assert sorted(os.listdir(stage)) == [first, first + ".sha256"]


def test_07_disaster_recovery_onto_a_fresh_host():
    rc, out = _playbook("disaster_recovery", "-e", "sqlite_app_hosts=fresh", "-e", "sqlite_app_dr_mode=fresh_host",
                        "-e", "sqlite_app_dr_source_host=runbook-store", "-e", "app_version=2",
                        "-e", "app_archive_src=%s/sample-app-2.tar.gz" % DIST)
    assert rc == 0, out[-4000:]
    assert "chose %s in %s on runbook-store" % (STATE["offhost_last"], BACKUPS) in _flat(out), out[-4000:]
    fresh = _host("runbook-fresh")
    assert _get(fresh, "/healthz")["version"] == 2
    assert _bodies(fresh) == STATE["bodies_before_v3"]


def test_08_restore_drill_touches_nothing_live():
    fresh = _host("runbook-fresh")
    db_before = fresh.check_output("sha256sum /srv/gateway/.data/app.db")
    rc, out = _playbook("disaster_recovery", "-e", "sqlite_app_hosts=fresh", "-e", "sqlite_app_dr_mode=drill")
    assert rc == 0, out[-3000:]
    assert '"items": %d' % len(STATE["bodies_before_v3"]) in out
    assert fresh.check_output("sha256sum /srv/gateway/.data/app.db") == db_before


def test_08b_permissions_audit_of_the_recovered_host():
    fresh = _host("runbook-fresh")
    _assert_sets_private(fresh, "runbook-fresh", at_least=1)
    _audit(fresh, AUDIT_APP)


def _forms(value):
    """The value as written and the other encodings it could leak in (base64 of the text; for a hex
    or base64 value, the other encoding of its bytes)."""
    forms = {value, base64.b64encode(value.encode()).decode()}
    raw = []
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", value):
        raw.append(bytes.fromhex(value))
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw.append(decode(value + "=" * (-len(value) % 4)))
        except (binascii.Error, ValueError):
            pass
    for data in raw:
        forms |= {data.hex(), base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()}
    forms |= {form.rstrip("=") for form in forms}
    return {form for form in forms if len(form) >= 16}


def test_99_no_secret_in_any_playbook_output():
    # upgrade and disaster recovery need systemd: this scenario is the only place their -vvv --diff
    # output can be searched. app1 is gone (its .env was read before); fresh has its restored .env.
    secrets = dict(STATE["secrets"])
    for name in ("runbook-app2", "runbook-app3", "runbook-fresh"):
        secrets[name] = _secrets_of(_host(name))
    for name, values in secrets.items():
        assert {"HMAC_SECRET", "AUTH_SECRET"} <= set(values), (name, sorted(values))
    assert len(OUTPUTS) >= 7, [cmd for cmd, _out in OUTPUTS]
    for cmd, out in OUTPUTS:
        assert "ansible-playbook [core" in out, cmd  # -vvv took effect
    leaks = []
    for name, values in secrets.items():
        for key, value in values.items():
            for form in _forms(value):
                for cmd, out in OUTPUTS:
                    if form in out:
                        leaks.append("%s %s (as %s...) in the output of %s" % (name, key, form[:4], cmd))
    assert not leaks, "\n".join(leaks)


@pytest.fixture(autouse=True, scope="module")
def _collection_path():
    # The playbooks run by FQCN from the collection tree the harness built.
    assert os.environ.get("ANSIBLE_COLLECTIONS_PATH"), "run through tools/molecule-scenario.sh"
