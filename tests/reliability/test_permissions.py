# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The permissions audit on a tree the engines produced, and on a deliberately broken one."""

from __future__ import annotations

import os
import pwd
import sys

import helpers
import pytest
from audit import audit_tree, format_report

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _secrets, _x509  # noqa: E402

APP_USER = "nobody"


@pytest.fixture
def app_tree(tmp_path):
    helpers.require(os.geteuid() == 0, "needs root to hand files to the app user")
    user = pwd.getpwnam(APP_USER)
    root = tmp_path / "srv"
    data, certs, backups = root / ".data", root / ".data" / "certs", tmp_path / "backups"
    for directory in (root, data, certs, backups):
        directory.mkdir(mode=0o750)
        os.chmod(directory, 0o750)  # noqa: S103 (the mode under audit)
        os.chown(directory, user.pw_uid, user.pw_gid)
    os.chmod(tmp_path, 0o755)  # noqa: S103 (the app user must reach the tree)
    db = helpers.make_db(data / "app.db", mib=0.05)
    os.chmod(db, 0o600)
    os.chown(db, user.pw_uid, user.pw_gid)
    _secrets.rotate(str(root / ".env"), [{"name": "SECRET_KEY"}], owner=APP_USER, group=str(user.pw_gid))
    _x509.install({"source": "self_signed", "common_name": "app.example", "dest_dir": str(certs),
                   "owner": APP_USER, "group": str(user.pw_gid), "cert_mode": "0640"})
    bs.backup({"databases": [db], "extra_paths": [str(root / ".env")], "root": str(root), "dest": str(backups),
               "owner": APP_USER, "group": str(user.pw_gid)})
    os.chown(backups / ".runbook-backup.lock", user.pw_uid, user.pw_gid)
    return root, backups, user


def test_tree_from_engines_is_clean(app_tree):
    root, backups, user = app_tree
    problems = audit_tree(str(root), app_user=APP_USER, app_group=user.pw_gid, backup_dirs=[str(backups)])
    assert problems == [], format_report(problems)
    helpers.record("permissions", trees_audited=1, violations_in_engine_tree=0)


def test_broken_tree_reports_each_violation(app_tree):
    root, backups, user = app_tree
    env_file = root / ".env"
    key = root / ".data" / "certs" / "server.key"
    a_set = next(backups.glob("backup-*.tar.zst"))
    os.chmod(env_file, 0o644)                   # .env world-readable
    os.chmod(key, 0o640)                        # key not 0600 (not world-readable)
    os.chmod(a_set, 0o604)                      # backup set world-readable
    os.chmod(root / ".data", 0o755)  # noqa: S103 (dir too open, on purpose)
    stray = root / ".data" / "notes.txt"
    stray.write_text("x")
    os.chown(stray, 0, 0)                       # not owned by the app user
    os.chmod(stray, 0o600)
    bak = root / ".env.20260101T000000Z.bak"
    bak.write_text("SECRET_KEY=old\n")
    os.chown(bak, user.pw_uid, user.pw_gid)
    os.chmod(bak, 0o660)                        # backup copy not 0600
    problems = audit_tree(str(root), app_user=APP_USER, app_group=user.pw_gid, backup_dirs=[str(backups)])
    found = {(os.path.basename(p.path), p.rule) for p in problems}
    expected = {
        (".env", "world-readable-secret"), (".env", "env-mode"),
        ("server.key", "key-mode"),
        (a_set.name, "world-readable-secret"), (a_set.name, "backup-mode"),
        (".data", "dir-mode"),
        ("notes.txt", "owner"), ("notes.txt", "group"),
        (bak.name, "backup-mode"),
    }
    assert found == expected, format_report(problems)
    helpers.record("permissions", broken_trees_audited=1, violations_planted=len(expected),
                   violations_reported=len(found & expected))
