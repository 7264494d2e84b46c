# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Restore on a real XFS file system with reflink: a large database of an uncompressed set starts
on a 4 KiB boundary of the set, so the kernel copy shares its blocks with the set; the restored
copy is still a private copy (writing to it leaves the set intact)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys

import helpers

sys.path.insert(0, helpers.BUILD)

from ansible_collections.runbook.sqlite_app.plugins.module_utils import _backupset as bs  # noqa: E402

SHARED = 0x2000  # FIEMAP_EXTENT_SHARED


def _extent_flags(path: str) -> list[int]:
    """The flags of each data extent of ``path`` (xfs_io's fiemap; holes are left out)."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap -v", path], capture_output=True, text=True,
                         check=True).stdout
    extent = re.compile(r"^\s*\d+:\s+\[\d+\.\.\d+\]:\s+\d+\.\.\d+\s+\d+\s+(0x[0-9a-f]+)", re.M)
    return [int(match.group(1), 16) for match in extent.finditer(out)]


def test_restore_on_xfs_shares_the_blocks_of_an_uncompressed_set(xfs):
    root = xfs("data")
    large = helpers.make_db(os.path.join(root, "app.db"), mib=8, seed=11)   # copied in the kernel
    small = helpers.make_db(os.path.join(root, "tiny.db"), mib=0.5, seed=12)  # read and written
    sets = os.path.join(root, "sets")
    os.mkdir(sets)
    made = bs.backup({"databases": [large, small], "dest": sets, "compression": "none"})
    fresh = os.path.join(root, "fresh")
    out = bs.restore({"src": sets, "dest_root": fresh})
    restored = {os.path.basename(path): path for path in out["restored"]}
    assert sorted(restored) == ["app.db", "tiny.db"]
    for db in made["databases"]:  # the snapshots' bytes, as SHA256SUMS lists them
        assert helpers.sha256(restored[os.path.basename(db["path"])]) == db["sha256"]
    shared = _extent_flags(restored["app.db"])
    assert shared and all(flags & SHARED for flags in shared), shared
    written = _extent_flags(restored["tiny.db"])  # the control: a file we wrote owns its blocks
    assert written and not any(flags & SHARED for flags in written), written
    # the shared blocks are copy-on-write: the restored database is the application's to change
    conn = sqlite3.connect(restored["app.db"], isolation_level=None)
    conn.execute("UPDATE items SET body = zeroblob(length(body))")
    conn.close()
    assert helpers.integrity(restored["app.db"]) == ["ok"]
    assert helpers.verify_published(made["path"])["format"] == 3  # the set's blocks did not change
    helpers.record("reflink.restore", restores=1, shared_extents=len(shared), set_changed=0)
