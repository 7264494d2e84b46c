# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Benchmark: the deploy and backup playbooks on a fleet of lab containers.

For each host count N: start N fresh containers from the lab image (systemd as PID 1, no network:
the flags of .config/molecule/config.yml), wait for systemd, put a small WAL database in each, then
time `ansible-playbook runbook.sqlite_app.deploy` (forks = N) over the community.docker connection:
the first run (pipelining on), then no-op reruns alternating pipelining on/off; on the largest N also
the backup playbook, alternating on/off. With N=1 a first run with pipelining off is timed as well
(on a fresh container) with --first-nopipe. Containers are removed afterwards. Writes one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchlib as lib  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PREFIX = "rbbench-"
APP_VARS = {
    "sqlite_app_name": "benchapp",
    "sqlite_app_root": "/srv/benchapp",
    "sqlite_app_databases": ["app.db"],
    "ansible_python_interpreter": "/usr/bin/python3",
}


def docker(*args, check=True, capture=True):
    return subprocess.run(["docker", *args], check=check, capture_output=capture, text=True)


def start(names, image):
    for name in names:
        docker("rm", "-f", name, check=False)
        docker("run", "-d", "--name", name, "--hostname", name, "--network", "none",
               "--cap-add", "SYS_ADMIN", "--security-opt", "seccomp=unconfined", "--cgroupns", "host",
               "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/tmp",
               image, "/lib/systemd/systemd")
    deadline = time.monotonic() + 180
    for name in names:
        while True:
            state = docker("exec", name, "systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise SystemExit("fleet: %s: systemd did not come up (%s)" % (name, state))
            time.sleep(1)
        docker("exec", name, "sh", "-c",
               "mkdir -p /srv/benchapp/.data && sqlite3 /srv/benchapp/.data/app.db "
               "'PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT); "
               "INSERT INTO t (v) VALUES (hex(randomblob(64)));'")


def remove(names):
    if names:
        docker("rm", "-f", *names, check=False)


def inventory(path, names):
    inv = {"all": {"hosts": {name: {"ansible_connection": "community.docker.docker"} for name in names},
                   "vars": APP_VARS}}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(inv, handle)


_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def playbook(playbook_name, inv, forks, pipelining, *, collections, log_path):
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_PIPELINING="true" if pipelining else "false",
               ANSIBLE_HOST_KEY_CHECKING="false", ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
               ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default", ANSIBLE_RETRY_FILES_ENABLED="false",
               ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks", PROFILE_TASKS_TASK_OUTPUT_LIMIT="15")
    ansible = os.path.join(REPO, ".venv", "bin", "ansible-playbook")
    started = time.monotonic()
    done = subprocess.run([ansible, "-i", inv, "-f", str(forks), playbook_name],
                          check=False, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write("==== %s pipelining=%s forks=%d rc=%d %.1fs\n%s\n%s\n" % (
            playbook_name, pipelining, forks, done.returncode, seconds, done.stdout, done.stderr))
    recap = [{"host": m.group(1), "ok": int(m.group(2)), "changed": int(m.group(3)),
              "unreachable": int(m.group(4)), "failed": int(m.group(5))} for m in _RECAP.finditer(done.stdout)]
    return {"seconds": round(seconds, 2), "rc": done.returncode, "pipelining": pipelining, "forks": forks,
            "changed": sum(r["changed"] for r in recap), "failed": sum(r["failed"] + r["unreachable"] for r in recap),
            "hosts": len(recap), "load": lib.loadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--counts", default="1 3 6 10")
    parser.add_argument("--reruns", type=int, default=1, help="no-op reruns per pipelining setting")
    parser.add_argument("--image", default=os.environ.get("RUNBOOK_LAB_IMAGE", "runbook-sqlite-app-lab:bookworm-2"))
    parser.add_argument("--collections", required=True, help="ANSIBLE_COLLECTIONS_PATH (a collection tree root)")
    parser.add_argument("--max-seconds", type=float, default=600, help="skip remaining counts after this")
    parser.add_argument("--off-max-hosts", type=int, default=100,
                        help="time pipelining off (reruns, backup) only up to this many hosts")
    parser.add_argument("--first-nopipe", action="store_true",
                        help="also time a first run with pipelining off on one fresh host")
    parser.add_argument("--out", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.counts.split()]
    # 1 and the largest count first: they carry the targets; the time budget cuts the middle ones
    counts = sorted(set(counts), key=lambda n: (n not in (min(counts), max(counts)), n))
    if os.path.exists(args.log):
        os.unlink(args.log)
    result = {"bench": "fleet", "counts": counts, "image": args.image, "machine": lib.machine(REPO),
              "rows": [], "backup": [], "notes": [], "skipped": []}
    bench_start = time.monotonic()
    play = functools.partial(playbook, collections=args.collections, log_path=args.log)
    work = tempfile.mkdtemp(prefix="bench-fleet-")
    names = []
    try:
        for n in counts:
            if time.monotonic() - bench_start > args.max_seconds:
                result["skipped"].append(n)
                lib.log("fleet: time budget spent, skipping N=%d" % n)
                continue
            inv = os.path.join(work, "inv-%d.json" % n)
            row = {"hosts": n, "first": None, "first_nopipe": None, "rerun": {"on": [], "off": []}}
            if n == 1 and args.first_nopipe:
                names = [PREFIX + "np1"]
                start(names, args.image)
                inventory(inv, names)
                row["first_nopipe"] = play("runbook.sqlite_app.deploy", inv, n, False)
                lib.log("fleet N=1 first deploy (pipelining off): %s" % row["first_nopipe"])
                remove(names)
            names = [PREFIX + str(i) for i in range(1, n + 1)]
            t0 = time.monotonic()
            start(names, args.image)
            row["start_seconds"] = round(time.monotonic() - t0, 1)
            inventory(inv, names)
            row["first"] = play("runbook.sqlite_app.deploy", inv, n, True)
            lib.log("fleet N=%d first deploy: %s" % (n, row["first"]))
            both = n <= args.off_max_hosts
            for i in range(args.reruns):
                for pipe in ((True, False) if i % 2 == 0 else (False, True)) if both else (True,):
                    res = play("runbook.sqlite_app.deploy", inv, n, pipe)
                    row["rerun"]["on" if pipe else "off"].append(res)
                    lib.log("fleet N=%d rerun: %s" % (n, res))
            if n == max(counts):
                for i in range(args.reruns):
                    for pipe in ((True, False) if i % 2 == 0 else (False, True)) if both else (True,):
                        res = play("runbook.sqlite_app.backup", inv, n, pipe)
                        res["n"] = n
                        result["backup"].append(res)
                        lib.log("fleet N=%d backup playbook: %s" % (n, res))
            result["rows"].append(row)
            remove(names)
            names = []
            lib.write_json(args.out, result)
    finally:
        remove(names)
        left = docker("ps", "-aq", "--filter", "name=" + PREFIX, check=False).stdout.split()
        if left:
            docker("rm", "-f", *left, check=False)
    result["seconds_total"] = round(time.monotonic() - bench_start, 1)
    lib.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
