#!/usr/bin/env bash
# make demo: run the collection's own playbooks, by FQCN, against this machine (localhost, no
# root, no containers) on the sample app, whose state lives in ./demo/app/.data:
# deploy -> the app writes data -> backup -> maintenance -> secret rotation -> restore drill.
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

demo="$root/demo"
app="$demo/app"
say "Fresh sandbox: $app (the app's root; its state goes to $app/.data)"
rm -rf "$demo"
mkdir -p "$app" "$demo/metrics"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="https://127.0.0.1:$port"

extra=(-e "sqlite_app_root=$app" -e "sqlite_app_user=$(id -un)" -e "sqlite_app_group=$(id -gn)"
       -e "sqlite_app_backup_dest=$demo/backups")
playbook() {
    local name="$1"; shift
    say "ansible-playbook runbook.sqlite_app.$name $*"
    ansible-playbook -i examples/demo/inventory.yml "runbook.sqlite_app.$name" "${extra[@]}" "$@"
}

app_pid=""
start_app() {
    # The sample app reads its secrets from .env, as the systemd unit's EnvironmentFile= would.
    (set -a; . "$app/.data/.env"; set +a
     SAMPLE_APP_DATA_DIR="$app/.data" SAMPLE_APP_LISTEN="127.0.0.1:$port" \
        exec python3 examples/sample_app/sample_app.py serve) >"$demo/app.log" 2>&1 &
    app_pid=$!
    for _ in $(seq 1 50); do
        curl -skf "$url/readyz" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    cat "$demo/app.log" >&2
    echo "demo: the sample app did not become ready" >&2
    return 1
}
stop_app() { [ -z "$app_pid" ] || { kill "$app_pid" 2>/dev/null || true; wait "$app_pid" 2>/dev/null || true; app_pid=""; }; }
trap stop_app EXIT

playbook deploy

say "Starting the sample app on $url (TLS from .data/certs, HMAC_SECRET from .data/.env) and writing data"
SAMPLE_APP_DATA_DIR="$app/.data" python3 examples/sample_app/sample_app.py migrate
start_app
for body in "first order" "second order" "third order"; do
    curl -skf -X POST -H 'Content-Type: application/json' -d "{\"body\": \"$body\"}" "$url/items" >/dev/null
done
echo "rows in the app: $(curl -skf "$url/stats")"
key_before=$(curl -skf "$url/keyinfo")

playbook deploy | tee "$demo/deploy-again.log"
if ! grep -Eq 'localhost +: ok=[0-9]+ +changed=0 ' "$demo/deploy-again.log"; then
    echo "demo: the second deploy changed something on a host that was already deployed" >&2
    exit 1
fi
echo "(second deploy: changed=0, nothing to change on a healthy host)"

playbook backup
playbook maintenance
playbook rotate_secrets -e secrets_force=true

say "Restarting the app so it reads the rotated secret (a systemd host does this through the role's handler)"
stop_app
start_app
key_after=$(curl -skf "$url/keyinfo")
echo "secret fingerprints before: $key_before"
echo "secret fingerprints after:  $key_after"

playbook disaster_recovery -e sqlite_app_dr_mode=drill

set_file=$(ls "$demo/backups" | grep -v sha256 | tail -n 1)
say "What the demo did"
cat <<SUMMARY
- built runbook-sqlite_app-$(sed -n 's/^version: //p' galaxy.yml).tar.gz and installed it into build/demo-collections
- deploy: $app/.data (0750) with a private .env (mode $(stat -c %a "$app/.data/.env")), HMAC_SECRET generated
  on the spot, a self-signed TLS pair in .data/certs (key mode $(stat -c %a "$app/.data/certs/server.key")); a second
  deploy changed nothing
- the sample app served HTTPS on 127.0.0.1:$port and stored $(sqlite3 "$app/.data/app.db" 'SELECT count(*) FROM items;') rows in app.db (WAL mode)
- backup: verified set $demo/backups/$set_file ($(du -h "$demo/backups/$set_file" | cut -f1)), checksum in $set_file.sha256
- maintenance: integrity check, WAL checkpoint and statistics on app.db; metrics in $demo/metrics/
- rotate_secrets: HMAC_SECRET rotated, the old value kept as HMAC_SECRET_PREVIOUS for 7 days; only
  fingerprints were ever printed
- disaster_recovery drill: the newest set restored into a scratch directory, verified and counted;
  the live database was not touched
Look around: ls -la $app/.data $demo/backups; cat $demo/metrics/backup.prom
SUMMARY
