# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sqlite_vacuum
short_description: Check, checkpoint, vacuum and analyze SQLite databases, safe to schedule
version_added: 0.1.0
description:
  - Runs maintenance on one or more SQLite database files, in this order for each database
    an integrity check (O(check)), a WAL checkpoint (O(checkpoint)), a C(VACUUM) or
    C(PRAGMA incremental_vacuum) when it pays off (O(vacuum), O(vacuum_threshold), O(auto_vacuum)),
    and a statistics refresh (O(analyze)).
  - A database whose check fails is reported and left untouched (no checkpoint, no VACUUM, no ANALYZE);
    the task fails with the first errors. The other databases of the same task are still maintained.
  - Before a full VACUUM the free space of the database filesystem and of the temp directory is read;
    VACUUM may need up to twice the database size (the temp copy plus the journal or WAL), and the
    module refuses with the paths and the needed and free bytes when that does not fit.
  - The task reports C(changed) only when a database file was rewritten to a smaller size or a new
    O(auto_vacuum) mode, or when the planner statistics were rewritten. A WAL checkpoint alone does not
    count as a change, and neither does rewriting O(metrics_file).
  - The same code runs on hosts from the maintenance role's systemd timer, without Ansible.
author:
  - runbook.sqlite_app maintainers (@runbook)
seealso:
  - name: SQLite VACUUM
    description: What VACUUM does and why it needs temporary space.
    link: https://www.sqlite.org/lang_vacuum.html
  - name: SQLite PRAGMA wal_checkpoint
    description: The meaning of the busy, log and checkpointed figures this module returns.
    link: https://www.sqlite.org/pragma.html#pragma_wal_checkpoint
  - name: SQLite temporary files
    description: How SQLite picks the directory for VACUUM's temporary copy.
    link: https://www.sqlite.org/tempfiles.html
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details:
      - Opens every database read-only, runs only the read-only check and reports what would be done
        (RV(databases[].would_vacuum), RV(databases[].would_analyze)) without a checkpoint.
      - Whether C(PRAGMA optimize) would rewrite statistics cannot be known without running it, so check mode
        does not count O(analyze=optimize) as a change.
  diff_mode:
    support: full
    details:
      - Shows size, page count, freelist count and auto_vacuum mode of each database before and after.
  platform:
    platforms: posix
options:
  databases:
    description:
      - Paths of the SQLite database files to maintain.
      - Every path must exist and be an SQLite database; otherwise the task fails before any database is touched.
    type: list
    elements: path
    required: true
    aliases: [database, path]
  check:
    description:
      - The check to run first. V(quick_check) reads every page once and skips verifying that index
        content matches the tables; V(integrity_check) also verifies indexes and is slower on large databases.
      - A failed check fails the task and leaves that database untouched.
    type: str
    choices: [quick_check, integrity_check, none]
    default: quick_check
  checkpoint:
    description:
      - WAL checkpoint to run on databases in WAL journal mode (ignored for rollback-journal databases).
      - V(passive) copies what it can without waiting; V(truncate) waits up to O(busy_timeout) for readers
        and writers, then truncates the WAL file to zero bytes.
      - After a VACUUM in WAL mode the same checkpoint runs again, since the database file only shrinks
        once the WAL is copied back.
    type: str
    choices: [passive, truncate, none]
    default: passive
  checkpoint_incomplete:
    description:
      - What to do when the checkpoint could not complete (another connection was busy, or a reader's
        snapshot kept frames from being copied back).
      - V(warn) adds a warning and goes on; V(fail) fails that database before any VACUUM or ANALYZE.
    type: str
    choices: [warn, fail]
    default: warn
  vacuum:
    description:
      - V(auto) vacuums when the freelist is at or above O(vacuum_threshold) of the pages, or when O(auto_vacuum)
        asks for a mode change that needs a VACUUM. On a database in incremental auto_vacuum mode it runs
        C(PRAGMA incremental_vacuum) instead of a full VACUUM.
      - V(always) runs a full VACUUM every time. V(never) never vacuums.
    type: str
    choices: [auto, always, never]
    default: auto
  vacuum_threshold:
    description:
      - Fraction of free pages (C(freelist_count / page_count)) at or above which O(vacuum=auto) vacuums.
    type: float
    default: 0.1
  auto_vacuum:
    description:
      - Desired auto_vacuum mode of the database.
      - Switching between V(full) and V(incremental) is a pragma; switching to or from V(none) needs a VACUUM,
        which O(vacuum=auto) then runs (with O(vacuum=never) the mode stays and a warning says so).
      - Unset leaves the mode as it is.
    type: str
    choices: [none, full, incremental]
  analyze:
    description:
      - V(analyze) runs C(ANALYZE), which always rewrites the statistics (reported as a change).
      - V(optimize) runs C(PRAGMA optimize), which only analyzes where SQLite thinks it helps; the task reports
        a change only when the content of C(sqlite_stat1)/C(sqlite_stat4) differs afterwards. Before SQLite 3.46
        it only considers tables the same connection queried, so from this module it is usually a no-op.
      - V(none) leaves statistics alone.
    type: str
    choices: [none, analyze, optimize]
    default: optimize
  busy_timeout:
    description:
      - Milliseconds to wait for a lock held by another connection before failing that database.
    type: int
    default: 5000
  temp_dir:
    description:
      - Directory for VACUUM's temporary copy of the database.
      - Unset, SQLite picks the first writable directory among E(SQLITE_TMPDIR), E(TMPDIR), C(/var/tmp), C(/usr/tmp),
        C(/tmp) and the current directory; the free-space check reads the same directory.
    type: path
  metrics_file:
    description:
      - A node_exporter textfile collector file (C(*.prom)) to write after the run, replaced atomically.
      - It holds, per database (label C(db)), the last run time, success, check result (0/1), bytes reclaimed,
        file size and duration. It is written even when a database failed, and never in check mode.
    type: path
notes:
  - Root ignores file modes, so a read-only database is only detected as root on a read-only filesystem.
  - Reading a WAL database creates its C(-wal) and C(-shm) files when they are missing, even in check mode;
    the database file itself is not written.
  - SQLite checkpoints a WAL database when its last connection closes, even with O(checkpoint=none).
"""

EXAMPLES = r"""
- name: Nightly maintenance of the app database
  runbook.sqlite_app.sqlite_vacuum:
    databases:
      - /srv/app/var/app.db
    metrics_file: /var/lib/node_exporter/textfile/sqlite_maintenance.prom

- name: Full integrity check and forced VACUUM with a temp dir on the data disk
  runbook.sqlite_app.sqlite_vacuum:
    databases:
      - /srv/gateway/.data/db.sqlite
    check: integrity_check
    vacuum: always
    temp_dir: /srv/gateway/.data/tmp

- name: Switch to incremental auto_vacuum (one VACUUM), then reclaim incrementally on later runs
  runbook.sqlite_app.sqlite_vacuum:
    database: /srv/rocket/rocket.db
    auto_vacuum: incremental
    vacuum_threshold: 0.2

- name: Fail when a long reader keeps the WAL from being checkpointed
  runbook.sqlite_app.sqlite_vacuum:
    databases: /srv/atweet/.data/twits.sqlite
    checkpoint: truncate
    checkpoint_incomplete: fail
    vacuum: never
    analyze: none
"""

RETURN = r"""
databases:
  description: One report per database, in the order given.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: Absolute path of the database file.
      type: str
      sample: /srv/app/var/app.db
    size_before:
      description: Size in bytes of the database file (without C(-wal)) before the run.
      type: int
      sample: 104857600
    size_after:
      description: Size in bytes of the database file after the run (predicted in check mode).
      type: int
      sample: 20971520
    page_size:
      description: Page size in bytes.
      type: int
      sample: 4096
    page_count_before:
      description: Pages in the database (including pages still in the WAL) before the run.
      type: int
      sample: 25600
    page_count_after:
      description: Pages after the run (predicted in check mode).
      type: int
      sample: 5120
    freelist_count_before:
      description: Unused pages before the run.
      type: int
      sample: 20480
    freelist_count_after:
      description: Unused pages after the run (predicted in check mode).
      type: int
      sample: 0
    bytes_reclaimed:
      description: C((page_count_before - page_count_after) * page_size).
      type: int
      sample: 83886080
    journal_mode:
      description: Journal mode of the database (V(wal), V(delete), ...).
      type: str
      sample: wal
    auto_vacuum_before:
      description: auto_vacuum mode before the run.
      type: str
      sample: none
    auto_vacuum_after:
      description: auto_vacuum mode after the run (predicted in check mode).
      type: str
      sample: incremental
    check:
      description: The check that ran, whether it passed and its first error rows.
      type: dict
      sample: {kind: quick_check, ok: true, errors: []}
    checkpoint:
      description:
        - Result of the WAL checkpoint before any VACUUM; V(null) when none ran
          (check mode, not WAL, O(checkpoint=none)).
        - C(complete) is false when C(busy) is 1 or C(checkpointed) is less than C(log).
      type: dict
      sample: {mode: passive, busy: 0, log: 12, checkpointed: 12, complete: true}
    checkpoint_after_vacuum:
      description: Result of the checkpoint that follows a VACUUM in WAL mode, else V(null).
      type: dict
      sample: {mode: passive, busy: 0, log: 5121, checkpointed: 5121, complete: true}
    would_vacuum:
      description: What the plan asked for (V(none), V(full), V(incremental)), in check mode too.
      type: str
      sample: full
    vacuum_reason:
      description: Why that decision was made.
      type: str
      sample: freelist 20480 of 25600 pages (80.0%) is at or above vacuum_threshold 10.0%
    vacuumed:
      description: What actually ran (V(none) in check mode).
      type: str
      sample: full
    would_analyze:
      description: The statistics step the run would take.
      type: str
      sample: optimize
    analyzed:
      description: The statistics step that ran (V(none) in check mode).
      type: str
      sample: optimize
    stats_changed:
      description: Whether the planner statistics were (or, for V(analyze), would be) rewritten.
      type: bool
      sample: false
    changed:
      description: Whether this database changed (see the module description).
      type: bool
      sample: true
    error:
      description: Why this database failed, else V(null).
      type: str
      sample: null
    warnings:
      description: Warnings about this database (they are also issued as task warnings).
      type: list
      elements: str
      sample: []
    duration:
      description: Seconds spent on this database.
      type: float
      sample: 1.25
"""

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError  # noqa: E402
from ansible_collections.runbook.sqlite_app.plugins.module_utils._maintenance import (  # noqa: E402
    DEFAULTS,
    diff,
    maintain,
)


def main():
    module = AnsibleModule(
        argument_spec={
            "databases": {"type": "list", "elements": "path", "required": True, "aliases": ["database", "path"]},
            "check": {"type": "str", "default": "quick_check", "choices": ["quick_check", "integrity_check", "none"]},
            "checkpoint": {"type": "str", "default": "passive", "choices": ["passive", "truncate", "none"]},
            "checkpoint_incomplete": {"type": "str", "default": "warn", "choices": ["warn", "fail"]},
            "vacuum": {"type": "str", "default": "auto", "choices": ["auto", "always", "never"]},
            "vacuum_threshold": {"type": "float", "default": 0.1},
            "auto_vacuum": {"type": "str", "choices": ["none", "full", "incremental"]},
            "analyze": {"type": "str", "default": "optimize", "choices": ["none", "analyze", "optimize"]},
            "busy_timeout": {"type": "int", "default": 5000},
            "temp_dir": {"type": "path"},
            "metrics_file": {"type": "path"},
        },
        supports_check_mode=True,
    )
    options = {key: module.params[key] for key in DEFAULTS}  # params also carry the aliases
    try:
        result = maintain(module.params["databases"], check_mode=module.check_mode, **options)
    except RunbookError as err:
        report = getattr(err, "result", {})
        for text in report.get("warnings", []):
            module.warn(text)
        module.fail_json(msg=str(err), changed=report.get("changed", False), databases=report.get("databases", []))
    for text in result["warnings"]:
        module.warn(text)
    output = {"changed": result["changed"], "databases": result["databases"]}
    if module._diff:
        output["diff"] = diff(result)
    module.exit_json(**output)


if __name__ == "__main__":
    main()
