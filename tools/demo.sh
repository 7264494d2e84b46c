#!/usr/bin/env bash
# make demo: run the collection's own playbooks, by FQCN, against this machine (localhost, no
# root, no containers) on a sample app whose state lives in ./demo/app/.data.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

bash tools/venv.sh
export PATH="$root/.venv/bin:$PATH"

say "Building the collection and installing it from its tarball into build/demo-collections"
rm -rf build/demo-collections
mkdir -p build
ansible-galaxy collection build --force --output-path build . >/dev/null
ansible-galaxy collection install --force -p build/demo-collections build/runbook-sqlite_app-*.tar.gz >/dev/null
export ANSIBLE_COLLECTIONS_PATH="$root/build/demo-collections"
export ANSIBLE_STDOUT_CALLBACK=ansible.builtin.default ANSIBLE_DISPLAY_SKIPPED_HOSTS=false
echo "installed: $(ansible-galaxy collection list runbook.sqlite_app 2>/dev/null | grep runbook.sqlite_app)"

app="$root/demo/app"
say "Fresh sandbox: $app (the demo app's root; its state goes to $app/.data)"
rm -rf "$root/demo"
mkdir -p "$app"

extra=(-e "sqlite_app_root=$app" -e "sqlite_app_user=$(id -un)" -e "sqlite_app_group=$(id -gn)")
playbook() {
    local name="$1"; shift
    say "ansible-playbook runbook.sqlite_app.$name $*"
    ansible-playbook -i examples/demo/inventory.yml "runbook.sqlite_app.$name" "${extra[@]}" "$@"
}

playbook deploy

say "Seeding the sample app's database with a few rows (a real SQLite file in WAL mode)"
python3 examples/sample_app/sample_app.py migrate --data-dir "$app/.data" 2>/dev/null \
    || SAMPLE_APP_DATA_DIR="$app/.data" python3 examples/sample_app/sample_app.py migrate
sqlite3 "$app/.data/app.db" "PRAGMA journal_mode=DELETE;" >/dev/null
echo "database $app/.data/app.db is now in rollback-journal mode; the deploy playbook will put it back to WAL"

playbook deploy

say "What the demo did"
cat <<EOF
- built runbook-sqlite_app-$(sed -n 's/^version: //p' galaxy.yml).tar.gz and installed it into build/demo-collections
- ran runbook.sqlite_app.deploy on localhost: created $app/.data with its sub-directories,
  a private .env (mode $(stat -c %a "$app/.data/.env")), and repaired ownership
- created the sample app's database and ran deploy again: the database is back in
  $(sqlite3 "$app/.data/app.db" 'PRAGMA journal_mode;') mode, everything else was already in place
Look around: ls -la $app/.data
EOF
