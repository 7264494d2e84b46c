#!/usr/bin/env bash
# Make sure a Docker engine answers; start dockerd by hand when there is none (this lab has no
# systemd as PID 1, so nothing else would start it). Fails with a clear message where Docker
# cannot run at all.
set -euo pipefail
if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd: no Docker engine here. Install Debian's docker.io (apt-get install docker.io) or point DOCKER_HOST at one." >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "dockerd: the Docker engine is not running and starting it needs root; start dockerd, then retry." >&2
    exit 2
fi
log=/var/log/runbook-dockerd.log
echo "dockerd: starting the Docker engine (log: $log)"
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
tail -n 20 "$log" >&2
echo "dockerd: the Docker engine did not come up within 60 s (log above)" >&2
exit 2
