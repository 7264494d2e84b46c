"""Verify the backup role on a systemd container and on a container without systemd (testinfra).

runbook-backup boots systemd: the timer path. runbook-backup-cron runs `sleep` as PID 1, so the
role's backup_scheduler=auto installs the cron entry there (schedule `* * * * *` from molecule.yml).
The tests run in file order and build on each other: on the systemd host the service is started by
hand, run twice at once, made to fail, and finally left to its timer; on the cron host the job is run
by hand, made to fail, then the cron daemon is started early and checked last, so its wait for the
next minute overlaps the systemd tests.
"""

import json
import os
import re
import shlex
import subprocess
import time

import pytest
import testinfra
from prometheus_client.parser import text_string_to_metric_families

SYSTEMD_HOST = "runbook-backup"
CRON_HOST = "runbook-backup-cron"
# The `host` fixture is the systemd host; the cron host has its own fixture below.
testinfra_hosts = ["ansible://" + SYSTEMD_HOST]

NAME = "sample"
UNIT = "runbook-backup-" + NAME
DEST = "/var/backups/" + NAME
OFFHOST = "/mnt/offhost/" + NAME
CONFIG = "/etc/runbook-sqlite-app/backup-%s.json" % NAME
WRAPPER = "/usr/local/sbin/runbook-sqlite-backup"
METRICS = "/var/lib/node_exporter/textfile_collector/runbook_backup_%s.prom" % NAME
DB = "/srv/app/.data/app.sqlite"
CRON_FILE = "/etc/cron.d/" + UNIT
CRON_SCRIPT = "/etc/runbook-sqlite-app/backup-%s.cron.sh" % NAME
FAILURES = "/var/log/runbook-backup-failures.log"
CONVERGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "converge.yml")
# One cron time field: *, N, N-M, lists of those, each with an optional /step (names are not used here).
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\d+(-\d+)?)(/\d+)?)*$")
CRON_WAIT = 80  # s from the daemon's start: the next minute, plus the run
STATE = {}


@pytest.fixture(scope="module")
def cron_host(host, request):
    # Asks for `host` only so that pytest keeps file order: it groups the tests that use the
    # parametrized host fixture ahead of those that do not.
    del host
    return testinfra.get_host("ansible://" + CRON_HOST, ansible_inventory=request.config.option.ansible_inventory)


def sets(host, directory=DEST):
    out = host.check_output("find %s -maxdepth 1 -name '%s-*.tar*' ! -name '*.sha256' -printf '%%f\\n'"
                            % (directory, NAME))
    return sorted(line for line in out.splitlines() if line)


def manifest(host, path):
    reader = {"zst": "zstd -dc", "gz": "gunzip -c", "tar": "cat"}[path.rsplit(".", 1)[-1]]
    return json.loads(host.check_output("%s %s | tar -xOf - manifest.json" % (reader, path)))


def assert_verified(host, name, directory=DEST):
    """The set passes `sha256sum --check --strict` against its sidecar and its manifest says the
    database check passed; returns the manifest."""
    host.run_expect([0], "cd %s && sha256sum --check --strict %s.sha256" % (directory, name))
    data = manifest(host, directory + "/" + name)
    dbs = [d for d in data["databases"] if d["path"] == DB]
    assert dbs and dbs[0]["check"]["ok"] is True, data["databases"]
    return data


def last_success(host):
    """The metrics file's last-success timestamp, 0 when there is no file yet."""
    if not host.file(METRICS).exists:
        return 0.0
    families = {f.name: f for f in text_string_to_metric_families(host.file(METRICS).content_string)}
    return families["runbook_sqlite_backup_last_success_timestamp_seconds"].samples[0].value


def wait_for_verified_set(host, before, success_before, timeout):
    """Wait until a set that is not in `before` has its sidecar and the metrics file's last-success
    timestamp is past `success_before` (the engine writes the sidecar, then the set, then the
    metrics); return the new names (None on timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(2)
        new = sorted(set(sets(host)) - set(before))
        if new and all(host.file("%s/%s.sha256" % (DEST, n)).exists for n in new) \
                and last_success(host) > success_before:
            return new
    return None


def cron_job(host):
    """The cron entry's environment lines and its one job line, split into schedule, user, command."""
    env, jobs = {}, []
    for raw in host.file(CRON_FILE).content_string.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            key, value = line.split("=", 1)
            env[key] = value
        else:
            jobs.append(line.split(None, 6))
    assert len(jobs) == 1, jobs
    assert len(jobs[0]) == 7, jobs[0]
    return env, jobs[0][:5], jobs[0][5], jobs[0][6]


def run_cron_command(host):
    """Run the entry's command the way cron does: its SHELL, its PATH, no other environment."""
    env, _schedule, user, command = cron_job(host)
    assert user == "root"
    return host.run("env -i PATH=%s %s -c %s" % (shlex.quote(env["PATH"]), env["SHELL"], shlex.quote(command)))


def test_timer_enabled_active_and_persistent(host):
    timer = host.service(UNIT + ".timer")
    assert timer.is_enabled
    assert timer.is_running
    props = host.check_output("systemctl show %s.timer -p Persistent -p RandomizedDelayUSec -p TimersCalendar" % UNIT)
    assert "Persistent=yes" in props
    assert "RandomizedDelayUSec=30min" in props
    assert "OnCalendar=*-*-* 00:00:00" in props  # systemd's normal form of "daily"
    # auto chose systemd here: no cron entry as well
    assert not host.file(CRON_FILE).exists


def test_job_config_is_private_json_with_module_options(host):
    config = host.file(CONFIG)
    assert (config.user, config.group, config.mode) == ("root", "root", 0o600)
    data = json.loads(config.content_string)
    assert data["databases"] == [DB]
    assert data["dest"] == DEST
    assert data["name_prefix"] == NAME
    assert data["keep_last"] == 20 and isinstance(data["keep_last"], int)
    assert data["root"] == "/srv/app/.data"


def test_cron_host_has_a_cron_entry_and_no_timer(cron_host):
    entry = cron_host.file(CRON_FILE)
    assert entry.is_file
    assert (entry.user, entry.group, entry.mode) == ("root", "root", 0o644)
    env, schedule, user, command = cron_job(cron_host)
    assert all(CRON_FIELD.match(field) for field in schedule), schedule
    assert schedule == ["*"] * 5  # backup_cron_schedule from molecule.yml's host_vars
    assert user == "root"
    assert command == CRON_SCRIPT
    assert env["SHELL"] == "/bin/sh" and "/usr/local/sbin" in env["PATH"].split(":")
    script = cron_host.file(CRON_SCRIPT)
    assert (script.user, script.group, script.mode) == ("root", "root", 0o700)
    # auto found no systemd: no units, and the job config the timer would use is there all the same
    assert not cron_host.file("/etc/systemd/system/%s.timer" % UNIT).exists
    assert not cron_host.file("/etc/systemd/system/%s.service" % UNIT).exists
    assert cron_host.file(CONFIG).mode == 0o600


def test_cron_command_by_hand_writes_a_verified_set_and_the_offhost_copy(cron_host):
    before = sets(cron_host)
    success_before = last_success(cron_host)
    result = run_cron_command(cron_host)
    assert result.rc == 0, (result.rc, result.stdout, result.stderr)
    new = sorted(set(sets(cron_host)) - set(before))
    assert len(new) == 1, (before, new)
    assert new[0].endswith(".tar.zst")
    assert_verified(cron_host, new[0])
    assert cron_host.file(DEST + "/" + new[0]).mode == 0o600
    # The job script chains the off-host copy, like the unit's ExecStartPost=.
    assert new[0] in sets(cron_host, OFFHOST)
    assert_verified(cron_host, new[0], OFFHOST)
    assert last_success(cron_host) > success_before


def test_cron_job_failure_runs_the_failure_command(cron_host):
    # A missing destination makes the engine fail before it takes the lock; the script then runs
    # backup_on_failure_command with RUNBOOK_FAILED_UNIT naming the cron job.
    cron_host.run_expect([0], "rm -f %s" % FAILURES)
    cron_host.run_expect([0], "mv %s %s.away" % (DEST, DEST))
    try:
        result = run_cron_command(cron_host)
    finally:
        cron_host.run_expect([0], "mv %s.away %s" % (DEST, DEST))
    assert result.rc != 0, result.stdout
    assert "destination directory does not exist" in result.stderr
    log = cron_host.file(FAILURES)
    assert log.exists, "the failure command did not run"
    assert log.content_string.splitlines() == ["cron:%s failed" % UNIT]


def test_cron_daemon_starts(cron_host):
    # Nothing starts cron in a container without init; the role installs the entry only. The check
    # that cron runs the job is the last test in this file, so its wait overlaps the ones between.
    # Live processes only: `sleep` as PID 1 reaps nothing, so a cron that exited stays a zombie.
    running = "pgrep -x --runstates R,S,D cron"
    assert cron_host.run(running).rc != 0, "cron was already running"
    STATE["cron_before"] = sets(cron_host)
    STATE["cron_success_before"] = last_success(cron_host)
    cron_host.run_expect([0], "cron </dev/null >/dev/null 2>&1")
    STATE["cron_started"] = time.time()
    assert cron_host.run(running).rc == 0


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
    data = assert_verified(host, new[0])
    assert [d for d in data["databases"] if d["path"] == DB][0]["journal_mode"] == "wal"
    assert any(m["member"] == "files/.env" for m in data["members"]), data["members"]
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
    assert_verified(host, newest, OFFHOST)
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
        assert_verified(host, name)


def hold_lock(seconds):
    """Shell that holds the engine's lock for `seconds` in the background and returns once it is
    held: flock(1) takes the same flock(2) lock the engine takes on DEST/.runbook-backup.lock. Waiting
    for the marker, not a fixed sleep, keeps a loaded host from starting the backup first."""
    return ("rm -f /tmp/lock-held; flock %s/.runbook-backup.lock sh -c 'touch /tmp/lock-held; exec sleep %d' & "
            "for _ in $(seq 100); do [ -e /tmp/lock-held ] && break; sleep 0.1; done; [ -e /tmp/lock-held ]"
            % (DEST, seconds))


def test_lock_held_makes_a_run_wait(host):
    out = host.check_output(
        "%s; s=$(date +%%s); %s backup --config %s >/dev/null; echo rc=$? waited=$(( $(date +%%s) - s )); wait"
        % (hold_lock(4), WRAPPER, CONFIG))
    fields = dict(item.split("=") for item in out.split())
    assert fields["rc"] == "0", out
    assert int(fields["waited"]) >= 3, out


def test_lock_busy_past_timeout_exits_75_with_a_clear_message(host):
    host.run_expect([0], "python3 -c 'import json,sys; c=json.load(open(\"%s\")); c[\"lock_timeout\"]=1; "
                         "json.dump(c, open(\"/tmp/busy.json\", \"w\"))'" % CONFIG)
    result = host.run("%s; %s backup --config /tmp/busy.json; rc=$?; wait; exit $rc" % (hold_lock(5), WRAPPER))
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


def _converge_tags(tags, *extra):
    """Run converge.yml's tasks tagged `tags` on the systemd host; returns the output."""
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], CONVERGE, "--limit", SYSTEMD_HOST,
           "--tags", tags, *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return run.stdout


def _converge_schedule(*extra):
    """Run converge.yml's backup_schedule tasks (validation and the timer) on the systemd host."""
    _converge_tags("backup_schedule", *extra)


def test_an_engine_no_longer_shipped_is_removed(host):
    # What an older collection version installed and this one does not ship: check mode reports it,
    # a real run removes it and nothing else, the next run has nothing to do.
    engines = "/usr/local/lib/runbook-sqlite-app/ansible_collections/runbook/sqlite_app/plugins/module_utils"
    retired = engines + "/_retired_engine.py"
    host.run_expect([0], "printf 'RETIRED = 1\\n' > %s && chmod 0644 %s" % (retired, retired))
    shipped = host.check_output("ls %s" % engines)
    out = _converge_tags("backup_tools", "--check")
    assert "_retired_engine.py" in out and host.file(retired).exists, out[-3000:]
    _converge_tags("backup_tools")
    assert not host.file(retired).exists
    assert host.check_output("ls %s" % engines).split() == [n for n in shipped.split() if n != "_retired_engine.py"]
    out = _converge_tags("backup_tools")
    assert re.search(r"runbook-backup\s*:.*changed=0\s", out), out[-3000:]


def test_timer_fires_on_its_own(host):
    # A 10 s calendar through the role's own variables (prepare made the lab's timers accurate to 1 s),
    # then the converge's schedule again.
    before = sets(host)
    success_before = last_success(host)
    _converge_schedule("-e", json.dumps({"backup_on_calendar": "*:*:0/10", "backup_randomized_delay": "0"}))
    try:
        props = host.check_output("systemctl show %s.timer -p TimersCalendar -p AccuracyUSec" % UNIT)
        assert "OnCalendar=*-*-* *:*:00/10" in props and "AccuracyUSec=1s" in props, props
        new = wait_for_verified_set(host, before, success_before, 40)
        assert new, "the timer did not write a complete set (set, sidecar, metrics) within 40 s"
    finally:
        _converge_schedule()
    for name in new:
        assert_verified(host, name)
    props = host.check_output("systemctl show %s.timer -p TimersCalendar -p RandomizedDelayUSec" % UNIT)
    assert "OnCalendar=*-*-* 00:00:00 ;" in props
    assert "RandomizedDelayUSec=30min" in props


def test_cron_runs_the_job_on_its_own(cron_host):
    if "cron_started" not in STATE:  # run alone (-k): start it here
        test_cron_daemon_starts(cron_host)
    timeout = STATE["cron_started"] + CRON_WAIT - time.time()
    new = wait_for_verified_set(cron_host, STATE["cron_before"], STATE["cron_success_before"], max(timeout, 2))
    assert new, "cron did not run the job within %d s of its start" % CRON_WAIT
    for name in new:
        assert_verified(cron_host, name)
