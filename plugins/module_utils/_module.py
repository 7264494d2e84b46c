# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Used by the module files only (the engines themselves never see an AnsibleModule).
"""The end of every module's main(): run the engine, turn its errors into one fail_json."""

from __future__ import annotations

from ansible_collections.runbook.sqlite_app.plugins.module_utils._errors import RunbookError


def run_engine(module, call) -> None:
    """Call ``call()`` and exit: its result as the module result, a RunbookError as fail_json(msg).

    An engine result may carry ``diff`` (returned only under --diff, as Ansible expects).
    """
    try:
        result = call()
    except RunbookError as err:
        module.fail_json(msg=str(err))
    diff = result.pop("diff", None)
    if module._diff and diff is not None:
        result["diff"] = diff
    module.exit_json(**result)
