# -*- coding: utf-8 -*-
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Private to runbook.sqlite_app: no compatibility promise for code outside this collection.
# Standard library only: the backup role runs these engines on hosts that have no Ansible.
"""node_exporter textfile metrics: one .prom file per job, replaced atomically so the
collector never reads half a file."""

from __future__ import annotations

import re

from ansible_collections.runbook.sqlite_app.plugins.module_utils._fileio import write_file

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(metrics: list[tuple[str, str, str, dict, float]]) -> str:
    """Prometheus text exposition for (name, type, help, labels, value) rows.

    Rows sharing a name share one HELP/TYPE header, as the format requires.
    """
    lines = []
    seen = set()
    for name, kind, help_text, labels, value in metrics:
        if not _NAME.match(name):
            raise ValueError("invalid metric name %r" % name)
        if name not in seen:
            lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\").replace("\n", " ")))
            lines.append("# TYPE %s %s" % (name, kind))
            seen.add(name)
        label_text = ",".join('%s="%s"' % (key, _escape(val)) for key, val in sorted(labels.items()))
        number = repr(float(value)) if not isinstance(value, bool) else ("1" if value else "0")
        lines.append("%s{%s} %s" % (name, label_text, number) if label_text else "%s %s" % (name, number))
    return "\n".join(lines) + "\n"


def write_textfile(path: str, metrics: list[tuple[str, str, str, dict, float]]) -> None:
    """Write metrics to ``path`` (node_exporter reads *.prom; 0644 so it can)."""
    write_file(path, render(metrics).encode("utf-8"), mode=0o644)
