#!/usr/bin/env bash
# Copy the checkout into ROOT/ansible_collections/runbook/sqlite_app (ROOT: first argument, or
# build/), the layout ansible-test and ansible-playbook need to import the collection by name.
# The checkout stays at the repo root; the copy is made anew on every call so it never holds
# files the checkout no longer has. Prints the copy's path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build="${1:-$root/build}"
dest="$build/ansible_collections/runbook/sqlite_app"
rm -rf "$dest"
mkdir -p "$dest"
tar -C "$root" -c \
    --exclude=./.venv --exclude='./build*' --exclude=./demo --exclude=./.git --exclude=./tests/output \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache --exclude='./runbook-sqlite_app-*.tar.gz' \
    --exclude=./bench/results --exclude=./.cache \
    . | tar -C "$dest" -x
# ansible-test lists a collection's files with git when it sits inside a work tree (the checkout's
# .git is above build/): a repository of its own makes it see this copy, untracked files included.
git -C "$dest" init -q
echo "$dest"
