"""Verify the app role on a real systemd container (testinfra): sample app release 1 deployed."""

import json
import shlex
import time


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


def _main_pid(host):
    pid = host.check_output("systemctl show -p MainPID --value sample.service")
    assert pid not in ("", "0"), "sample.service has no main process"
    return pid


def test_sandbox_from_inside_the_units_mount_namespace(host):
    # ProtectSystem=strict, ReadWritePaths= and PrivateTmp= act in the service's own mount
    # namespace: check them from there. nsenter needs CAP_SYS_ADMIN and CAP_SYS_CHROOT, and opening
    # /proc/<pid>/ns/mnt of another user's process needs CAP_SYS_PTRACE, which the lab container
    # lacks; a same-user open passes that check. So: enter as the service user with just those two
    # capabilities, drop them, and run the script like the service runs: user sample, no
    # capabilities, no new privileges, the unit's mount namespace.
    pid = _main_pid(host)

    def inside(script):
        return host.run(
            "setpriv --reuid=sample --regid=sample --init-groups --inh-caps=+sys_admin,+sys_chroot"
            " --ambient-caps=+sys_admin,+sys_chroot -- nsenter -t %s -m --"
            " setpriv --inh-caps=-all --ambient-caps=-all --no-new-privs -- /bin/sh -c %s" % (pid, shlex.quote(script))
        )

    res = inside("readlink /proc/self/ns/mnt && grep ^CapEff: /proc/self/status && id -un")
    assert res.rc == 0, res.stderr
    ns, caps, user = res.stdout.split("\n")[:3]
    assert ns != host.check_output("readlink /proc/self/ns/mnt")
    assert (caps.split(), user) == (["CapEff:", "0000000000000000"], "sample")
    # EROFS, not EACCES: the mount is read-only (outside the sandbox the same write is a
    # "Permission denied" for the user and allowed for root)
    for path in ("/srv/sample/current/x", "/srv/sample/releases/1/x", "/usr/x", "/etc/x", "/var/lib/x"):
        res = inside("touch %s" % path)
        assert res.rc != 0 and "Read-only file system" in res.stderr, (path, res.rc, res.stderr)
        assert not host.file(path).exists, path
    res = inside("touch /srv/sample/.data/.sandbox-probe && rm /srv/sample/.data/.sandbox-probe")
    assert res.rc == 0, res.stderr
    # PrivateTmp=yes: the service's /tmp is its own
    res = inside("echo probe > /tmp/sandbox-probe && cat /tmp/sandbox-probe")
    assert (res.rc, res.stdout) == (0, "probe\n"), res.stderr
    assert not host.file("/tmp/sandbox-probe").exists


def test_restarts_after_a_crash(host):
    # Restart=on-failure, RestartSec=2: a SIGKILLed main process is replaced within seconds.
    def show(prop):
        return host.check_output("systemctl show -p %s --value sample.service" % prop)

    old_pid = _main_pid(host)
    restarts = int(show("NRestarts"))
    host.check_output("kill -9 %s" % old_pid)
    deadline = time.monotonic() + 10
    while True:
        pid = show("MainPID")
        if pid not in ("0", old_pid) and show("ActiveState") == "active":
            res = host.run("curl -sf http://127.0.0.1:8080/healthz")
            if res.rc == 0:
                break
        assert time.monotonic() < deadline, "no healthy new process 10 s after kill -9 %s (MainPID %s)" % (old_pid, pid)
        time.sleep(0.5)
    assert json.loads(res.stdout) == {"status": "ok", "version": 1}
    assert int(show("NRestarts")) == restarts + 1
    assert host.check_output("ps -o user= -p %s" % pid).strip() == "sample"
