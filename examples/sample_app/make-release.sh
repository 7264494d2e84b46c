#!/usr/bin/env bash
# Copyright (c) runbook.sqlite_app contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
#
# make-release.sh VERSION OUTDIR
#
# Build OUTDIR/sample-app-VERSION.tar.gz from the one source file next to this script, with
# APP_VERSION=VERSION baked in. The archive holds two files at its top level:
#   sample_app.py   the app, behaving as release VERSION (3 is the deliberately broken one)
#   VERSION         the version number and a newline
# The archive is reproducible (fixed owner, mode and mtime, gzip -n): building the same version
# twice gives identical bytes. Needs only bash, sed, tar (GNU), gzip and python3.
set -euo pipefail

usage() { echo "usage: $0 VERSION OUTDIR   (VERSION: a positive integer)" >&2; exit 64; }
[ $# -eq 2 ] || usage
version=$1
outdir=$2
[[ $version =~ ^[1-9][0-9]{0,5}$ ]] || { echo "$0: VERSION '$version' is not a positive integer" >&2; exit 64; }

here=$(cd "$(dirname "$0")" && pwd)
src="$here/sample_app.py"
[ "$(grep -c '^APP_VERSION = [0-9][0-9]*$' "$src")" -eq 1 ] \
    || { echo "$0: $src: expected exactly one 'APP_VERSION = N' line" >&2; exit 1; }

mkdir -p "$outdir"
stage=$(mktemp -d "${TMPDIR:-/tmp}/sample-app-release.XXXXXX")
trap 'rm -rf "$stage"' EXIT

sed -E "s/^APP_VERSION = [0-9]+\$/APP_VERSION = $version/" "$src" > "$stage/sample_app.py"
printf '%s\n' "$version" > "$stage/VERSION"
chmod 0755 "$stage/sample_app.py"
chmod 0644 "$stage/VERSION"

# The baked file must compile and report the version it was built for.
got=$(cd "$stage" && python3 sample_app.py version)
[ "$got" = "$version" ] || { echo "$0: built sample_app.py reports version '$got', not '$version'" >&2; exit 1; }
rm -rf "$stage/__pycache__"

out="$outdir/sample-app-$version.tar.gz"
tmp="$out.tmp.$$"
tar -C "$stage" --owner=0 --group=0 --numeric-owner --mtime='@0' -cf - VERSION sample_app.py \
    | gzip -n -9 > "$tmp"
mv -f "$tmp" "$out"
echo "$out"
