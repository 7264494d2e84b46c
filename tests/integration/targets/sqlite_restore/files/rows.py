# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""rows.py DB [add]: print the row count of the notes table (after adding a row with 'add')."""
from __future__ import annotations

import sqlite3
import sys

conn = sqlite3.connect(sys.argv[1])
if sys.argv[2:] == ["add"]:
    conn.execute("INSERT INTO notes (body) VALUES ('late')")
    conn.commit()
print(conn.execute("SELECT count(*) FROM notes").fetchone()[0])
conn.close()
