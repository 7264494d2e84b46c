"""Verify the backup role on a real systemd container (testinfra).

The tests run in file order and build on each other: the service is started by hand, run twice at
once, made to fail, and finally left to its timer.
"""

import json
import time

from prometheus_client.parser import text_string_to_metric_families

NAME = "sample"
UNIT = "runbook-backup-" + NAME
DEST = "/var/backups/" + NAME
OFFHOST = "/mnt/offhost/" + NAME
CONFIG = "/etc/runbook-sqlite-app/backup-%s.json" % NAME
WRAPPER = "/usr/local/sbin/runbook-sqlite-backup"
METRICS = "/var/lib/node_exporter/textfile_collector/runbook_backup_%s.prom" % NAME
DB = "/srv/app/.data/app.sqlite"


def sets(host, directory=DEST):
    out = host.check_output("find %s -maxdepth 1 -name '%s-*.tar*' ! -name '*.sha256' -printf '%%f\\n'"
                            % (directory, NAME))
    return sorted(line for line in out.splitlines() if line)


def manifest(host, path):
    reader = {"zst": "zstd -dc", "gz": "gunzip -c", "tar": "cat"}[path.rsplit(".", 1)[-1]]
    return json.loads(host.check_output("%s %s | tar -xOf - manifest.json" % (reader, path)))


def test_timer_enabled_active_and_persistent(host):
    timer = host.service(UNIT + ".timer")
    assert timer.is_enabled
    assert timer.is_running
    props = host.check_output("systemctl show %s.timer -p Persistent -p RandomizedDelayUSec -p TimersCalendar" % UNIT)
    assert "Persistent=yes" in props
    assert "RandomizedDelayUSec=30min" in props
    assert "OnCalendar=*-*-* 00:00:00" in props  # systemd's normal form of "daily"


def test_job_config_is_private_json_with_module_options(host):
    config = host.file(CONFIG)
    assert (config.user, config.group, config.mode) == ("root", "root", 0o600)
    data = json.loads(config.content_string)
    assert data["databases"] == [DB]
    assert data["dest"] == DEST
    assert data["name_prefix"] == NAME
    assert data["keep_last"] == 20 and isinstance(data["keep_last"], int)
    assert data["root"] == "/srv/app/.data"


def test_manual_start_writes_a_verified_set(host):
    before = sets(host)
    host.run_expect([0], "systemctl start %s.service" % UNIT)
    after = sets(host)
    new = sorted(set(after) - set(before))
    assert len(new) == 1, (before, after)
    path = DEST + "/" + new[0]
    assert new[0].endswith(".tar.zst")
    for f in (host.file(path), host.file(path + ".sha256")):
        assert (f.user, f.mode) == ("root", 0o600)
    data = manifest(host, path)
    dbs = [d for d in data["databases"] if d["path"] == DB]
    assert dbs and dbs[0]["check"]["ok"] is True, data["databases"]
    assert dbs[0]["journal_mode"] == "wal"
    assert any(m["member"] == "files/.env" for m in data["members"]), data["members"]
    host.run_expect([0], "cd %s && sha256sum --check --strict %s.sha256" % (DEST, new[0]))
    # The snapshot holds the rows.
    work = host.check_output("mktemp -d")
    host.run_expect([0], "zstd -dc %s | tar -xf - -C %s" % (path, work))
    rows = host.check_output("sqlite3 %s %s", work + "/databases/app.sqlite", "SELECT count(*) FROM runs")
    host.run_expect([0], "rm -rf %s" % work)
    assert rows.strip() == "500"


def test_offhost_path_has_a_verified_copy_of_the_newest_set(host):
    newest = sets(host)[-1]
    copies = sets(host, OFFHOST)
    assert newest in copies, (newest, copies)
    host.run_expect([0], "cd %s && sha256sum --check --strict %s.sha256" % (OFFHOST, newest))
    assert host.file(OFFHOST + "/" + newest).mode == 0o600


def test_offhost_host_copy_from_the_play(host):
    # Converge copied the newest set that existed then (the one prepare wrote with the module).
    copies = host.check_output("ls /srv/offhost-host/%s" % NAME).split()
    assert any(name.endswith("-prepare.tar.zst") for name in copies), copies
    set_name = [name for name in copies if name.endswith(".tar.zst")][0]
    host.run_expect([0], "cd /srv/offhost-host/%s && sha256sum --check --strict %s.sha256" % (NAME, set_name))


def test_metrics_parse_and_report_success(host):
    text = host.file(METRICS).content_string
    families = {f.name: f for f in text_string_to_metric_families(text)}
    success = families["runbook_sqlite_backup_last_success_timestamp_seconds"].samples
    assert success and success[0].value > time.time() - 3600
    assert families["runbook_sqlite_backup_verified"].samples[0].value == 1
    assert families["runbook_sqlite_backup_size_bytes"].samples[0].value > 0


def test_two_runs_at_once_both_succeed_one_waits(host):
    before = sets(host)
    out = host.check_output(
        "(%(w)s backup --config %(c)s >/tmp/b1.out 2>&1; echo rc1=$?) & "
        "(%(w)s backup --config %(c)s >/tmp/b2.out 2>&1; echo rc2=$?) & wait" % {"w": WRAPPER, "c": CONFIG})
    assert "rc1=0" in out and "rc2=0" in out, out
    new = sorted(set(sets(host)) - set(before))
    assert len(new) == 2, new
    for name in new:
        host.run_expect([0], "cd %s && sha256sum --check --strict %s.sha256" % (DEST, name))
        assert manifest(host, DEST + "/" + name)["databases"][0]["check"]["ok"] is True


def test_lock_held_makes_a_run_wait(host):
    # flock(1) takes the same flock(2) lock the engine takes on DEST/.runbook-backup.lock.
    out = host.check_output(
        "flock %s/.runbook-backup.lock sleep 4 & sleep 0.5; s=$(date +%%s); %s backup --config %s >/dev/null; "
        "echo rc=$? waited=$(( $(date +%%s) - s )); wait" % (DEST, WRAPPER, CONFIG))
    fields = dict(item.split("=") for item in out.split())
    assert fields["rc"] == "0", out
    assert int(fields["waited"]) >= 3, out


def test_lock_busy_past_timeout_exits_75_with_a_clear_message(host):
    host.run_expect([0], "python3 -c 'import json,sys; c=json.load(open(\"%s\")); c[\"lock_timeout\"]=1; "
                         "json.dump(c, open(\"/tmp/busy.json\", \"w\"))'" % CONFIG)
    result = host.run("flock %s/.runbook-backup.lock sleep 5 & sleep 0.5; %s backup --config /tmp/busy.json; "
                      "rc=$?; wait; exit $rc" % (DEST, WRAPPER))
    assert result.rc == 75, (result.rc, result.stderr)
    assert "holds the lock" in result.stderr


def test_failure_runs_the_on_failure_unit(host):
    dropin = "/etc/systemd/system/%s.service.d" % UNIT
    host.run_expect([0], "mkdir -p %s && printf '[Service]\\nExecStartPre=/bin/false\\n' > %s/fail.conf "
                         "&& systemctl daemon-reload" % (dropin, dropin))
    try:
        assert host.run("systemctl start %s.service" % UNIT).rc != 0
        for _attempt in range(20):
            if host.file("/var/log/runbook-backup-failures.log").exists:
                break
            time.sleep(0.5)
        assert (UNIT + ".service failed") in host.file("/var/log/runbook-backup-failures.log").content_string
    finally:
        host.run_expect([0], "rm -rf %s && systemctl daemon-reload && systemctl reset-failed %s.service"
                        % (dropin, UNIT))


def test_timer_fires_on_its_own(host):
    dropin = "/etc/systemd/system/%s.timer.d" % UNIT
    before = sets(host)
    host.run_expect([0], "mkdir -p %(d)s && printf '[Timer]\\nOnCalendar=\\nOnCalendar=*:*:0/10\\n"
                         "AccuracySec=1s\\nRandomizedDelaySec=0\\n' > %(d)s/fast.conf && systemctl daemon-reload "
                         "&& systemctl restart %(u)s.timer" % {"d": dropin, "u": UNIT})
    try:
        deadline = time.time() + 40
        new = []
        while time.time() < deadline and not new:
            time.sleep(2)
            new = sorted(set(sets(host)) - set(before))
        assert new, "the timer did not start a backup within 40 s"
    finally:
        host.run_expect([0], "rm -rf %(d)s && systemctl daemon-reload && systemctl restart %(u)s.timer"
                        % {"d": dropin, "u": UNIT})
    assert "OnCalendar=*-*-* 00:00:00 ;" in host.check_output("systemctl show %s.timer -p TimersCalendar" % UNIT)
