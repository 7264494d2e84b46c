#!/usr/bin/python
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sqlite_restore
short_description: Verify and restore a backup set written by sqlite_backup, or run a restore drill
version_added: 0.1.0
description:
  - Picks a set in O(src) (the newest verified one, one before a point in time, one with a label, or a named one),
    refuses unsafe archive members (absolute paths, C(..), links pointing outside, hard links, devices), and
    extracts each file into a temp directory next to its destination.
  - Then runs the SQLite check on every extracted database, verifies the sha256 of every member and of the
    manifest against the set's C(SHA256SUMS), and makes the extracted files durable (fsync), side by side.
    The set needs its C(.sha256) file, but the whole set file is hashed against it only for sets of format 1
    and 2 (written by earlier versions), whose C(SHA256SUMS) does not cover the manifest; O(mode=select)
    checks it. Only when all of that passed
    does it keep a safety copy of what is replaced, remove stale C(-wal)/C(-shm)/C(-journal) files and rename
    the new file into place, keeping the replaced file's owner and mode.
  - Each file is swapped on its own. When a swap fails after others succeeded, the module puts back what it
    had already replaced (from the safety copies, or with O(safety_copy=false) from hard links it keeps
    until the end) and removes what it created, then fails naming the file and saying so. A run killed
    between two swaps cannot be undone; run the restore again.
  - O(mode=drill) restores into a scratch directory, checks each database, reports row counts per table
    and removes the scratch copy again; nothing live is touched.
  - Stop the application before a real restore; a running process keeps writing to the replaced file.
    Before replacing a database the module refuses when another process has the database (or its
    C(-wal)/C(-shm)) open, found through C(/proc/*/fd) (Linux), or holds an SQLite lock on it,
    unless O(force_running=true).
author:
  - runbook.sqlite_app maintainers (@runbook)
options:
  src:
    description: Directory of sets (the O(runbook.sqlite_app.sqlite_backup#module:dest) of sqlite_backup).
    type: path
    required: true
  set:
    description:
      - V(latest) for the newest verified set matching O(before), O(label) and O(name_prefix),
        or a set file name in O(src).
    type: str
    default: latest
  before:
    description: ISO 8601 timestamp; choose the newest set strictly before it (UTC when no offset is given).
    type: str
  label:
    description: Only consider sets with this label.
    type: str
  name_prefix:
    description: Only consider sets with this name prefix (default any).
    type: str
  databases:
    description: Member names (V(app.db)) or original paths of the databases to restore; default all.
    type: list
    elements: str
  extra_paths:
    description: Restore the set's extra files, directories and links too.
    type: bool
    default: true
  dest_root:
    description: Restore original absolute paths under this directory instead (for example on a fresh host).
    type: path
  mode:
    description:
      - V(restore) replaces files; V(drill) verifies and counts rows in O(drill_dir) and touches nothing live.
      - V(select) only reports which set O(set), O(before), O(label) and O(name_prefix) choose and checks the file
        against its C(.sha256); it decodes nothing, so it needs neither O(identity_file) nor zstd (for example on an
        off-host store, before the set is copied to the host that restores it). RV(verified) is false then.
    type: str
    choices: [restore, drill, select]
    default: restore
  drill_dir:
    description: Scratch directory for O(mode=drill). Required then.
    type: path
  force:
    description: Replace existing files whose content differs from the set. Without it such files are an error.
    type: bool
    default: false
  if_missing:
    description:
      - Restore only files that do not exist yet; existing ones are skipped and reported in RV(skipped_paths).
      - Cannot be combined with O(force=true).
    type: bool
    default: false
  check:
    description: SQLite check run on every extracted database before it is put in place.
    type: str
    choices: [quick_check, integrity_check]
    default: quick_check
  safety_copy:
    description: Keep each replaced file (and a database's C(-wal)/C(-journal)) as C(<file>.pre-restore-<timestamp>).
    type: bool
    default: true
  owner:
    description:
      - Owner of restored files. Default the replaced file's owner; new files belong to the user running the module.
    type: str
  group:
    description: Group of restored files. Default the replaced file's group.
    type: str
  busy_timeout:
    description: Milliseconds to wait on SQLite locks during the drill.
    type: int
    default: 5000
  lock_timeout:
    description:
      - Seconds to wait for a backup or prune run on O(src) to finish. Restore takes a shared lock on
        C(src/.runbook-backup.lock) (when that file exists) so no set is pruned while it is read.
    type: int
    default: 600
  identity_file:
    description:
      - Path of an age identity file (C(age-keygen) output, or an SSH private key) used to decrypt a set
        written with O(runbook.sqlite_app.sqlite_backup#module:encrypt_recipients) (C(age -d -i FILE)).
      - Required for encrypted sets (names ending in C(.age)); a wrong identity is a clear error and nothing is touched.
      - The C(age) binary must be installed on the host.
    type: path
  force_running:
    description:
      - Replace a database even though another process has it open or holds an SQLite lock on it.
      - Detection reads C(/proc/*/fd) (Linux; as a non-root user only your own processes are seen) and probes
        SQLite's POSIX lock bytes on the database and its C(-shm) file without changing them.
    type: bool
    default: false
notes:
  - A second run restores nothing when the files already match the set, so it reports no change.
  - Extra directories are restored file by file; files present now but absent from the set are left alone.
seealso:
  - module: runbook.sqlite_app.sqlite_backup
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - Reads and verifies the set and lists what would be restored; writes nothing
        (the SQLite check of extracted copies is skipped).
  diff_mode:
    support: none
  platform:
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Restore the newest set after stopping the app (replacing the live database)
  runbook.sqlite_app.sqlite_restore:
    src: /var/backups/gateway
    force: true

- name: Restore the set taken before last night's upgrade onto a fresh host
  runbook.sqlite_app.sqlite_restore:
    src: /var/backups/gateway
    before: "2026-11-22T00:00:00Z"
    label: pre-upgrade
    dest_root: /

- name: First boot of a new host, keep what is there already
  runbook.sqlite_app.sqlite_restore:
    src: /var/backups/rocket
    if_missing: true

- name: Monthly restore drill
  runbook.sqlite_app.sqlite_restore:
    src: /var/backups/rocket
    mode: drill
    drill_dir: /var/tmp/restore-drill
    check: integrity_check
  register: drill

- name: Show the row counts
  ansible.builtin.debug:
    var: drill.row_counts
"""

RETURN = r"""
set:
  description: File name of the set used.
  returned: always
  type: str
  sample: backup-20261123T030000Z.tar.zst
restored:
  description: Paths restored (or that would be in check mode). Empty for a drill.
  returned: always
  type: list
  elements: str
skipped_paths:
  description:
    - Existing paths left alone because of O(if_missing).
    - Not called C(skipped), which Ansible reserves (a true C(skipped) marks the whole task as skipped).
  returned: always
  type: list
  elements: str
safety_copies:
  description: Paths of the safety copies of replaced files.
  returned: always
  type: list
  elements: str
set_path:
  description: Full path of the set used.
  returned: always
  type: str
verified:
  description:
    - True when the sha256 of every member and of the manifest matched the set's C(SHA256SUMS) (and, for a
      set of format 1 or 2, the set file's sha256 its C(.sha256) file).
    - False for O(mode=select), which reads no member.
  returned: always
  type: bool
sha256:
  description: sha256 of the set file, equal to its C(.sha256) sidecar.
  returned: when O(mode=select)
  type: str
encrypted:
  description: True when the chosen set is encrypted with age (its name ends in C(.age)).
  returned: when O(mode=select)
  type: bool
row_counts:
  description: For a drill, row count per table per database member.
  returned: always
  type: dict
  sample: {"app.db": {"items": 50, "users": 1}}
manifest:
  description: The set's manifest, with each member's C(sha256) from the set's C(SHA256SUMS) member.
  returned: always
  type: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.runbook.sqlite_app.plugins.module_utils._backupset import restore
from ansible_collections.runbook.sqlite_app.plugins.module_utils._module import run_engine


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path", required=True),
            set=dict(type="str", default="latest"),
            before=dict(type="str"),
            label=dict(type="str"),
            name_prefix=dict(type="str"),
            databases=dict(type="list", elements="str"),
            extra_paths=dict(type="bool", default=True),
            dest_root=dict(type="path"),
            mode=dict(type="str", choices=["restore", "drill", "select"], default="restore"),
            drill_dir=dict(type="path"),
            force=dict(type="bool", default=False),
            if_missing=dict(type="bool", default=False),
            check=dict(type="str", choices=["quick_check", "integrity_check"], default="quick_check"),
            safety_copy=dict(type="bool", default=True),
            owner=dict(type="str"),
            group=dict(type="str"),
            busy_timeout=dict(type="int", default=5000),
            lock_timeout=dict(type="int", default=600),
            identity_file=dict(type="path"),
            force_running=dict(type="bool", default=False),
        ),
        required_if=[("mode", "drill", ["drill_dir"])],
        supports_check_mode=True,
    )
    run_engine(module, lambda: restore(dict(module.params), check_mode=module.check_mode))


if __name__ == "__main__":
    main()
