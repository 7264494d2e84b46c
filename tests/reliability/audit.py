# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Permissions audit of an app root: reusable by this suite and by the molecule runbook scenario.

    from audit import audit_tree, format_report
    problems = audit_tree("/srv/app", app_user="app", backup_dirs=["/var/backups/app"])
    assert not problems, format_report(problems)

Rules (each violation is one ``Violation(path, rule, detail)``):

- ``world-readable-secret``: a secret file (below) readable by others;
- ``env-mode`` / ``key-mode`` / ``backup-mode``: a .env, private key or backup file more open than 0600
  (0400 passes: the rule is "no bits beyond 0600");
- ``dir-mode``: a directory with bits beyond 0750 (0700 passes);
- ``owner`` / ``group``: not owned by the app user (group) when one is given.

Secret files: ``.env`` and ``.env.*`` (except ``.env.example``/``.env.sample``), ``*.key``,
``*key*.pem``/``privkey*``, age identities (``*.age-identity``, ``identity*.txt`` containing
``AGE-SECRET-KEY``), and backups: backup sets and their ``.sha256`` sidecars, ``*.bak``,
``*.pre-restore-*``. Databases (``*.db``, ``*.sqlite*``) and their -wal/-shm must not be
world-readable. Symbolic links are reported by their own path and never followed.
"""

from __future__ import annotations

import collections
import fnmatch
import grp
import os
import pwd
import re
import stat

Violation = collections.namedtuple("Violation", "path rule detail")

_SET = re.compile(r".+-\d{8}T\d{6}Z(-[A-Za-z0-9._-]+)?\.tar(\.gz|\.zst)?(\.age)?(\.sha256)?$")


def classify(path: str) -> str | None:  # noqa: PLR0911 (one return per kind reads best)
    """'env', 'key', 'backup', 'database' or None for an ordinary file."""
    name = os.path.basename(path)
    if name in (".env.example", ".env.sample", ".env.dist"):
        return None
    if name == ".env" or name.startswith(".env.") and not name.endswith((".example", ".sample")):
        if ".bak" in name or "pre-restore" in name:
            return "backup"
        return "env"
    if _SET.match(name) or fnmatch.fnmatch(name, "*.bak") or ".pre-restore-" in name:
        return "backup"
    if name.endswith(".key") or fnmatch.fnmatch(name, "*key*.pem") or name.startswith("privkey"):
        return "key"
    if name.endswith(".age-identity") or _is_age_identity(path):
        return "key"
    if name.endswith((".db", ".sqlite", ".sqlite3", ".db-wal", ".db-shm", ".sqlite-wal", ".sqlite-shm")):
        return "database"
    return None


def _is_age_identity(path: str) -> bool:
    if not fnmatch.fnmatch(os.path.basename(path), "*identity*"):
        return False
    try:
        with open(path, "rb") as handle:
            return b"AGE-SECRET-KEY-" in handle.read(4096)
    except OSError:
        return False


def _uid(user):
    if user is None:
        return None
    return int(user) if str(user).isdigit() else pwd.getpwnam(str(user)).pw_uid


def _gid(group):
    if group is None:
        return None
    return int(group) if str(group).isdigit() else grp.getgrnam(str(group)).gr_gid


def audit_tree(root: str, app_user=None, app_group=None, *, dir_mode: int = 0o750, file_mode: int = 0o600,
               backup_dirs=()) -> list[Violation]:
    """Walk ``root`` (and ``backup_dirs``) and return every violation, sorted by path."""
    uid, gid = _uid(app_user), _gid(app_group)
    problems = []
    for top in [root, *backup_dirs]:
        for dirpath, dirnames, filenames in os.walk(top):
            entries = [dirpath] if dirpath == top else []
            entries += [os.path.join(dirpath, n) for n in dirnames + filenames]
            for path in entries:
                problems.extend(_check(path, uid, gid, (dir_mode, file_mode), in_backups=top in backup_dirs))
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    seen, unique = set(), []
    for item in sorted(problems):
        if item not in seen:
            seen.add(item)
            unique.append(item)
    return unique


def _check(path, uid, gid, modes, in_backups=False):
    dir_mode, file_mode = modes
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    out = []
    mode = stat.S_IMODE(st.st_mode)
    if uid is not None and st.st_uid != uid:
        out.append(Violation(path, "owner", "owned by uid %d, expected %d" % (st.st_uid, uid)))
    if gid is not None and st.st_gid != gid:
        out.append(Violation(path, "group", "group gid %d, expected %d" % (st.st_gid, gid)))
    if stat.S_ISLNK(st.st_mode):
        return out
    if stat.S_ISDIR(st.st_mode):
        if mode & ~dir_mode:
            out.append(Violation(path, "dir-mode", "mode %04o, expected %04o or stricter" % (mode, dir_mode)))
        return out
    if not stat.S_ISREG(st.st_mode):
        return out
    kind = classify(path)
    if kind is None and in_backups and not os.path.basename(path).startswith(".runbook-backup.lock"):
        kind = "backup"
    if kind in ("env", "key", "backup") and mode & stat.S_IROTH:
        out.append(Violation(path, "world-readable-secret", "mode %04o" % mode))
    if kind == "database" and mode & stat.S_IROTH:
        out.append(Violation(path, "world-readable-secret", "database mode %04o" % mode))
    if kind in ("env", "key", "backup") and mode & ~file_mode:
        out.append(Violation(path, "%s-mode" % kind, "mode %04o, expected %04o or stricter" % (mode, file_mode)))
    return out


def format_report(problems) -> str:
    return "\n".join("%s: %s (%s)" % (p.path, p.rule, p.detail) for p in problems) or "no violations"
