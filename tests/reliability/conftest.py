# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Reliability and security suite (fault injection, bad input, leaks, permissions).

Runs from the collection tree made by tools/collection-tree.sh with PYTHONPATH=BUILD.
RUNBOOK_SOAK=1 switches to soak mode (>= 50 runs per fault, more fuzzing examples).
Figures (runs, faults, kills landed mid-run, data lost, leaks) are printed at the end and
written as JSON to $RUNBOOK_RELIABILITY_FIGURES when set.
"""

from __future__ import annotations

import json
import os
import subprocess

import helpers
import pytest


def pytest_report_header(config):
    return "reliability: %s mode, %d runs per crash fault, build root %s" % (
        "soak" if helpers.SOAK else "ci", helpers.RUNS, helpers.BUILD)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = helpers.FIGURES
    if not figures:
        return
    terminalreporter.section("reliability figures (%s mode)" % ("soak" if helpers.SOAK else "ci"))
    for key in sorted(figures):
        terminalreporter.write_line("%-40s %s" % (key, json.dumps(figures[key], sort_keys=True)))
    target = os.environ.get("RUNBOOK_RELIABILITY_FIGURES")
    if target:
        with open(target, "w", encoding="utf-8") as handle:
            json.dump({"mode": "soak" if helpers.SOAK else "ci", "figures": figures}, handle, indent=2,
                      sort_keys=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A factory for small tmpfs mounts (root only), unmounted in teardown."""
    mounted = []

    def make(name: str, size: str = "1m") -> str:
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0750" % size, "tmpfs", str(path)],
                              capture_output=True, text=True, check=False)
        helpers.require(proc.returncode == 0, "cannot mount a tmpfs here: %s" % proc.stderr.strip())
        mounted.append(str(path))
        return str(path)

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], check=False)


@pytest.fixture
def xfs(tmp_path):
    """A factory for XFS file systems with reflink, each in a sparse image file on a loop device
    (root only), unmounted in teardown."""
    mounted = []

    def make(name: str, size: str = "512m") -> str:
        helpers.require_tools("mkfs.xfs", "xfs_io")
        image, path = tmp_path / (name + ".img"), tmp_path / name
        path.mkdir()
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
        proc = subprocess.run(["mount", "-o", "loop", str(image), str(path)], capture_output=True, text=True,
                              check=False)
        helpers.require(proc.returncode == 0, "cannot mount an XFS image here: %s" % proc.stderr.strip())
        mounted.append(str(path))
        return str(path)

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", path], check=False)
