# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the backup role runs these engines on hosts that have no Ansible.

from __future__ import annotations


class RunbookError(Exception):
    """A user-facing failure: the message names the path and the cause.

    Engines raise it; a module's main() turns it into one fail_json(msg=...), and the
    host-side command-line entry points print it and exit non-zero. No traceback reaches a user.
    """
