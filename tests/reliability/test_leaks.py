# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Secrets never leak: secret_rotate, cert_install and sqlite_backup (.env as an extra path) through
ansible-playbook -vvv --diff, check and real mode; every generated secret, .env value and private
key line is searched for in all output, the registered results and the backup manifests."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap

import helpers

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv  # noqa: E402

PLAYBOOK = textwrap.dedent("""\
    - hosts: localhost
      gather_facts: false
      vars:
        root: "{{ app_root }}"
      tasks:
        - name: Rotate
          runbook.sqlite_app.secret_rotate:
            path: "{{ root }}/.env"
            secrets:
              - {name: SECRET_KEY}
              - {name: API_TOKEN, value: "{{ supplied_token }}"}
              - {name: DB_PASSWORD, force: true, keep_previous: true}
            backup: true
          register: r_secret
        - name: Self-signed certificate
          runbook.sqlite_app.cert_install:
            source: self_signed
            common_name: "app{{ run_id }}.example"
            dest_dir: "{{ root }}/certs"
            backup: true
          register: r_cert
        - name: Certificate from content
          runbook.sqlite_app.cert_install:
            source: content
            cert_content: "{{ lookup('file', root ~ '/src/cert.pem') }}"
            key_content: "{{ lookup('file', root ~ '/src/key.pem') }}"
            dest_dir: "{{ root }}/certs2"
          register: r_cert2
        - name: Backup with the .env and the keys
          runbook.sqlite_app.sqlite_backup:
            databases: ["{{ root }}/app.db"]
            extra_paths: ["{{ root }}/.env", "{{ root }}/certs"]
            root: "{{ root }}"
            dest: "{{ root }}/backups"
          register: r_backup
        - name: Dump every registered result
          ansible.builtin.copy:
            content: "{{ {'secret': r_secret, 'cert': r_cert, 'cert2': r_cert2, 'backup': r_backup} | to_nice_json }}"
            dest: "{{ root }}/dump-{{ run_id }}.json"
            mode: "0600"
          check_mode: false
    """)


def _make_source_pair(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "content.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=90))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("content.example")]), critical=False)
            .sign(key, hashes.SHA256()))
    os.makedirs(directory)
    with open(os.path.join(directory, "cert.pem"), "wb") as handle:
        handle.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(directory, "key.pem"), "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _secrets_in(root):
    """Every secret value now on disk: .env values (and backups of it), private key lines."""
    found = set()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if name.startswith(".env"):
                env = _dotenv.parse(open(path, "rb").read(), path)
                found.update(e.value for e in env.entries if e.kind == _dotenv.ASSIGN)
            elif name.endswith((".key", "key.pem")) or ".key." in name:
                found.update(line for line in open(path, encoding="ascii").read().splitlines()
                             if line and not line.startswith("-----"))
    return {value for value in found if len(value) >= 8}


CALLBACK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "callback_plugins")


def _ansible_env(tmp_path):
    environ = helpers.env()
    environ.update(ANSIBLE_COLLECTIONS_PATH=helpers.BUILD, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                   ANSIBLE_LOCALHOST_WARNING="0", ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
                   ANSIBLE_HOME=str(tmp_path / "ansible-home"),
                   # record every result callbacks receive (returned values, facts, diffs): see the plugin
                   ANSIBLE_CALLBACK_PLUGINS=CALLBACK_DIR, ANSIBLE_CALLBACKS_ENABLED="record_results")
    return environ


def _recorded(path):
    """The JSON lines record_results wrote for one playbook run: (text, parsed events)."""
    assert os.path.exists(path), "the record_results callback wrote nothing (not loaded?)"
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    events = [json.loads(line) for line in text.splitlines()]
    assert events and events[-1]["event"] == "stats", "the recording ended early: %s" % path
    return text, events


def _manifests(root):
    """repr() of the manifest of every set under ``root`` (read through the engine's verify_set)."""
    found = {}
    for dirpath, _dirs, _files in os.walk(str(root)):
        for item in bs.list_sets(dirpath):
            path = os.path.join(dirpath, item["name"])
            assert not item["encrypted"], "an encrypted set; give the test its identity: %s" % path
            found["manifest of " + os.path.relpath(path, str(root))] = repr(bs.verify_set(path))
    return found


def test_no_secret_in_output_results_or_manifests(tmp_path):
    helpers.require_module("cryptography")
    playbook_cmd = shutil.which("ansible-playbook", path=os.path.dirname(helpers.PYTHON))
    helpers.require(playbook_cmd, "ansible-playbook not found next to %s" % helpers.PYTHON)
    root = tmp_path / "app"
    root.mkdir()
    for sub in ("backups", "certs", "certs2"):
        (root / sub).mkdir()
    helpers.make_db(root / "app.db", mib=0.05)
    (root / ".env").write_text("# app\nEXISTING_PASSWORD=pre-existing-password-value\nDB_PASSWORD=old-db-password-1\n")
    _make_source_pair(str(root / "src"))
    (tmp_path / "play.yml").write_text(PLAYBOOK)
    supplied = "supplied-token-6f1d0c2a9e"
    environ = _ansible_env(tmp_path)
    outputs = []
    haystacks = {}
    seen_secrets = _secrets_in(root) | {supplied}
    for run_id, extra in enumerate((["--check"], [])):
        environ["RUNBOOK_RECORD_RESULTS"] = str(tmp_path / ("results-%d.jsonl" % run_id))
        cmd = [playbook_cmd, "-i", "localhost,", "-c", "local", "-vvv", "--diff", *extra,
               "-e", "ansible_python_interpreter=%s" % helpers.PYTHON, "-e", "app_root=%s" % root,
               "-e", "supplied_token=%s" % supplied, "-e", "run_id=%d" % run_id, str(tmp_path / "play.yml")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
        text, events = _recorded(environ["RUNBOOK_RECORD_RESULTS"])
        # the recording holds the returned values: the five tasks, the backup's kept/pruned lists
        assert sum(event["event"] == "ok" for event in events) >= 5, events
        assert any("kept" in event["data"].get("result", {}) for event in events), "no backup result recorded"
        haystacks["recorded results %d" % run_id] = text
        seen_secrets |= _secrets_in(root)
    haystacks.update({"playbook output %d" % i: text for i, text in enumerate(outputs)})
    for dump in root.glob("dump-*.json"):
        haystacks[dump.name] = dump.read_text()
    manifests = _manifests(root / "backups")
    assert len(manifests) == 1, manifests.keys()   # the real run wrote one set; check mode none
    haystacks.update(manifests)
    # the -e command line carries the supplied value on purpose; it is not output of ours
    leaks = [(where, secret[:6] + "...") for where, text in haystacks.items() for secret in seen_secrets
             if secret in text.replace("supplied_token=" + supplied, "")]
    assert len(seen_secrets) >= 8 and len(haystacks) >= 6
    assert not leaks, leaks
    helpers.record("leaks", playbook_runs=len(outputs), secrets_tracked=len(seen_secrets),
                   places_searched=len(haystacks), manifests_searched=len(manifests), leaks=len(leaks))


# Every runbook of the collection, by FQCN, on localhost with the demo's inventory: real run first
# (check mode needs the state a real run makes), then check mode, all at -vvv --diff.
RUNBOOKS = [
    ("deploy", []), ("deploy", ["--check"]),
    ("backup", []), ("backup", ["--check"]),
    ("maintenance", []), ("maintenance", ["--check"]),
    ("rotate_secrets", ["-e", "secrets_force=true"]), ("rotate_secrets", ["--check", "-e", "secrets_force=true"]),
    ("renew_certs", []), ("renew_certs", ["--check"]),
    ("disaster_recovery", ["-e", "sqlite_app_dr_mode=drill"]),
    ("disaster_recovery", ["--check", "-e", "sqlite_app_dr_mode=drill"]),
]


def test_runbook_playbooks_leak_nothing(tmp_path):
    helpers.require_module("cryptography")
    playbook_cmd = shutil.which("ansible-playbook", path=os.path.dirname(helpers.PYTHON))
    helpers.require(playbook_cmd, "ansible-playbook not found next to %s" % helpers.PYTHON)
    collection = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    inventory = os.path.join(collection, "examples", "demo", "inventory.yml")
    app = tmp_path / "app"
    (app / ".data").mkdir(parents=True)
    helpers.make_db(app / ".data" / "app.db", mib=0.05)
    environ = _ansible_env(tmp_path)
    common = ["-i", inventory, "-vvv", "--diff", "-e", "ansible_python_interpreter=%s" % helpers.PYTHON,
              "-e", "sqlite_app_root=%s" % app, "-e", "sqlite_app_user=%s" % pwd.getpwuid(os.getuid()).pw_name,
              "-e", "sqlite_app_group=%s" % grp.getgrgid(os.getgid()).gr_name,
              "-e", "sqlite_app_backup_dest=%s" % (tmp_path / "backups")]
    outputs = {}
    seen_secrets = set()
    results = {}
    facts = 0
    for number, (name, extra) in enumerate(RUNBOOKS):
        label = "%02d %s %s" % (number, name, " ".join(extra))
        environ["RUNBOOK_RECORD_RESULTS"] = str(tmp_path / ("results-%02d.jsonl" % number))
        cmd = [playbook_cmd, "runbook.sqlite_app." + name, *common, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, timeout=300, check=False)
        assert proc.returncode == 0, name + " " + " ".join(extra) + "\n" + proc.stdout[-3000:] + proc.stderr[-2000:]
        outputs[label] = proc.stdout + proc.stderr
        results[label], events = _recorded(environ["RUNBOOK_RECORD_RESULTS"])
        assert sum(event["event"] == "ok" for event in events) >= 3, label
        facts += sum(bool(event["data"].get("result", {}).get("ansible_facts")) for event in events)
        # Collect after each run: rotation replaces values, and each one ever present must stay unseen.
        seen_secrets |= _secrets_in(app / ".data")
    assert "HMAC_SECRET_PREVIOUS" in (app / ".data" / ".env").read_text(), "rotate_secrets did not rotate"
    assert facts > 0, "no recorded result carried ansible_facts"
    manifests = _manifests(tmp_path / "backups")
    assert manifests, "the backup runbook wrote no set under %s" % (tmp_path / "backups")
    haystacks = dict(outputs)
    haystacks.update(("recorded results " + label, text) for label, text in results.items())
    haystacks.update(manifests)
    leaks = [(where, secret[:6] + "...")
             for where, text in haystacks.items() for secret in seen_secrets if secret in text]
    assert len(seen_secrets) >= 3, len(seen_secrets)  # HMAC_SECRET (old, new) and the TLS key lines
    assert not leaks, leaks
    helpers.record("runbook leaks", playbook_runs=len(outputs), secrets_tracked=len(seen_secrets),
                   places_searched=len(haystacks), results_recorded=sum(t.count("\n") for t in results.values()),
                   facts_results=facts, manifests_searched=len(manifests), leaks=len(leaks))
