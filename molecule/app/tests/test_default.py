"""Verify the app role on a real systemd container (testinfra): sample app release 1 deployed."""

import json


def test_service_active_and_enabled(host):
    svc = host.service("sample.service")
    assert svc.is_running
    assert svc.is_enabled


def test_healthz_reports_release_1(host):
    out = host.check_output("curl -s http://127.0.0.1:8080/healthz")
    assert json.loads(out) == {"status": "ok", "version": 1}


def test_readyz_ready(host):
    out = host.check_output("curl -s -w '\\n%{http_code}' http://127.0.0.1:8080/readyz")
    body, code = out.rsplit("\n", 1)
    assert code == "200", body
    assert json.loads(body)["schema"] == 1


def test_runs_as_app_user_with_hardening(host):
    unit = host.file("/etc/systemd/system/sample.service")
    assert (unit.user, unit.group, unit.mode) == ("root", "root", 0o644)
    text = unit.content_string
    for line in (
        "User=sample",
        "Group=sample",
        "EnvironmentFile=/srv/sample/.data/.env",
        'Environment="SAMPLE_APP_DB=/srv/sample/.data/sample.sqlite"',
        "WorkingDirectory=/srv/sample",
        "ExecStart=/usr/bin/python3 /srv/sample/current/sample_app.py serve",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "ReadWritePaths=/srv/sample/.data",
    ):
        assert line in text.splitlines(), line
    pid = host.check_output("systemctl show -p MainPID --value sample.service")
    assert host.check_output("ps -o user= -p %s" % pid).strip() == "sample"


def test_release_layout(host):
    current = host.file("/srv/sample/current")
    assert current.is_symlink
    assert current.linked_to == "/srv/sample/releases/1"
    # a first deploy has nothing to record as previous
    assert not host.file("/srv/sample/previous").exists
    rel = host.file("/srv/sample/releases/1")
    assert (rel.user, rel.group, rel.mode) == ("root", "sample", 0o750)
    assert host.file("/srv/sample/releases/1/VERSION").content_string == "1\n"
    assert host.file("/srv/sample/releases/1/.runbook-release").content_string == "1\n"


def test_database_belongs_to_the_app(host):
    # app_environment remaps the database; the migration on deploy created it as the app user
    db = host.file("/srv/sample/.data/sample.sqlite")
    assert db.user == "sample"
    assert db.mode == 0o600
    assert host.check_output("sqlite3 /srv/sample/.data/sample.sqlite 'PRAGMA user_version;'") == "1"
    assert not host.file("/srv/sample/.data/app.db").exists


def test_app_cannot_write_its_code(host):
    # ProtectSystem=strict + root-owned release: the service user cannot modify current/
    res = host.run("runuser -u sample -- touch /srv/sample/current/x")
    assert res.rc != 0
