# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Crafted hostile archives (plain and age-encrypted, engine and cli) and encryption at rest."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import helpers
import pytest

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402


def needs_age(test):
    """Skip without age/age-keygen, but fail in CI (helpers.require)."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        helpers.require_tools("age", "age-keygen")
        return test(*args, **kwargs)
    return wrapper


def keypair(directory):
    identity = os.path.join(str(directory), "id-%d.txt" % len(os.listdir(str(directory))))
    proc = subprocess.run(["age-keygen", "-o", identity], capture_output=True, text=True, check=True)
    return identity, proc.stderr.split()[-1]


def _hostile_members(kind, outside):
    """(TarInfo, data) list for one kind of hostile member, plus its manifest entry."""
    payload = b"owned\n"
    if kind == "dotdot":
        info = tarfile.TarInfo("files/../../%s" % os.path.basename(outside))
    elif kind == "absolute":
        info = tarfile.TarInfo(outside)
    elif kind == "symlink_out":
        info = tarfile.TarInfo("files/conf/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../../../../../" + outside.lstrip("/")
        payload = b""
    elif kind == "symlink_abs":
        info = tarfile.TarInfo("files/conf/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/shadow"
        payload = b""
    elif kind == "device":
        info = tarfile.TarInfo("files/conf/null")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 1, 3
        payload = b""
    elif kind == "hardlink":
        info = tarfile.TarInfo("files/conf/hard")
        info.type = tarfile.LNKTYPE
        info.linkname = outside
        payload = b""
    else:
        raise AssertionError(kind)
    info.size = len(payload)
    entry = {"type": "file", "member": info.name, "path": outside, "size": len(payload),
             "sha256": hashlib.sha256(payload).hexdigest(), "mode": 0o600}
    return info, payload, entry


def craft_set(sets_dir, kind, outside, recipient=None):
    info, payload, entry = _hostile_members(kind, outside)
    manifest = {"format": 1, "name": "x", "members": [entry], "databases": []}  # sha256s in the manifest
    data = json.dumps(manifest).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = tarfile.TarInfo(bs.MANIFEST)
        head.size = len(data)
        tar.addfile(head, io.BytesIO(data))
        tar.addfile(info, io.BytesIO(payload) if payload else None)
    name = "evil-20260101T000000Z-%s.tar" % kind.replace("_", "")
    path = os.path.join(str(sets_dir), name)
    with open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    if recipient:
        subprocess.run(["age", "-r", recipient, "-o", path + ".age", path], check=True)
        os.unlink(path)
        path, name = path + ".age", name + ".age"
    with open(path + ".sha256", "w", encoding="ascii") as handle:
        handle.write("%s  %s\n" % (helpers.sha256(path), name))
    return name


KINDS = ["dotdot", "absolute", "symlink_out", "symlink_abs", "device", "hardlink"]


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_archive_refused(tmp_path, kind, encrypted):
    if encrypted:
        helpers.require_tools("age", "age-keygen")
    sets, root = tmp_path / "sets", tmp_path / "root"
    sets.mkdir()
    root.mkdir()
    outside = str(tmp_path / "outside.txt")
    identity, recipient = keypair(tmp_path) if encrypted else (None, None)
    name = craft_set(sets, kind, outside, recipient)
    params = {"src": str(sets), "set": name, "force": True, "dest_root": str(root), "identity_file": identity}
    with pytest.raises(RunbookError, match="unsafe archive member"):
        bs.restore(params)
    with pytest.raises(RunbookError, match="unsafe archive member"):
        bs.restore(dict(params, mode="drill", drill_dir=str(tmp_path)))
    config = helpers.write_json(tmp_path / "r.json", {k: v for k, v in params.items() if v is not None})
    proc, _elapsed = helpers.run_timed(helpers.engine_cmd("_backupset", "restore", "--config", config))
    assert proc.returncode == 1 and "unsafe archive member" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.lexists(outside)
    assert os.listdir(root) == [] and helpers.temps(tmp_path) == []
    helpers.record("archive_safety", faults=3, refused=3)


# ---------------------------------------------------------------------------------------------
# encryption at rest, end to end through the cli


@needs_age
def test_encrypted_roundtrip_cli(tmp_path):
    app, sets = tmp_path / "app", tmp_path / "sets"
    app.mkdir()
    sets.mkdir()
    db = helpers.make_db(app / "app.db", mib=0.5)
    env_file = app / ".env"
    env_file.write_text("API_TOKEN=plain-text-marker-123456\n")
    identity, recipient = keypair(tmp_path)
    other_identity, other = keypair(tmp_path)
    config = helpers.write_json(tmp_path / "b.json", {
        "databases": [db], "extra_paths": [str(env_file)], "root": str(app), "dest": str(sets),
        "encrypt_recipients": [recipient, other]})
    proc, _elapsed = helpers.run_timed(helpers.engine_cmd("_backupset", "backup", "--config", config))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["encrypted"] is True and result["name"].endswith(".tar.zst.age")
    raw = open(result["path"], "rb").read()
    assert raw.startswith(b"age-encryption.org/v1")
    assert b"plain-text-marker" not in raw and b"manifest" not in raw and b"SQLite format" not in raw
    assert open(result["path"] + ".sha256").read().split()[0] == hashlib.sha256(raw).hexdigest()
    # the manifest inside says so (readable only after decryption: through the engine, with an identity)
    manifest = bs.verify_set(result["path"], identity=identity)
    assert manifest["encrypted"] is True and manifest["name"] == result["name"]
    assert [item["encrypted"] for item in bs.list_sets(str(sets))] == [True]
    with pytest.raises(RunbookError, match="encrypted with age; give identity_file"):
        bs.verify_set(result["path"])
    # and a plain set's manifest says it is not (the check above can fail)
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = bs.backup({"databases": [db], "dest": str(plain_dir)})
    assert bs.verify_set(plain["path"])["encrypted"] is False and plain["encrypted"] is False
    # either recipient can restore; a stranger cannot; without identity a clear error
    stranger, _public = keypair(tmp_path)
    for ident, ok in ((identity, True), (other_identity, True), (stranger, False), (None, False)):
        params = {"src": str(sets), "mode": "drill", "drill_dir": str(tmp_path)}
        if ident:
            params["identity_file"] = ident
        config = helpers.write_json(tmp_path / "d.json", params)
        proc, _elapsed = helpers.run_timed(helpers.engine_cmd("_backupset", "drill", "--config", config))
        assert (proc.returncode == 0) == ok, proc.stderr
        if ok:
            continue
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr   # one line, no traceback
        message = lines[0]
        assert result["path"] in message, message   # names the set
        if ident:
            # names the identity used, says why, and what to check
            assert ("cannot decrypt the set with identity_file %s" % ident) in message, message
            assert "no identity matched" in message and "wrong identity_file?" in message, message
        else:
            assert "encrypted with age" in message and "identity_file" in message, message
        assert "AGE-SECRET-KEY" not in message
    # a real restore replaces the live files
    env_file.write_text("API_TOKEN=changed\n")
    restored = bs.restore({"src": str(sets), "force": True, "identity_file": identity})
    assert str(env_file) in restored["restored"]
    assert env_file.read_text() == "API_TOKEN=plain-text-marker-123456\n"
    helpers.record("encryption", roundtrips=2, wrong_identity_refused=2, manifests_checked=2)


@needs_age
def test_age_missing_is_a_clear_error(tmp_path, monkeypatch):
    db = helpers.make_db(tmp_path / "app.db", mib=0.05)
    dest = tmp_path / "dest"
    dest.mkdir()
    identity, recipient = keypair(tmp_path)
    made = bs.backup({"databases": [db], "dest": str(dest), "encrypt_recipients": [recipient]})
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    os.symlink(shutil.which("zstd"), str(empty / "zstd"))
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(RunbookError, match="age binary is not installed"):
        bs.backup({"databases": [db], "dest": str(dest), "encrypt_recipients": [recipient]})
    with pytest.raises(RunbookError, match="age binary is not installed"):
        bs.restore({"src": str(dest), "set": made["name"], "identity_file": identity, "force": True})
    assert len(bs.list_sets(str(dest))) == 1 and helpers.temps(dest) == []


@needs_age
@pytest.mark.parametrize("bad", ["AGE-SECRET-KEY-1QQQQ", "age1short", "", "ssh-ed25519", 42])
def test_bad_recipient_refused(tmp_path, bad):
    db = helpers.make_db(tmp_path / "app.db", mib=0.05)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RunbookError, match="encrypt_recipients") as err:
        bs.backup({"databases": [db], "dest": str(dest), "encrypt_recipients": [bad]})
    assert "SECRET-KEY-1QQQQ" not in str(err.value)   # an identity pasted by mistake is not echoed whole
    assert os.listdir(dest) == []
