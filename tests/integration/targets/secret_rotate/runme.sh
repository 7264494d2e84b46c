#!/usr/bin/env bash
# The 4-run cases live in tasks/main.yml (run through runme.yml); this script adds the leak test:
# run a playbook with -vvv --diff (and once with --check), then read every value from the .env
# and fail if any of them appears anywhere in the captured output.
set -eu

python="${ANSIBLE_TEST_PYTHON_INTERPRETER:-python3}"

inventory="${INVENTORY_PATH:-localhost,}"

export ANSIBLE_NOCOLOR=1

ansible-playbook -i "$inventory" -c local runme.yml "$@"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 700 "$work"

supplied=$("$python" -c 'import secrets; print("supplied-" + secrets.token_hex(16))')
printf 'leak_supplied_value: "%s"\n' "$supplied" > "$work/vars.yml"
printf '# leak test\nexport APP_ENV=test\nHMAC_SECRET="pre-existing-hmac-%s"\nAUTH_SECRET=\x27pre-existing-auth-%s\x27\n' \
    "$("$python" -c 'import secrets; print(secrets.token_hex(8))')" \
    "$("$python" -c 'import secrets; print(secrets.token_hex(8))')" > "$work/app.env"

# every value the file has held so far, one per line (read with the collection's own parser
# so quoting is decoded exactly as the app sees it)
snapshot() {
    "$python" - "$work/app.env" >> "$work/values" <<'PY'
import sys
from ansible_collections.runbook.sqlite_app.plugins.module_utils import _dotenv
env = _dotenv.parse(open(sys.argv[1], "rb").read(), sys.argv[1])
for entry in env.entries:
    if entry.kind == _dotenv.ASSIGN and entry.key != "APP_ENV":
        print(entry.value)
PY
}

run() {
    name=$1
    shift
    ansible-playbook -i "$inventory" -c local leak.yml -vvv --diff \
        -e "leak_env=$work/app.env" -e "leak_vars_file=$work/vars.yml" "$@" > "$work/out.$name" 2>&1 || {
        echo "leak test run $name failed:"; cat "$work/out.$name"; exit 1; }
    snapshot
}

# make the parser importable from the tree ansible-playbook loads the collection from
collections_root="${ANSIBLE_COLLECTIONS_PATH:-$(cd ../../../../../../.. && pwd)}"
PYTHONPATH="${collections_root%%:*}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
snapshot
run check --check
run create
run idempotent
run force -e leak_force=true

[ "$(sort -u "$work/values" | wc -l)" -ge 7 ] || { echo "leak test: too few values captured"; exit 1; }
grep -q "$supplied" "$work/values" || { echo "leak test: supplied value not captured"; exit 1; }
# positive controls: the output really holds the diff and the verbose invocation
grep -q "HMAC_SECRET: fingerprint [0-9a-f]\{12\}" "$work/out.force" || { echo "leak test: no diff in output"; exit 1; }
grep -q "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" "$work/out.create" || { echo "leak test: no invocation in output"; exit 1; }
grep -q "handler ran for" "$work/out.create" || { echo "leak test: handler did not run"; exit 1; }
grep -q "changed=0" "$work/out.idempotent" || { echo "leak test: second run changed"; exit 1; }

leaks=0
while IFS= read -r value; do
    [ -n "$value" ] || continue
    for out in "$work"/out.*; do
        if grep -qF -- "$value" "$out"; then
            echo "LEAK: a secret value appears in $(basename "$out")"
            leaks=1
        fi
    done
done < <(sort -u "$work/values")
# a masked value means something tried to print one
if grep -l -E '(^|[^*])[*]{8}([^*]|$)' "$work"/out.*; then
    echo "LEAK: masked value in output (something tried to print a secret)"
    leaks=1
fi
[ "$leaks" = 0 ] || exit 1
echo "leak test: $(sort -u "$work/values" | wc -l) values, none in $(cat "$work"/out.* | wc -l) lines of output"
