#!/usr/bin/env bash
# Build the molecule lab image: Debian bookworm with systemd as PID 1, made from Debian packages
# with debootstrap (no container registry is needed). Skips the build when the image exists.
#   RUNBOOK_LAB_IMAGE   image name to build or reuse (default runbook-sqlite-app-lab:bookworm-2)
#   RUNBOOK_LAB_MIRROR  Debian mirror (default: the first one in this machine's apt sources)
#   RUNBOOK_LAB_REBUILD=1 forces a rebuild.
set -euo pipefail

image="${RUNBOOK_LAB_IMAGE:-runbook-sqlite-app-lab:bookworm-2}"

if [ "${RUNBOOK_LAB_REBUILD:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "lab image $image is present"
    exit 0
fi

mirror="${RUNBOOK_LAB_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
        | grep -v -e security -e '^$' | head -n 1 || true)
fi
if [ -z "$mirror" ]; then
    echo "lab-image: no Debian mirror found in apt sources; set RUNBOOK_LAB_MIRROR" >&2
    exit 2
fi
command -v debootstrap >/dev/null || { echo "lab-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }

# What the roles and tests need inside a host: systemd, python3 for Ansible, the SQLite and
# TLS tools an operator uses by hand at 3 am, zstd/age for backup sets, curl for health checks,
# git for the app role's git releases.
packages=python3,systemd,systemd-sysv,dbus,sqlite3,openssl,ca-certificates,zstd,age,curl,procps,iproute2,cron,sudo,tar,gzip,git

work=$(mktemp -d /var/tmp/runbook-lab.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "building lab image $image from $mirror (debootstrap, about a minute)"
debootstrap --variant=minbase --include="$packages" bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    echo "lab-image: debootstrap failed (log above)" >&2
    exit 1
}
# python3-cryptography (for cert_install) fails to configure inside debootstrap's first stage, so it
# goes in afterwards with the image's own apt, from the same mirror.
chroot "$work/root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    python3-cryptography >>"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    echo "lab-image: installing python3-cryptography in the image failed (log above)" >&2
    exit 1
}
# A container has no consoles or udev to wait for; masking them keeps boot quick and quiet.
for unit in getty.target console-getty.service systemd-udevd.service systemd-udev-trigger.service \
    systemd-remount-fs.service sys-kernel-config.mount sys-kernel-debug.mount systemd-logind.service; do
    ln -sf /dev/null "$work/root/etc/systemd/system/$unit"
done
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" -c . | docker import --change 'CMD ["/lib/systemd/systemd"]' --change 'ENV container=docker' - "$image" >/dev/null
echo "lab image $image built"
