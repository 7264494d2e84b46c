# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reliability suite only: every task result a callback receives, as JSON lines, for the leak tests.

Enabled by test_leaks.py with ANSIBLE_CALLBACK_PLUGINS=<this directory>,
ANSIBLE_CALLBACKS_ENABLED=record_results and RUNBOOK_RECORD_RESULTS=<file>. What it records is what
any result-storing callback (tree, AWX job events, ARA) gets: the returned values, facts
(``ansible_facts``), diffs and warnings of every task, item and handler, plus ``set_stats`` data.
"""

from __future__ import annotations

import json
import os

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = r"""
name: record_results
type: aggregate
short_description: write every task result as JSON lines (reliability suite)
description:
  - Appends one JSON object per task, item or handler result to the file named by the
    C(RUNBOOK_RECORD_RESULTS) environment variable.
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "record_results"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = os.environ.get("RUNBOOK_RECORD_RESULTS")
        self.count = 0

    def _write(self, event: str, data) -> None:
        if not self.path:
            return
        line = json.dumps({"event": event, "data": data}, default=repr, sort_keys=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        self.count += 1

    def _record(self, event: str, result) -> None:
        returned = getattr(result, "result", None)   # ansible-core >= 2.19
        if not isinstance(returned, dict):
            returned = result._result
        self._write(event, {"host": result._host.get_name(), "task": result._task.get_name(),
                            "result": returned})

    def v2_runner_on_ok(self, result):
        self._record("ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record("failed", result)

    def v2_runner_on_skipped(self, result):
        self._record("skipped", result)

    def v2_runner_on_unreachable(self, result):
        self._record("unreachable", result)

    def v2_runner_item_on_ok(self, result):
        self._record("item_ok", result)

    def v2_runner_item_on_failed(self, result):
        self._record("item_failed", result)

    def v2_runner_item_on_skipped(self, result):
        self._record("item_skipped", result)

    def v2_runner_retry(self, result):
        self._record("retry", result)

    def v2_runner_on_async_ok(self, result):
        self._record("async_ok", result)

    def v2_runner_on_async_failed(self, result):
        self._record("async_failed", result)

    def v2_on_file_diff(self, result):
        self._record("diff", result)

    def v2_playbook_on_stats(self, stats):
        self._write("stats", {"custom": getattr(stats, "custom", {}), "results_recorded": self.count})
