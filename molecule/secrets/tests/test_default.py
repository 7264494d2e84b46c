"""Verify the secrets role on a real systemd container (testinfra)."""

import base64
import os
import re

ENV = "/srv/gateway/.data/.env"
LOG = os.path.join(os.path.dirname(__file__), "..", "..", "..", "build", "molecule-secrets.log")


def env_values(host):
    values = {}
    for line in host.file(ENV).content_string.splitlines():
        m = re.match(r"^(?:export )?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def test_env_file_is_private_to_the_app(host):
    env = host.file(ENV)
    assert (env.user, env.group, env.mode) == ("gateway", "gateway", 0o600)


def test_hand_made_lines_are_kept_byte_for_byte(host):
    orig = host.file("/root/env.orig").content
    now = host.file(ENV).content
    assert now.startswith(orig)
    assert b'export DATABASE_PATH="/srv/gateway/.data/db.sqlite"   # keep quoted\n' in now
    assert b"LOG_LEVEL = info\n" in now


def test_generated_values(host):
    values = env_values(host)
    assert re.fullmatch(r"[0-9a-f]{64}", values["HMAC_SECRET"])
    assert len(base64.b64decode(values["AUTH_SECRET"], validate=True)) == 32
    assert values["HMAC_SECRET"] != values["AUTH_SECRET"]
    # the rotation record the module keeps directly above each key
    text = host.file(ENV).content_string
    for name in ("HMAC_SECRET", "AUTH_SECRET"):
        assert re.search(r"^# runbook\.sqlite_app: %s rotated_at=\S+ fingerprint=[0-9a-f]{12}\n%s=" % (name, name),
                         text, re.M), name


def test_later_runs_did_not_change_the_values(host):
    # /root/env.first is the file as the first converge left it; idempotence and check ran since.
    assert host.file("/root/env.first").content == host.file(ENV).content


def test_app_restarted_once(host):
    # started in prepare, restarted by the first converge only
    starts = host.file("/run/gateway-starts").content_string.splitlines()
    assert len(starts) == 2


def test_no_secret_value_in_the_molecule_log(host):
    values = env_values(host)
    with open(LOG, encoding="utf-8", errors="replace") as fh:
        log = fh.read()
    assert "PLAY RECAP" in log  # the converge output is there
    for name in ("HMAC_SECRET", "AUTH_SECRET"):
        value = values[name]
        assert len(value) >= 40
        assert value not in log, name
        assert value[:16] not in log, name
