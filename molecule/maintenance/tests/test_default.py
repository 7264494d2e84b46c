"""Verify the maintenance role on a real systemd container (testinfra)."""

import time

from prometheus_client.parser import text_string_to_metric_families

UNIT = "runbook-maintenance-app"
DB = "/srv/app/.data/db.sqlite"
METRICS = "/var/lib/node_exporter/textfile_collector/runbook_maintenance_app.prom"
COUNT_EVENTS = "SELECT count(*) FROM events"
COUNT_OLD_EVENTS = "SELECT count(*) FROM events WHERE created_at < datetime('now', '-30 days')"


def pragma(host, name):
    return int(host.check_output("sqlite3 %s %s", DB, "PRAGMA %s;" % name).strip())


def test_timer_enabled_active_and_persistent(host):
    timer = host.service(UNIT + ".timer")
    assert timer.is_enabled
    assert timer.is_running
    props = host.check_output("systemctl show %s.timer -p Persistent -p TimersCalendar" % UNIT)
    assert "Persistent=yes" in props
    assert "OnCalendar=Mon *-*-* 00:00:00" in props  # systemd's normal form of "weekly"


def test_operator_sql_is_private(host):
    sql = host.file("/etc/runbook-sqlite-app/maintenance-app.sql")
    assert (sql.user, sql.mode) == ("root", 0o600)
    assert sql.content_string.splitlines()[1:3] == [
        "BEGIN IMMEDIATE;", "DELETE FROM events WHERE created_at < datetime('now', '-30 days');"]


def test_service_run_shrinks_prunes_and_reports(host):
    pages, free = pragma(host, "page_count"), pragma(host, "freelist_count")
    assert free > pages / 2, (pages, free)  # prepare left a big freelist
    assert host.file("/srv/app/.data/runs/old-run").exists
    host.run_expect([0], "systemctl start %s.service" % UNIT)

    # VACUUM gave the free pages back.
    pages_after, free_after = pragma(host, "page_count"), pragma(host, "freelist_count")
    assert free_after == 0
    assert pages_after < pages / 2, (pages, pages_after)
    assert host.check_output("sqlite3 %s 'PRAGMA integrity_check;'" % DB).strip() == "ok"

    # The operator SQL deleted the old rows and kept the new ones.
    assert host.check_output("sqlite3 %s %s", DB, COUNT_OLD_EVENTS).strip() == "0"
    assert host.check_output("sqlite3 %s %s", DB, COUNT_EVENTS).strip() == "50"

    # Retention: old entries gone, new ones and non-matching ones kept.
    assert not host.file("/srv/app/.data/runs/old-run").exists
    assert host.file("/srv/app/.data/runs/new-run/claude.log").exists
    assert not host.file("/srv/app/.data/artifacts/old.bin").exists
    assert host.file("/srv/app/.data/artifacts/new.bin").exists
    assert host.file("/srv/app/.data/artifacts/old.keep").exists

    # Metrics parse and report success for the database.
    families = {f.name: f for f in text_string_to_metric_families(host.file(METRICS).content_string)}
    success = families["runbook_sqlite_maintenance_success"].samples
    assert [(s.labels["db"], s.value) for s in success] == [(DB, 1.0)]
    assert families["runbook_sqlite_maintenance_last_run_timestamp_seconds"].samples[0].value > time.time() - 3600
    assert families["runbook_sqlite_maintenance_bytes_reclaimed"].samples[0].value > 0


def test_failing_sql_rolls_back_and_fails_the_run(host):
    dropin = "/etc/systemd/system/%s.service.d" % UNIT
    bad = "/etc/runbook-sqlite-app/bad.sql"
    host.run_expect([0], "printf 'BEGIN IMMEDIATE;\\nDELETE FROM events;\\nSELECT nope FROM missing;\\nCOMMIT;\\n' > %s"
                    % bad)
    host.run_expect([0], "mkdir -p %s && printf '[Service]\\nExecStartPre=\\nExecStartPre=/usr/bin/sqlite3 -bail %s "
                         "\".read %s\"\\n' > %s/bad.conf && systemctl daemon-reload" % (dropin, DB, bad, dropin))
    try:
        assert host.run("systemctl start %s.service" % UNIT).rc != 0
        assert host.check_output("sqlite3 %s %s", DB, COUNT_EVENTS).strip() == "50"
    finally:
        host.run_expect([0], "rm -rf %s %s && systemctl daemon-reload && systemctl reset-failed %s.service"
                        % (dropin, bad, UNIT))
