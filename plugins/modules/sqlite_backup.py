#!/usr/bin/python
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sqlite_backup
short_description: Write verified backup sets of live SQLite databases and apply retention
version_added: 0.1.0
description:
  - Takes a consistent online snapshot of each database in O(databases) while the application keeps
    writing (one-step SQLite backup API inside a read transaction; never a plain file copy), runs
    C(PRAGMA quick_check) or C(PRAGMA integrity_check) on every copy, and writes ONE tar file per run
    holding C(manifest.json), the databases, the O(extra_paths) and, last, C(SHA256SUMS) (the sha256 of
    every file in it, the manifest included, computed while it is written).
  - The set is named C(<name_prefix>-<YYYYmmddTHHMMSSZ>[-<label>].tar[.gz|.zst]) and comes with a
    C(<set>.sha256) file in C(sha256sum) format. A set that fails verification is never published.
  - Then applies retention (O(keep_last), O(keep_days), O(keep_daily), O(keep_weekly), O(keep_monthly));
    the newest verified set is never deleted. With O(state=pruned) only retention runs.
  - Runs of this module and of the host-side timer (same engine) on one O(dest) never overlap,
    because both take C(dest/.runbook-backup.lock) with C(flock) first.
  - The layout of a set and how to restore one by hand are described in C(docs/backup-sets.md).
author:
  - runbook.sqlite_app maintainers (@runbook)
options:
  databases:
    description:
      - Paths of the SQLite databases to snapshot. Required when O(state=present).
      - WAL and rollback-journal databases are both supported; see the notes for what each costs writers.
    type: list
    elements: path
  extra_paths:
    description:
      - Files or directories to include as they are, for example C(.env) or C(certs/).
      - Directories are walked; symbolic links inside them are stored as links; sockets and fifos are skipped.
    type: list
    elements: path
  root:
    description:
      - Member names are made relative to this directory (C(databases/data/app.db)).
      - Without it, members are named by basename. The manifest always records original absolute paths.
    type: path
  dest:
    description: Directory that holds the sets. It must exist.
    type: path
    required: true
  name_prefix:
    description: First part of every set name; retention only looks at sets with this prefix.
    type: str
    default: backup
  label:
    description:
      - Free text recorded in the manifest, and (reduced to C([A-Za-z0-9._-])) in the set name,
        for example V(pre-upgrade).
    type: str
  compression:
    description:
      - V(zstd) pipes the tar stream through the C(zstd) binary, which must be installed;
        V(gzip) uses the Python standard library; V(none) writes a plain tar.
      - The default is V(zstd) at level 1. In the collection's benchmark (C(docs/BENCHMARKS.md)) zstd -1
        compressed an application database about twice as fast as zstd -3 into a file no bigger, and gzip
        was several times slower than both; see C(docs/backup-sets.md).
    type: str
    choices: [none, gzip, zstd]
    default: zstd
  compression_level:
    description:
      - Compression level, 1 to 19 for V(zstd) (default 1) and 1 to 9 for V(gzip) (default 6).
      - Higher levels write smaller sets and take longer; the run holds no lock on the live database while it
        compresses (the snapshot is already taken), but the backup takes CPU from the host for longer.
      - Refused with O(compression=none).
    type: int
  compression_threads:
    description:
      - Threads C(zstd) compresses with (C(zstd -T)); V(0) means one per core. Only with O(compression=zstd).
      - The default V(1) leaves the other cores to the application; V(0) is faster on hosts with idle cores.
    type: int
    default: 1
  check:
    description: SQLite check run on each snapshot (and again when the set is verified on restore).
    type: str
    choices: [quick_check, integrity_check]
    default: quick_check
  busy_timeout:
    description: Milliseconds to wait for a writer's lock before the snapshot fails.
    type: int
    default: 5000
  mode:
    description: File mode of the set and its checksum file.
    type: raw
    default: '0600'
  owner:
    description: Owner of the set files.
    type: str
  group:
    description: Group of the set files.
    type: str
  state:
    description:
      - V(present) writes a new set, then applies retention. V(pruned) applies retention only.
    type: str
    choices: [present, pruned]
    default: present
  keep_last:
    description: Keep the newest N sets.
    type: int
  keep_days:
    description: Keep every set younger than N days.
    type: int
  keep_daily:
    description: Keep the newest set of each of the last N days that have a set.
    type: int
  keep_weekly:
    description: Keep the newest set of each of the last N ISO weeks that have a set.
    type: int
  keep_monthly:
    description: Keep the newest set of each of the last N months that have a set.
    type: int
  lock_timeout:
    description: Seconds to wait for the per-O(dest) lock held by another run before failing.
    type: int
    default: 600
  metrics_file:
    description:
      - node_exporter textfile collector file (C(*.prom)) to write after a successful run
        (last success time, duration, size, verified).
    type: path
  encrypt_recipients:
    description:
      - Encrypt the set at rest to these age recipients (public keys C(age1...), or C(ssh-ed25519)/C(ssh-rsa)
        public keys), using the C(age) binary, which must be installed on the host.
      - The archive is written and verified in a private temp directory under O(dest), then encrypted with
        C(age -r ...) into C(<set>.age), for example C(backup-20261123T030000Z.tar.zst.age). The manifest is
        inside the encrypted stream (with C(encrypted=true)); the C(.age) suffix marks the set as encrypted
        in plain sight, and C(<set>.sha256) holds the sha256 of the encrypted file.
      - Restoring needs a matching identity, see O(runbook.sqlite_app.sqlite_restore#module:identity_file).
      - Give public keys only. While the set is written, O(dest) temporarily holds the plain archive too
        (mode 0600 in a 0700 directory), so it needs room for two copies.
    type: list
    elements: str
notes:
  - Retention rules are a union; when no C(keep_*) option is set every set is kept.
  - In WAL mode writers carry on during the snapshot. In rollback-journal mode the snapshot holds a
    shared lock for the copy's duration, so writers wait (up to their own busy timeout) until it is done.
  - Sets are named to the second; a second run within the same second waits for the next second.
seealso:
  - module: runbook.sqlite_app.sqlite_restore
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Lists the set that would be written and the sets that would be pruned; writes nothing.
  diff_mode:
    support: full
    details: Shows the list of set names in O(dest) before and after.
  platform:
    support: full
    platforms: posix
"""

EXAMPLES = r"""
- name: Nightly set of the app database and its .env, keeping 7 daily, 4 weekly and 6 monthly sets
  runbook.sqlite_app.sqlite_backup:
    databases:
      - /srv/gateway/.data/db.sqlite
    extra_paths:
      - /srv/gateway/.env
      - /srv/gateway/.data/certs
    root: /srv/gateway
    dest: /var/backups/gateway
    keep_daily: 7
    keep_weekly: 4
    keep_monthly: 6
    metrics_file: /var/lib/node_exporter/textfile/gateway_backup.prom

- name: Labelled set before an upgrade
  runbook.sqlite_app.sqlite_backup:
    databases: [/srv/rocket/rocket.db]
    dest: /var/backups/rocket
    label: pre-upgrade
  register: pre_upgrade

- name: Monthly archive set, smaller at the cost of CPU time, zstd on every core
  runbook.sqlite_app.sqlite_backup:
    databases: [/srv/rocket/rocket.db]
    dest: /var/backups/rocket-archive
    label: monthly
    compression_level: 19
    compression_threads: 0

- name: Retention only
  runbook.sqlite_app.sqlite_backup:
    dest: /var/backups/rocket
    state: pruned
    keep_last: 5
"""

RETURN = r"""
path:
  description: Full path of the set written (or that would be written in check mode).
  returned: when O(state=present)
  type: str
  sample: /var/backups/gateway/backup-20261123T030000Z-pre-upgrade.tar.zst
name:
  description: File name of the set.
  returned: when O(state=present)
  type: str
  sample: backup-20261123T030000Z-pre-upgrade.tar.zst
size:
  description: Size of the set in bytes (null in check mode).
  returned: when O(state=present)
  type: int
sha256:
  description: sha256 of the set file, as written to C(<set>.sha256) (null in check mode).
  returned: when O(state=present)
  type: str
duration:
  description: Seconds the run took.
  returned: always
  type: float
databases:
  description:
    - Per database, C(path), C(member), C(page_count), C(page_size), C(journal_mode), C(user_version),
      C(size), C(sha256) and the C(check) result.
  returned: when O(state=present)
  type: list
  elements: dict
extra_members:
  description: Archive member names of the extra files, directories and links.
  returned: when O(state=present)
  type: list
  elements: str
pruned:
  description: Names of the sets removed by retention (or that would be).
  returned: always
  type: list
  elements: str
kept:
  description: Names of the sets kept, newest first.
  returned: always
  type: list
  elements: str
manifest:
  description:
    - The manifest stored as the first member of the set, with each member's C(sha256) from the set's
      C(SHA256SUMS) member added (null in check mode).
  returned: when O(state=present)
  type: dict
encrypted:
  description: True when the set was (or would be) encrypted to O(encrypt_recipients).
  returned: when O(state=present)
  type: bool
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.runbook.sqlite_app.plugins.module_utils._backupset import backup
from ansible_collections.runbook.sqlite_app.plugins.module_utils._module import run_engine


def main():
    module = AnsibleModule(
        argument_spec=dict(
            databases=dict(type="list", elements="path"),
            extra_paths=dict(type="list", elements="path"),
            root=dict(type="path"),
            dest=dict(type="path", required=True),
            name_prefix=dict(type="str", default="backup"),
            label=dict(type="str"),
            compression=dict(type="str", choices=["none", "gzip", "zstd"], default="zstd"),
            compression_level=dict(type="int"),
            compression_threads=dict(type="int", default=1),
            check=dict(type="str", choices=["quick_check", "integrity_check"], default="quick_check"),
            busy_timeout=dict(type="int", default=5000),
            mode=dict(type="raw", default="0600"),
            owner=dict(type="str"),
            group=dict(type="str"),
            state=dict(type="str", choices=["present", "pruned"], default="present"),
            keep_last=dict(type="int"),
            keep_days=dict(type="int"),
            keep_daily=dict(type="int"),
            keep_weekly=dict(type="int"),
            keep_monthly=dict(type="int"),
            lock_timeout=dict(type="int", default=600),
            metrics_file=dict(type="path"),
            encrypt_recipients=dict(type="list", elements="str"),
        ),
        required_if=[("state", "present", ["databases"])],
        supports_check_mode=True,
    )
    run_engine(module, lambda: backup(dict(module.params), check_mode=module.check_mode))


if __name__ == "__main__":
    main()
