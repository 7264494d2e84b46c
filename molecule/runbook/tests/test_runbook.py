"""End-to-end runbook on real systemd containers, driven by the collection's own playbooks.

Runs after converge (deploy of release 1 on runbook-app1..3, idempotent, check mode clean):
write data over loopback -> backup with an off-host copy -> upgrade to 2 (schema migration) ->
data still there -> upgrade to the broken 3: automatic rollback of code and data on the first host,
the rollout stops there -> destroy runbook-app1 -> disaster_recovery onto runbook-fresh from the
off-host copy on runbook-store -> same data, healthy. The steps share state and run in order.
"""

import base64
import json
import os
import shlex
import subprocess

import pytest
import testinfra

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
DIST = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "dist")
BACKUPS = "/var/backups/gateway"
STATE = {}


def _host(name):
    return testinfra.get_host("ansible://%s?ansible_inventory=%s" % (name, INVENTORY))


def _playbook(name, *extra):
    cmd = ["ansible-playbook", "-i", INVENTORY, "runbook.sqlite_app." + name, *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    return run.returncode, run.stdout + run.stderr


def _get(host, path):
    out = host.check_output("curl -sf http://127.0.0.1:8080%s" % path)
    return json.loads(out)


def _post(host, body):
    host.check_output("curl -sf -X POST -H 'Content-Type: application/json' -d %s http://127.0.0.1:8080/items"
                      % json.dumps(json.dumps({"body": body})))


def _bodies(host):
    return sorted(item["body"] for item in _get(host, "/items"))


def test_01_deployed_release_1_is_healthy_everywhere():
    for name in ("runbook-app1", "runbook-app2", "runbook-app3"):
        host = _host(name)
        assert host.service("gateway.service").is_running, name
        assert _get(host, "/healthz")["version"] == 1, name
        assert host.file("/srv/gateway/.data/.env").mode == 0o600, name
        assert host.file("/etc/systemd/system/runbook-backup-gateway.timer").exists, name


AUDIT = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tests", "reliability", "audit.py")


def test_01b_permissions_audit_after_deploy():
    # The reliability suite's audit, run inside the container on what deploy made: .data/ owned by the
    # app user; the app root (root-owned releases) for modes only; the backup directory root-owned.
    host = _host("runbook-app2")
    with open(AUDIT, "rb") as handle:
        encoded = base64.b64encode(handle.read()).decode()
    host.check_output("echo %s | base64 -d > /root/runbook_audit.py" % encoded)
    script = (
        "import sys; sys.path.insert(0, '/root'); from runbook_audit import audit_tree, format_report; "
        "p = audit_tree('/srv/gateway/.data', app_user='gateway', app_group='gateway') "
        "+ audit_tree('/srv/gateway') + audit_tree('/var/backups/gateway', app_user='root'); "
        "print(format_report(p)); sys.exit(1 if p else 0)"
    )
    run = host.run("python3 -c %s" % shlex.quote(script))
    assert run.rc == 0, run.stdout + run.stderr


def test_02_write_data_through_the_app():
    app1 = _host("runbook-app1")
    for n in range(5):
        _post(app1, "row-%d" % n)
    assert _get(app1, "/stats")["items"] == 5


def test_03_backup_with_off_host_copy():
    rc, out = _playbook("backup", "-e", "sqlite_app_hosts=runbook-app1")
    assert rc == 0, out[-3000:]
    store = _host("runbook-store")
    sets = store.check_output("ls %s | grep -v sha256 || true" % BACKUPS).split()
    assert sets, "no set reached the store host"
    assert store.run("cd %s && sha256sum --check --strict %s.sha256" % (BACKUPS, sets[-1])).rc == 0


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
    pre = app1.check_output("ls %s | grep pre-upgrade | grep -v sha256 || true" % BACKUPS)
    assert pre, "no pre-upgrade set was written"
    _post(app1, "row-after-v2")
    STATE["bodies_before_v3"] = _bodies(app1)


def test_05_broken_upgrade_rolls_back_code_and_data_and_stops_the_rollout():
    rc, out = _playbook("upgrade", "-e", "sqlite_app_hosts=app_hosts", "-e", "app_version=3",
                        "-e", "app_archive_src=%s/sample-app-3.tar.gz" % DIST)
    assert rc != 0, "the upgrade to the broken release 3 must fail"
    assert "rolled back" in out, out[-3000:]
    app1 = _host("runbook-app1")
    assert _get(app1, "/healthz")["version"] == 2
    assert _bodies(app1) == STATE["bodies_before_v3"]
    # serial 1: the first host failed, the others were never touched and stay healthy on 2.
    for name in ("runbook-app2", "runbook-app3"):
        host = _host(name)
        assert _get(host, "/healthz")["version"] == 2, name
        assert host.file("/srv/gateway/current").linked_to.endswith("/2"), name


def test_06_fresh_backup_goes_off_host_then_the_host_is_lost():
    rc, out = _playbook("backup", "-e", "sqlite_app_hosts=runbook-app1")
    assert rc == 0, out[-3000:]
    subprocess.run(["docker", "rm", "-f", "runbook-app1"], check=True, capture_output=True)


def test_07_disaster_recovery_onto_a_fresh_host():
    rc, out = _playbook("disaster_recovery", "-e", "sqlite_app_hosts=fresh", "-e", "sqlite_app_dr_mode=fresh_host",
                        "-e", "sqlite_app_dr_source_host=runbook-store", "-e", "app_version=2",
                        "-e", "app_archive_src=%s/sample-app-2.tar.gz" % DIST)
    assert rc == 0, out[-4000:]
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


@pytest.fixture(autouse=True, scope="module")
def _collection_path():
    # The playbooks run by FQCN from the collection tree the harness built.
    assert os.environ.get("ANSIBLE_COLLECTIONS_PATH"), "run through tools/molecule-scenario.sh"
