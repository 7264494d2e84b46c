#!/usr/bin/env bash
# The `ecosystem` stage of `make test`: the collection as its users get it.
#   docs      ansible-doc lists and renders every module and role; docs/ and README cover each piece
#   release   changelog lint, galaxy build (nothing that must not ship), install into an empty path,
#             a playbook run by FQCN from the installed copy
#   awx       ansible-runner runs the AWX project's wrapper playbooks (examples/awx) the way AWX does,
#             and its artifacts are read: status, rc, playbook_on_stats
#   encryption the backup role encrypts sets to an age recipient; the drill decrypts them with an
#             identity file; a wrong identity is refused with a clear message
#   awx-hosts upgrade and disaster_recovery (in_place, fresh_host) under ansible-runner against
#             systemd containers from the lab image (docker connection): deploy 1, upgrade to 2,
#             backup with an off-host copy, in-place recovery, fresh-host recovery; artifacts read,
#             the result checked after each job. Runs in the background alongside the other checks.
#   metrics   the metrics files those runs wrote parse as Prometheus text, and the alert rules
#             (examples/prometheus/alerts.yml) use only metric names the engines emit; promtool
#             check rules, and promtool test rules (examples/prometheus/alerts_test.yml)
#   ee        ansible-builder create accepts execution-environment.yml, and another EE's introspection
#             of the installed collection finds its Python and system dependencies
#   awx-code  examples/awx/configure_awx.yml and the wrappers pass syntax-check (ansible-lint: lint stage)
#   argspec   the roles' argument specs (main, and backup's and maintenance's run_now, offhost_host) fail a wrong-typed
#             or missing required variable before any task of the role runs, naming the variable
#             (tests/ecosystem/argspec.yml, one ansible-playbook run on localhost in check mode)
#   summary   which runbook playbooks end with a summary for people (report only)
# Runs from the repo root with the venv on PATH (tools/test.sh). Prints one line per check with its
# time and ends with "ecosystem: N passed, N failed"; exits non-zero when any check failed.
# Pass check names to run some (bash tests/ecosystem/run.sh release awx metrics). RUNBOOK_ECOSYSTEM_KEEP=1 keeps the temp directory. The compatibility matrix is separate:
# tests/ecosystem/compat.sh.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export PATH="$root/.venv/bin:$PATH"
export NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
python=$(command -v python)
# tools/test.sh sets this and makes build/ (tools/collection-tree.sh); standalone runs do the same.
export ANSIBLE_COLLECTIONS_PATH="${ANSIBLE_COLLECTIONS_PATH:-$root/build}"
[ -d "$root/build/ansible_collections/runbook/sqlite_app" ] || bash tools/collection-tree.sh >/dev/null || exit 1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/runbook-ecosystem.XXXXXX")
# Containers the awx-hosts check starts; on exit they always go, the temp directory unless kept.
# Names end in -$$ ($$ is the same in the background subshell), so the parent finds them all.
remove_containers() {
    command -v docker >/dev/null 2>&1 || return 0
    local ids
    ids=$(docker ps -aq --filter "name=^runbook-eco-[a-z]+-$$\$" 2>/dev/null)
    [ -z "$ids" ] || docker rm -f $ids >/dev/null 2>&1 || true
}
cleanup() {
    remove_containers
    [ "${RUNBOOK_ECOSYSTEM_KEEP:-0}" = 1 ] || rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log="$tmp/logs"
mkdir -p "$log"
version=$(sed -n 's/^version: //p' galaxy.yml)
modules=(cert_install secret_rotate sqlite_backup sqlite_restore sqlite_vacuum)
playbooks=(deploy backup maintenance rotate_secrets renew_certs upgrade disaster_recovery)
mapfile -t roles < <(for f in roles/*/meta/argument_specs.yml; do f=${f#roles/}; echo "${f%%/*}"; done)
installed="$tmp/installed"   # the collection installed from its tarball (release check)

passed=0
failed=0
failed_names=()
fail() { echo "  FAIL: $*"; return 1; }
ok() { echo "  ok: $*"; }
# run_quiet NAME CMD...: run CMD with its output in $log/NAME.log; on failure show the log's tail.
run_quiet() {
    local name="$1"; shift
    if "$@" >"$log/$name.log" 2>&1; then
        return 0
    fi
    echo "  --- last lines of $name.log ($*) ---"
    tail -n 40 "$log/$name.log" | sed 's/^/  | /'
    return 1
}
check() {
    local name="$1" start rc
    start=$(date +%s)
    echo "--- $name ---"
    "check_${name//-/_}"
    rc=$?
    if [ $rc = 0 ]; then
        passed=$((passed + 1)); echo "--- $name: ok ($(( $(date +%s) - start )) s)"
    else
        failed=$((failed + 1)); failed_names+=("$name"); echo "--- $name: FAILED ($(( $(date +%s) - start )) s)"
    fi
}

# 1. ansible-doc and the written docs -------------------------------------------------------------
check_docs() {
    local rc=0 m r p listed
    listed=$(ansible-doc -l runbook.sqlite_app 2>"$log/doc-list.err") || { cat "$log/doc-list.err"; return 1; }
    for m in "${modules[@]}"; do
        grep -q "^runbook.sqlite_app.$m " <<<"$listed" || { fail "ansible-doc -l does not list $m"; rc=1; }
    done
    # One ansible-doc call renders every module (each call costs seconds of start-up); then each
    # module's page must be there with its examples and return values.
    if ! ansible-doc "${modules[@]/#/runbook.sqlite_app.}" >"$log/doc-modules.txt" 2>&1; then
        fail "ansible-doc ${modules[*]}"; tail -20 "$log/doc-modules.txt"; rc=1
    fi
    "$python" - "$log/doc-modules.txt" "${modules[@]}" <<'PY' || rc=1
import re, sys
text = open(sys.argv[1]).read()
pages = re.split(r"(?m)^> MODULE ", text)[1:]
rc = 0
for name in sys.argv[2:]:
    page = next((p for p in pages if p.startswith("runbook.sqlite_app.%s " % name)), None)
    if page is None or "EXAMPLES:" not in page or "RETURN VALUES:" not in page:
        print("  FAIL: ansible-doc runbook.sqlite_app.%s: no page with EXAMPLES and RETURN VALUES" % name)
        rc = 1
    else:
        print("  ok: ansible-doc runbook.sqlite_app.%s (%d lines, EXAMPLES and RETURN VALUES)" % (name, page.count("\n")))
sys.exit(rc)
PY
    listed=$(ansible-doc -t role -l runbook.sqlite_app 2>&1) || { echo "$listed"; return 1; }
    for r in "${roles[@]}"; do
        grep -q "^runbook.sqlite_app.$r:" <<<"$listed" || { fail "ansible-doc -t role -l does not list $r"; rc=1; }
    done
    if ! ansible-doc -t role "${roles[@]/#/runbook.sqlite_app.}" >"$log/doc-roles.txt" 2>&1; then
        fail "ansible-doc -t role ${roles[*]}"; tail -20 "$log/doc-roles.txt"; rc=1
    fi
    "$python" - "$log/doc-roles.txt" "${roles[@]}" <<'PY' || rc=1
import re, sys
text = open(sys.argv[1]).read()
pages = re.split(r"(?m)^> ROLE: ", text)[1:]
rc = 0
for name in sys.argv[2:]:
    page = next((p for p in pages if p.startswith("*runbook.sqlite_app.%s*" % name) or p.startswith("runbook.sqlite_app.%s" % name)), None)
    if page is None or "Options (= indicates it is required)" not in page:
        print("  FAIL: ansible-doc -t role runbook.sqlite_app.%s: no page with options" % name)
        rc = 1
    else:
        print("  ok: ansible-doc -t role runbook.sqlite_app.%s (%d entry point(s))" % (name, page.count("ENTRY POINT:")))
sys.exit(rc)
PY
    # Written docs: one page per playbook, the observability and AWX pages, the index.
    for p in "${playbooks[@]}"; do
        [ -s "docs/playbooks/$p.md" ] || { fail "docs/playbooks/$p.md missing"; rc=1; }
        grep -q "runbook.sqlite_app.$p" README.md || { fail "README.md does not mention runbook.sqlite_app.$p"; rc=1; }
    done
    for p in docs/README.md docs/observability.md docs/awx.md; do
        [ -s "$p" ] || { fail "$p missing"; rc=1; }
    done
    for m in "${modules[@]}" "${roles[@]}"; do
        grep -q "runbook.sqlite_app.$m" README.md || { fail "README.md does not mention runbook.sqlite_app.$m"; rc=1; }
    done
    # README.md opens with the title and a block of exactly two commands (demo, test), and .ci/run
    # runs that very test command.
    "$python" - <<'PY' || rc=1
import sys
lines = open("README.md", encoding="utf-8").read().split("\n")
head = lines[:6]
commands = [line.split("#")[0].strip() for line in head[3:5]]
if head[0] != "# runbook.sqlite_app" or head[2] != "```" or head[5] != "```" or commands != ["make demo", "make test"]:
    sys.exit("  FAIL: README.md must start with the title and the two-command block (make demo, make test); got %r" % head)
ci = [line.strip() for line in open(".ci/run", encoding="utf-8") if line.strip() and not line.startswith("#")]
if ci[-1] != commands[1]:
    sys.exit("  FAIL: .ci/run must end by running the README's test command %r; it ends with %r" % (commands[1], ci[-1]))
print("  ok: README.md starts with the title and the make demo / make test block")
PY
    # Every relative link in docs/ and README.md points at a file that exists.
    "$python" - <<'PY' || rc=1
import glob, os, re, sys
bad = []
for md in ["README.md"] + glob.glob("docs/**/*.md", recursive=True):
    text = open(md, encoding="utf-8").read()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(md), target))):
            bad.append("%s -> %s" % (md, target))
if bad:
    sys.exit("  FAIL: broken links:\n    " + "\n    ".join(bad))
print("  ok: relative links in README.md and docs/ resolve")
PY
    return $rc
}

# 2. Release hygiene ------------------------------------------------------------------------------
check_release() {
    local rc=0 tarball="$tmp/dist/runbook-sqlite_app-$version.tar.gz" bad app="$tmp/release-app"
    if run_quiet changelog-lint antsibull-changelog lint; then ok "antsibull-changelog lint"
    else fail "antsibull-changelog lint"; rc=1; fi
    mkdir -p "$tmp/dist"
    run_quiet galaxy-build ansible-galaxy collection build --output-path "$tmp/dist" . || { fail "ansible-galaxy collection build"; return 1; }
    [ -f "$tarball" ] || { fail "no $tarball"; return 1; }
    ok "built $(basename "$tarball") ($(du -k "$tarball" | cut -f1) KiB, $(tar tzf "$tarball" | wc -l) entries)"
    tar tzf "$tarball" >"$log/tarball.txt" || { fail "tar tzf $tarball"; return 1; }
    bad=$(cat "$log/tarball.txt" | grep -E '^(\./)?(\.venv|build|build-[^/]*|demo|\.git|\.cache|\.ruff_cache|\.pytest_cache|tests/output|bench/results)(/|$)|__pycache__|\.pyc$|\.tar\.gz$' | head -5)
    if [ -n "$bad" ]; then fail "the tarball ships files it must not: $bad"; rc=1
    else ok "tarball holds no .venv, build*, demo, .git, caches, tests/output, bench/results, __pycache__"; fi
    for f in MANIFEST.json FILES.json meta/runtime.yml execution-environment.yml meta/execution-environment.yml meta/ee-requirements.txt \
        meta/ee-bindep.txt plugins/modules/sqlite_backup.py roles/backup/meta/argument_specs.yml playbooks/deploy.yml \
        playbooks/vars/app.yml changelogs/config.yaml; do
        grep -qx "$f" "$log/tarball.txt" || { fail "the tarball lacks $f"; rc=1; }
    done
    rm -rf "$installed"; mkdir -p "$installed"
    # Only the empty path is configured: otherwise galaxy finds the build/ copy and installs nothing.
    ANSIBLE_COLLECTIONS_PATH="$installed" run_quiet galaxy-install ansible-galaxy collection install -p "$installed" "$tarball" || { fail "ansible-galaxy collection install"; return 1; }
    [ -f "$installed/ansible_collections/runbook/sqlite_app/MANIFEST.json" ] || { fail "install left no MANIFEST.json"; return 1; }
    ok "installed into an empty collections path ($installed)"
    # A playbook by FQCN from the installed copy only. sqlite_app_schedule=false: no timers or cron
    # entries on the machine running the tests; databases: none, so the deploy stays within data_dir,
    # secrets and the summary (the awx check runs the database roles).
    if ANSIBLE_COLLECTIONS_PATH="$installed" ansible-playbook -i examples/demo/inventory.yml runbook.sqlite_app.deploy \
        -e "sqlite_app_root=$app" -e "sqlite_app_user=$(id -un)" -e "sqlite_app_group=$(id -gn)" \
        -e sqlite_app_schedule=false -e '{"sqlite_app_databases": [], "sqlite_app_secrets": [{"name": "HMAC_SECRET"}]}' \
        >"$log/release-deploy.log" 2>&1; then
        grep -qx "# $installed/ansible_collections" <(ANSIBLE_COLLECTIONS_PATH="$installed" \
            ansible-galaxy collection list runbook.sqlite_app 2>/dev/null) || { fail "collection list does not show the installed copy"; rc=1; }
        [ "$(stat -c %a "$app/.data/.env")" = 600 ] && grep -q '^HMAC_SECRET=' "$app/.data/.env" \
            || { fail "deploy left no 0600 .env with HMAC_SECRET"; rc=1; }
        ok "ansible-playbook runbook.sqlite_app.deploy from the installed copy: $(grep -E '^localhost +:' "$log/release-deploy.log" | tr -s ' ')"
    else
        fail "ansible-playbook runbook.sqlite_app.deploy from the installed copy"; tail -30 "$log/release-deploy.log"; rc=1
    fi
    return $rc
}

# runner_artifacts DIR PLAYBOOK [IDENT]: what AWX reads after a job, from ansible-runner's artifacts directory:
# status successful, rc 0, and a playbook_on_stats event with no failures or unreachable hosts.
runner_artifacts() {
    "$python" - "$1" "$2" "${3:-}" <<'PY'
import glob, json, os, sys
art, pb, ident = sys.argv[1], sys.argv[2], sys.argv[3]
if ident:
    pb = "%s.yml (ident %s)" % (pb, ident)
else:
    pb += ".yml"
def read(name):
    try:
        return open(os.path.join(art, name)).read().strip()
    except OSError as exc:
        return "(missing: %s)" % exc.strerror
status, rc = read("status"), read("rc")
events = sorted(glob.glob(os.path.join(art, "job_events", "*.json")))
stats = None
for path in events:
    event = json.load(open(path))
    if event.get("event") == "playbook_on_stats":
        stats = event["event_data"]
problems = []
if status != "successful":
    problems.append("status %s" % status)
if rc != "0":
    problems.append("rc %s" % rc)
if stats is None:
    problems.append("no playbook_on_stats event")
else:
    for key in ("failures", "dark"):
        if stats.get(key):
            problems.append("%s %s" % (key, stats[key]))
    if not stats.get("ok"):
        problems.append("no ok task")
if problems:
    stdout = read("stdout").splitlines()
    print("  FAIL: ansible-runner %s: %s" % (pb, "; ".join(problems)))
    print("\n".join("  | " + line for line in stdout[-40:]))
    sys.exit(1)
hosts = " ".join("%s ok=%s changed=%s" % (h, n, stats.get("changed", {}).get(h, 0)) for h, n in sorted(stats["ok"].items()))
print("  ok: ansible-runner %s: status successful, rc 0, playbook_on_stats %s, no failures (%d job events)"
      % (pb, hosts, len(events)))
PY
}

# 3. AWX the way AWX runs it: ansible-runner, a private data dir, the examples/awx wrappers ---------
runner_dir="$tmp/runner"
check_awx() {
    local rc=0 pb ident app="$tmp/awx-app" colls="$installed"
    [ -f "$colls/ansible_collections/runbook/sqlite_app/MANIFEST.json" ] || colls="$root/build"
    # Nothing made by hand: the deploy runs without schedules (no timers here), so the backup and
    # maintenance jobs must create their destination and metrics directory themselves, the drill its
    # scratch directory.
    mkdir -p "$runner_dir"/{env,inventory,project}
    cp examples/awx/*.yml "$runner_dir/project/"
    # The sample app's database, with rows, before the first deploy (deploy puts it in WAL mode).
    mkdir -p "$app/.data"
    SAMPLE_APP_DATA_DIR="$app/.data" "$python" examples/sample_app/sample_app.py migrate >"$log/sample-migrate.log" 2>&1 \
        || { fail "sample_app.py migrate"; cat "$log/sample-migrate.log"; return 1; }
    "$python" - "$app/.data/app.db" <<'PY' || return 1
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("CREATE TABLE IF NOT EXISTS ecosystem_rows (id INTEGER PRIMARY KEY, note TEXT)")
db.executemany("INSERT INTO ecosystem_rows (note) VALUES (?)", [("row %d" % i,) for i in range(200)])
db.commit()
db.execute("PRAGMA journal_mode=DELETE")
PY
    cat >"$runner_dir/inventory/hosts" <<EOF
[apps]
localhost ansible_connection=local ansible_python_interpreter=$python
EOF
    "$python" - "$runner_dir/env/extravars" <<EOF || return 1
import json, sys
json.dump({
    "sqlite_app_name": "eco-app",
    "sqlite_app_root": "$app",
    "sqlite_app_user": "$(id -un)",
    "sqlite_app_group": "$(id -gn)",
    "sqlite_app_manage_user": False,
    "sqlite_app_data_subdirs": ["certs", "backups", "artifacts"],
    "sqlite_app_databases": ["app.db"],
    "sqlite_app_secrets": [{"name": "HMAC_SECRET", "max_age_days": 90}],
    "sqlite_app_service": False,
    "sqlite_app_schedule": False,
    "sqlite_app_backup_dest": "$tmp/backups",
    "backup_owner": "$(id -un)",
    "backup_group": "$(id -gn)",
    "backup_metrics_file": "$tmp/textfile/runbook_backup_eco-app.prom",
    "maintenance_metrics_file": "$tmp/textfile/runbook_maintenance_eco-app.prom",
    "tls_metrics_file": "$tmp/textfile/runbook_tls_eco-app.prom",
    "sqlite_app_dr_drill_dir": "$tmp/drill",
}, open(sys.argv[1], "w"), indent=1)
EOF
    cat >"$runner_dir/env/envvars" <<EOF
---
ANSIBLE_COLLECTIONS_PATH: "$colls"
ANSIBLE_NOCOLOR: "1"
ANSIBLE_DISPLAY_SKIPPED_HOSTS: "false"
EOF
    # AWX runs jobs without a terminal; a prompt would hang: fail after 10 minutes instead.
    printf -- '---\njob_timeout: 600\nidle_timeout: 300\n' >"$runner_dir/env/settings"
    # Every runbook that can run on this machine without systemd services: upgrade and the in-place
    # and fresh-host recoveries need a running service and more hosts (molecule/runbook runs them).
    for pb in deploy backup maintenance rotate_secrets renew_certs drill; do
        ident="eco-$pb"
        run_quiet "runner-$pb" ansible-runner run "$runner_dir" -p "$pb.yml" --ident "$ident" || true
        runner_artifacts "$runner_dir/artifacts/$ident" "$pb" || rc=1
    done
    # What the runs left behind, read back.
    [ "$(sqlite3 "$app/.data/app.db" 'PRAGMA journal_mode;' 2>/dev/null || "$python" -c \
        "import sqlite3,sys;print(sqlite3.connect(sys.argv[1]).execute('PRAGMA journal_mode').fetchone()[0])" "$app/.data/app.db")" = wal ] \
        && ok "deploy put app.db back in WAL mode" || { fail "app.db is not in WAL mode after deploy"; rc=1; }
    ls "$tmp/backups"/eco-app-*.tar* >/dev/null 2>&1 && ok "backup wrote $(ls "$tmp/backups" | grep -vc sha256) set(s) into $tmp/backups" \
        || { fail "no backup set in $tmp/backups"; rc=1; }
    grep -q 'ecosystem_rows\\": 200' "$runner_dir/artifacts/eco-drill/stdout" 2>/dev/null \
        && ok "drill reported 200 rows in ecosystem_rows" || { fail "drill did not report ecosystem_rows: 200"; rc=1; }
    [ ! -e "$tmp/drill" ] && ok "drill removed its scratch directory" || { fail "drill left $tmp/drill"; rc=1; }
    return $rc
}

# 3a. encryption at rest through the runbooks: the backup role encrypts to an age recipient, the
# drill decrypts with an identity file, a wrong identity is refused. Reuses the awx check's app.
check_encryption() {
    local rc=0 enc="$tmp/enc" extra="$runner_dir/env/extravars" set_path out
    [ -f "$extra" ] || { fail "runs after the awx check (its app and extra vars)"; return 1; }
    mkdir -p "$enc"
    age-keygen -o "$enc/identity" 2>/dev/null && age-keygen -o "$enc/other" 2>/dev/null \
        || { fail "age-keygen"; return 1; }
    local recipient
    recipient=$(age-keygen -y "$enc/identity")
    printf '{"backup_encrypt_recipients": ["%s"], "sqlite_app_backup_dest": "%s", "sqlite_app_dr_drill_dir": "%s"}\n' \
        "$recipient" "$enc/backups" "$enc/drill" >"$enc/vars.json"
    local inv=(-i "localhost," -c local -e "ansible_python_interpreter=$python" -e "@$extra" -e "@$enc/vars.json")
    run_quiet enc-backup ansible-playbook "${inv[@]}" runbook.sqlite_app.backup || return 1
    set_path=$(ls "$enc/backups"/eco-app-*.age 2>/dev/null | head -n 1)
    [ -n "$set_path" ] && ok "backup role wrote an encrypted set ($(basename "$set_path"))" \
        || { fail "no .age set in $enc/backups"; return 1; }
    head -c 21 "$set_path" | grep -q '^age-encryption.org/v1' && ! tar -tf "$set_path" >/dev/null 2>&1 \
        && ok "the set is an age stream, not readable as a tar without the identity" \
        || { fail "$set_path is not an age stream"; rc=1; }
    (cd "$enc/backups" && sha256sum --check --strict --quiet "$(basename "$set_path").sha256") \
        && ok "its sidecar checks with sha256sum" || { fail "sidecar of $set_path"; rc=1; }
    run_quiet enc-drill ansible-playbook "${inv[@]}" -e sqlite_app_dr_mode=drill \
        -e "sqlite_app_restore_identity_file=$enc/identity" runbook.sqlite_app.disaster_recovery || rc=1
    grep -q 'ecosystem_rows\\": 200' "$log/enc-drill.log" && grep -q 'verified=True' "$log/enc-drill.log" \
        && ok "drill with the identity file decrypted, verified and counted 200 rows" \
        || { fail "drill of the encrypted set (log: $log/enc-drill.log)"; rc=1; }
    if ansible-playbook "${inv[@]}" -e sqlite_app_dr_mode=drill -e "sqlite_app_restore_identity_file=$enc/other" \
        runbook.sqlite_app.disaster_recovery >"$log/enc-wrong.log" 2>&1; then
        fail "a drill with the wrong identity succeeded"; rc=1
    else
        out=$(grep -o 'no identity matched[^"]*\|identity[^"]*does not decrypt[^"]*\|cannot decrypt[^"]*' "$log/enc-wrong.log" | head -n 1)
        [ -n "$out" ] && ok "the wrong identity is refused: $out" \
            || { fail "wrong identity: no clear message (log: $log/enc-wrong.log)"; tail -n 15 "$log/enc-wrong.log"; rc=1; }
    fi
    [ ! -e "$enc/drill" ] && ok "no scratch directory left behind" || { fail "$enc/drill left behind"; rc=1; }
    return $rc
}

# 3b. upgrade and disaster recovery the way AWX runs them, against systemd containers -------------
# The awx check runs on this machine, which has no systemd service to upgrade and no second host.
# Here three lab containers (tools/lab-image.sh) are the inventory, reached with the docker
# connection: an app host, a store host for the off-host copy, and a fresh host for fresh_host.
# Containers are runbook-eco-<role>-<pid>: other checks' and molecule's names never collide.
# app_get CONTAINER PATH: the sample app's JSON answer, from inside the container (network none).
app_get() { docker exec "$1" curl -sf "http://127.0.0.1:8080$2"; }
app_bodies() {
    app_get "$1" /items | "$python" -c 'import json,sys; print(" ".join(sorted(i["body"] for i in json.load(sys.stdin))))'
}
check_awx_hosts() {
    # build/ (the tree molecule uses), not the release check's install: this check may run alongside it.
    local rc=0 run="$tmp/runner-hosts" dist="$tmp/dist-app" colls="$root/build" c role
    local image="${RUNBOOK_LAB_IMAGE:-runbook-sqlite-app-lab:bookworm-2}"
    { bash tools/dockerd.sh && bash tools/lab-image.sh; } >"$log/lab.log" 2>&1 \
        || { fail "docker or the lab image is not available"; tail -5 "$log/lab.log"; return 1; }
    declare -A ctr=()
    for role in app store fresh; do
        c="runbook-eco-$role-$$"
        ctr[$role]=$c
        docker rm -f "$c" >/dev/null 2>&1 || true
        # The flags of .config/molecule/config.yml: systemd as PID 1 without --privileged, no network.
        docker run -d --name "$c" --hostname "eco-$role" --cap-add SYS_ADMIN --security-opt seccomp=unconfined \
            --cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /tmp --network none \
            "$image" /lib/systemd/systemd >"$log/docker-run-$role.log" 2>&1 \
            || { fail "docker run $c"; cat "$log/docker-run-$role.log"; remove_containers; return 1; }
    done
    # The release archives, built the way molecule/runbook's prepare builds them; meanwhile systemd boots.
    for v in 1 2; do
        bash examples/sample_app/make-release.sh "$v" "$dist" >>"$log/make-release.log" 2>&1 \
            || { fail "make-release.sh $v"; cat "$log/make-release.log"; remove_containers; return 1; }
    done
    for role in app store fresh; do
        local state="" i
        for i in $(seq 1 60); do
            state=$(docker exec "${ctr[$role]}" busctl get-property org.freedesktop.systemd1 /org/freedesktop/systemd1 \
                org.freedesktop.systemd1.Manager SystemState 2>/dev/null)
            [[ $state == 's "running"' || $state == 's "degraded"' ]] && break
            sleep 1
        done
        [[ $state == 's "running"' || $state == 's "degraded"' ]] \
            || { fail "systemd in ${ctr[$role]} is '$state' after 60 s"; remove_containers; return 1; }
    done
    ok "containers ${ctr[app]}, ${ctr[store]}, ${ctr[fresh]} up with systemd"

    # The private data dir AWX writes for a job: the project (examples/awx), the inventory (AWX's
    # inventory with its group vars), env/ (the job's extra vars, its environment, its settings).
    mkdir -p "$run"/{env,inventory,project}
    cp -r examples/awx/*.yml "$run/project/"
    cat >"$run/inventory/hosts.yml" <<INV
all:
  vars:
    # docker_api talks to the engine's API: no docker CLI process per task.
    ansible_connection: community.docker.docker_api
    ansible_python_interpreter: /usr/bin/python3
    sqlite_app_name: ecoapp
    sqlite_app_root: /srv/ecoapp
    sqlite_app_data_subdirs: [certs, artifacts]
    sqlite_app_databases: [app.db]
    sqlite_app_secrets:
      - {name: HMAC_SECRET, format: hex, bytes: 32, max_age_days: 90}
    sqlite_app_tls: false
    app_exec: /usr/bin/python3 /srv/ecoapp/current/sample_app.py serve
    app_migrate_command: /usr/bin/python3 /srv/ecoapp/current/sample_app.py migrate
    app_migrate_unchanged_regex: nothing to migrate
    app_migrate_on_deploy: true
    app_health_retries: 10
    backup_keep_last: 5
  children:
    apps:
      hosts:
        eco-app: {ansible_host: ${ctr[app]}, backup_offhost_host: eco-store}
    store:
      hosts:
        eco-store: {ansible_host: ${ctr[store]}}
    fresh:
      hosts:
        eco-fresh: {ansible_host: ${ctr[fresh]}}
INV
    cat >"$run/env/envvars" <<ENV
---
ANSIBLE_COLLECTIONS_PATH: "$colls"
ANSIBLE_NOCOLOR: "1"
ANSIBLE_PIPELINING: "1"
ANSIBLE_DISPLAY_SKIPPED_HOSTS: "false"
ENV
    printf -- '---\njob_timeout: 600\nidle_timeout: 300\n' >"$run/env/settings"
    # job DIR PLAYBOOK IDENT JSON: one AWX job in private data dir DIR: its extra vars (template vars
    # and survey answers) are env/extravars; then the artifacts are read.
    job() {
        printf '%s\n' "$4" >"$1/env/extravars"
        run_quiet "runner-$3" ansible-runner run "$1" -p "$2" --ident "$3" || true
        runner_artifacts "$1/artifacts/$3" "${2%.yml}" "$3"
    }
    stats() { app_get "$1" /stats | "$python" -c 'import json,sys;d=json.load(sys.stdin);print(d["version"], d["schema"], d["items"])'; }
    local v1="{\"sqlite_app_hosts\": \"apps\", \"app_version\": \"1\", \"app_archive_src\": \"$dist/sample-app-1.tar.gz\"}"
    local v2="{\"sqlite_app_hosts\": \"apps\", \"app_version\": \"2\", \"app_archive_src\": \"$dist/sample-app-2.tar.gz\"}"
    local got want n

    # deploy release 1, then data through the app.
    if job "$run" deploy.yml eco-hosts-deploy "$v1" && [ "$(stats "${ctr[app]}" | cut -d' ' -f1)" = 1 ]; then
        for n in 1 2 3; do
            docker exec "${ctr[app]}" curl -sf -X POST -H 'Content-Type: application/json' \
                -d "{\"body\": \"row-$n\"}" http://127.0.0.1:8080/items >/dev/null || { fail "POST /items"; rc=1; }
        done
        ok "deploy: release 1 answers on the app host; 3 rows written through the app"
    else
        fail "deploy of release 1 (the other jobs need it)"; remove_containers; return 1
    fi

    # An encrypted upgrade that could not be rolled back (no identity to read the pre-upgrade set):
    # the preflight refuses it before the backup, so no set is written and release 1 keeps serving.
    local recipient sets_before
    recipient=$(age-keygen 2>/dev/null | sed -n 's/^# public key: //p')
    sets_before=$(docker exec "${ctr[app]}" sh -c 'ls -A /var/backups/ecoapp 2>/dev/null')
    printf '{"sqlite_app_hosts": "apps", "app_version": "2", "app_archive_src": "%s", "backup_encrypt_recipients": ["%s"]}\n' \
        "$dist/sample-app-2.tar.gz" "$recipient" >"$run/env/extravars"
    ansible-runner run "$run" -p upgrade.yml --ident eco-hosts-upgrade-no-identity >"$log/runner-upgrade-no-identity.log" 2>&1
    got=$(cat "$run/artifacts/eco-hosts-upgrade-no-identity/status" 2>/dev/null)
    if [ -n "$recipient" ] && [ "$got" = failed ] \
        && grep -q 'give sqlite_app_restore_identity_file' "$run/artifacts/eco-hosts-upgrade-no-identity/stdout" \
        && [ "$(stats "${ctr[app]}" | cut -d' ' -f1)" = 1 ] \
        && [ "$(docker exec "${ctr[app]}" sh -c 'ls -A /var/backups/ecoapp 2>/dev/null')" = "$sets_before" ]; then
        ok "upgrade with backup_encrypt_recipients and no identity: refused by the preflight, no set written, release 1 still serves"
    else
        fail "upgrade without an identity for its encrypted set: status '$got' (log: $log/runner-upgrade-no-identity.log)"
        tail -n 20 "$run/artifacts/eco-hosts-upgrade-no-identity/stdout" 2>/dev/null | sed 's/^/  | /'
        rc=1
    fi

    # upgrade to 2: migration to schema 2, data kept.
    want=$(app_bodies "${ctr[app]}")
    if job "$run" upgrade.yml eco-hosts-upgrade "$v2"; then
        got=$(stats "${ctr[app]}")
        [ "$got" = "2 2 3" ] && [ "$(app_bodies "${ctr[app]}")" = "$want" ] \
            && ok "upgrade: version 2, schema 2, the 3 rows kept" || { fail "after upgrade: version schema items = '$got'"; rc=1; }
    else
        rc=1
    fi

    # backup with the off-host copy on the store host.
    if job "$run" backup.yml eco-hosts-backup '{"sqlite_app_hosts": "apps"}'; then
        got=$(docker exec "${ctr[store]}" sh -c 'cd /var/backups/ecoapp && for s in *.sha256; do sha256sum --check --strict "$s" >/dev/null && echo "${s%.sha256}"; done' 2>/dev/null)
        [ -n "$got" ] && ok "backup: the off-host copy on the store host passes sha256sum --check: $(echo $got)" \
            || { fail "no verified set on ${ctr[store]}:/var/backups/ecoapp"; rc=1; }
    else
        rc=1
    fi

    # The two recoveries touch different hosts, so they run at once, each in its own private data dir
    # (as two AWX jobs would). in_place: a write made after the backup must be gone afterwards.
    # fresh_host: the fresh container gets release 2 and the off-host set; no timers there
    # (sqlite_app_schedule=false: the deploy job installed them once, molecule/runbook's recovery does too).
    docker exec "${ctr[app]}" curl -sf -X POST -H 'Content-Type: application/json' \
        -d '{"body": "bad-write"}' http://127.0.0.1:8080/items >/dev/null || { fail "POST /items"; rc=1; }
    mkdir -p "$run-fresh"
    cp -r "$run/env" "$run/inventory" "$run/project" "$run-fresh/"
    job "$run" disaster_recovery.yml eco-hosts-dr-in-place \
        '{"sqlite_app_hosts": "apps", "sqlite_app_dr_mode": "in_place"}' >"$log/job-in-place.out" 2>&1 &
    local in_place_pid=$!
    job "$run-fresh" disaster_recovery.yml eco-hosts-dr-fresh-host "{\"sqlite_app_hosts\": \"fresh\",
        \"sqlite_app_dr_mode\": \"fresh_host\", \"sqlite_app_dr_source_host\": \"eco-store\",
        \"sqlite_app_dr_stage\": \"$tmp/dr-stage\", \"sqlite_app_schedule\": false, \"app_version\": \"2\",
        \"app_archive_src\": \"$dist/sample-app-2.tar.gz\"}" >"$log/job-fresh-host.out" 2>&1
    local fresh_rc=$?
    wait "$in_place_pid"
    local in_place_rc=$?
    cat "$log/job-in-place.out"
    if [ "$in_place_rc" = 0 ]; then
        [ "$(app_bodies "${ctr[app]}")" = "$want" ] && ok "disaster_recovery in_place: the backup's rows ($want) are back, bad-write is gone" \
            || { fail "after in_place: rows '$(app_bodies "${ctr[app]}")', want '$want'"; rc=1; }
    else
        rc=1
    fi
    cat "$log/job-fresh-host.out"
    if [ "$fresh_rc" = 0 ]; then
        got=$(stats "${ctr[fresh]}")
        [ "$got" = "2 2 3" ] && [ "$(app_bodies "${ctr[fresh]}")" = "$want" ] \
            && ok "disaster_recovery fresh_host: the fresh host serves version 2 with the backup's rows ($want)" \
            || { fail "after fresh_host: version schema items = '$got', rows '$(app_bodies "${ctr[fresh]}")', want '$want'"; rc=1; }
    else
        rc=1
    fi
    remove_containers
    return $rc
}

# 4. Metrics: the textfiles parse, the alert rules use only emitted names -------------------------
check_metrics() {
    local rc=0
    "$python" - "$tmp/textfile" examples/prometheus/alerts.yml <<'PY' || rc=1
import glob, os, re, sys
import yaml
from prometheus_client.parser import text_string_to_metric_families

textfile_dir, rules_path = sys.argv[1], sys.argv[2]
rc = 0
def fail(msg):
    global rc
    rc = 1
    print("  FAIL: " + msg)

# Names we emit: every "runbook_..." string literal in plugins/module_utils, and the metric lines
# the roles write themselves (the tls role's certificate expiry).
emitted = set()
for path in glob.glob("plugins/module_utils/_*.py"):
    emitted |= set(re.findall(r'"(runbook_[a-z0-9_]+)"', open(path).read()))
for path in glob.glob("roles/*/tasks/*.yml"):
    emitted |= set(re.findall(r"# TYPE (runbook_[a-z0-9_]+) ", open(path).read()))
# Names from exporters other than ours, each with the reason it is allowed (none today).
external = {}
print("  ok: engines emit %d metric names: %s" % (len(emitted), ", ".join(sorted(emitted))))

# The files the awx check's backup and maintenance runs wrote, parsed as Prometheus does.
seen = set()
for path in sorted(glob.glob(os.path.join(textfile_dir, "*.prom"))):
    try:
        families = list(text_string_to_metric_families(open(path).read()))
    except Exception as exc:  # noqa: BLE001 - the parser raises plain ValueError and friends
        fail("%s does not parse: %s" % (path, exc))
        continue
    names = {s.name for f in families for s in f.samples}
    seen |= names
    if oct(os.stat(path).st_mode & 0o777) != "0o644":
        fail("%s is not 0644 (node_exporter must read it)" % path)
    print("  ok: %s parses: %s" % (os.path.basename(path), ", ".join(sorted(names))))
for want in ("runbook_sqlite_backup_last_success_timestamp_seconds", "runbook_sqlite_maintenance_check_ok"):
    if want not in seen:
        fail("no run wrote %s (did the awx check run?)" % want)
if seen - emitted:
    fail("metrics written but not found in the engines' source: %s" % sorted(seen - emitted))

# The rules file: Prometheus rule-file structure, and every metric name in each expr.
doc = yaml.safe_load(open(rules_path))
keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
alerts = []
for group in doc.get("groups") or fail("no groups") or []:
    if not isinstance(group.get("name"), str) or not group.get("rules"):
        fail("group without name or rules: %r" % group)
        continue
    for rule in group["rules"]:
        name = rule.get("alert")
        unknown = set(rule) - {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
        if not name or not isinstance(rule.get("expr"), str) or unknown:
            fail("bad rule %r (needs alert and expr; unknown keys %s)" % (name, sorted(unknown)))
            continue
        if "for" in rule and not re.fullmatch(r"(\d+[smhdwy])+", str(rule["for"])):
            fail("%s: bad for %r" % (name, rule["for"]))
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            fail("%s: labels.severity must be critical, warning or info" % name)
        if not rule.get("annotations", {}).get("summary"):
            fail("%s: no annotations.summary" % name)
        expr = rule["expr"]
        if expr.count("(") != expr.count(")"):
            fail("%s: unbalanced parentheses" % name)
        bare = re.sub(r'"(?:\\.|[^"\\])*"', "", expr)
        bare = re.sub(r"\{[^}]*\}", "", bare)
        bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
        # identifiers not followed by "(" (functions) and not keywords; digits-led tokens are numbers
        used = [m.group(1) for m in re.finditer(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", bare)
                if not m.group(2) and m.group(1) not in keywords]
        if not used:
            fail("%s: no metric in expr %r" % (name, expr))
        for tok in used:
            if tok not in emitted and tok not in external:
                fail("%s: expr uses %s, which no engine emits" % (name, tok))
        alerts.append("%s(%s)" % (name, ",".join(used)))
for want in ("runbook_sqlite_backup_last_success_timestamp_seconds", "runbook_sqlite_maintenance_check_ok"):
    if want not in open(rules_path).read():
        fail("no alert uses %s" % want)
if "runbook_sqlite_tls_not_after_timestamp_seconds" not in open(rules_path).read():
    fail("no certificate expiry alert")
print("  ok: %s: %d alerts, structure and metric names checked: %s"
      % (rules_path, len(alerts), "; ".join(alerts)))
sys.exit(rc)
PY
    # Prometheus' own parser and rule evaluation (.ci/run installs Debian's prometheus package).
    if ! command -v promtool >/dev/null 2>&1; then
        fail "promtool not found: apt-get install prometheus (Debian's package ships it), or run .ci/run"
        return 1
    fi
    if run_quiet promtool-check promtool check rules examples/prometheus/alerts.yml; then
        ok "promtool check rules examples/prometheus/alerts.yml: $(grep -o 'SUCCESS.*' "$log/promtool-check.log")"
    else
        fail "promtool check rules examples/prometheus/alerts.yml"; rc=1
    fi
    # Unit tests: series under the engines' metric names; each alert fires when it must, not before.
    if run_quiet promtool-test promtool test rules examples/prometheus/alerts_test.yml; then
        ok "promtool test rules examples/prometheus/alerts_test.yml: $(grep -c 'alertname:' examples/prometheus/alerts_test.yml) alert evaluations pass ($(promtool --version 2>&1 | head -1 | cut -d' ' -f1-3))"
    else
        fail "promtool test rules examples/prometheus/alerts_test.yml"; rc=1
    fi
    return $rc
}

# 5. Execution environment ------------------------------------------------------------------------
check_ee() {
    local rc=0 ctx="$tmp/ee-context" coll="$installed/ansible_collections/runbook/sqlite_app" consumer="$tmp/ee-consumer"
    run_quiet ee-create ansible-builder create -f execution-environment.yml -c "$ctx" \
        || { fail "ansible-builder create -f execution-environment.yml"; return 1; }
    [ -f "$ctx/Containerfile" ] || [ -f "$ctx/Dockerfile" ] || { fail "no Containerfile/Dockerfile in $ctx"; return 1; }
    grep -qx "cryptography>=41.0" "$ctx/_build/requirements.txt" || { fail "cryptography not in the EE's requirements"; rc=1; }
    for pkg in sqlite3 zstd age; do
        grep -q "^$pkg " "$ctx/_build/bindep.txt" || { fail "$pkg not in the EE's bindep"; rc=1; }
    done
    grep -q "runbook.sqlite_app" "$ctx/_build/requirements.yml" || { fail "runbook.sqlite_app not in the EE's collections"; rc=1; }
    [ $rc = 0 ] && ok "ansible-builder $(ansible-builder --version) create -f execution-environment.yml: context with cryptography, sqlite3, zstd, age, runbook.sqlite_app"
    # Another team's EE that lists runbook.sqlite_app in its galaxy requirements: ansible-builder
    # introspects the installed collection (its meta/execution-environment.yml, paths relative to the
    # collection root) and must find our Python and system dependencies. The installed copy comes
    # from the release check's tarball; standalone, from build/.
    [ -f "$coll/MANIFEST.json" ] || coll="$root/build/ansible_collections/runbook/sqlite_app"
    rm -rf "$consumer"; mkdir -p "$consumer/ansible_collections/runbook"
    cp -r "$coll" "$consumer/ansible_collections/runbook/sqlite_app"
    if run_quiet ee-introspect ansible-builder introspect "$consumer" \
        --write-pip "$tmp/ee-introspect-requirements.txt" --write-bindep "$tmp/ee-introspect-bindep.txt"; then
        local missing=()
        grep -q "^cryptography>=41.0.*runbook.sqlite_app" "$tmp/ee-introspect-requirements.txt" || missing+=(cryptography)
        for pkg in sqlite3 zstd age; do
            grep -q "^$pkg .*runbook.sqlite_app" "$tmp/ee-introspect-bindep.txt" || missing+=("$pkg")
        done
        if [ ${#missing[@]} = 0 ]; then
            ok "ansible-builder introspect of the installed collection finds cryptography, sqlite3, zstd, age"
        else
            fail "ansible-builder introspect of the installed collection lacks ${missing[*]}"; rc=1
        fi
    else
        fail "ansible-builder introspect of the installed collection (a consumer's EE build would stop here)"; rc=1
    fi
    return $rc
}

# 6. AWX configuration as code --------------------------------------------------------------------
check_awx_code() {
    local rc=0 f
    ANSIBLE_COLLECTIONS_PATH="$root/build" run_quiet awx-syntax ansible-playbook --syntax-check examples/awx/configure_awx.yml \
        && ok "ansible-playbook --syntax-check examples/awx/configure_awx.yml (awx.awx from the venv's ansible package)" \
        || { fail "syntax-check configure_awx.yml"; rc=1; }
    for f in examples/awx/*.yml; do
        [ "$f" = examples/awx/configure_awx.yml ] && continue
        ANSIBLE_COLLECTIONS_PATH="$root/build" run_quiet "awx-syntax-$(basename "$f")" \
            ansible-playbook --syntax-check -i examples/awx/inventory/hosts.yml "$f" || { fail "syntax-check $f"; rc=1; }
    done
    [ $rc = 0 ] && ok "syntax-check of every wrapper playbook in examples/awx"
    # ansible-lint --profile production covers examples/awx in the lint stage (90 s of start-up here);
    # RUNBOOK_ECOSYSTEM_LINT=1 runs it here too.
    if [ "${RUNBOOK_ECOSYSTEM_LINT:-0}" = 1 ]; then
        ANSIBLE_COLLECTIONS_PATH="$root/build" run_quiet awx-lint ansible-lint --profile production --offline examples/awx \
            && ok "ansible-lint --profile production examples/awx" || { fail "ansible-lint examples/awx"; rc=1; }
    fi
    "$python" - <<'PY' || rc=1
import sys
import yaml
play = yaml.safe_load(open("examples/awx/configure_awx.yml"))[0]
names = [s["name"] for s in play["vars"]["awx_schedules"]]
want = ["nightly backup", "weekly maintenance", "quarterly restore drill", "secret rotation every 90 days"]
missing = [w for w in want if not any(w in n for n in names)]
survey = play["vars"]["awx_dr_survey"]["spec"]
if missing or not any(q["variable"] == "sqlite_app_dr_mode" for q in survey):
    sys.exit("  FAIL: schedules missing %s or no sqlite_app_dr_mode survey question" % missing)
req = yaml.safe_load(open("examples/awx/collections/requirements.yml"))
if "runbook.sqlite_app" not in [c["name"] for c in req["collections"]]:
    sys.exit("  FAIL: examples/awx/collections/requirements.yml lacks runbook.sqlite_app")
print("  ok: %d schedules (%s), a %d-question DR survey, collections/requirements.yml"
      % (len(names), "; ".join(names), len(survey)))
PY
    return $rc
}

# 7. Argument specs: one playbook run, every case a role included with one bad variable ------------
check_argspec() {
    local n
    if ! ansible-playbook -i localhost, -c local tests/ecosystem/argspec.yml >"$log/argspec.log" 2>&1; then
        # The rescued validation failures print their whole spec: show the cases' verdicts only.
        grep -oE '"msg": "[a-z_]+: expected ([^"\\]|\\.)*' "$log/argspec.log" | sort -u | cut -c9-400 | sed 's/^/  | /'
        grep -q '"msg": "[a-z_]*: expected ' "$log/argspec.log" || tail -n 20 "$log/argspec.log" | cut -c1-300 | sed 's/^/  | /'
        fail "tests/ecosystem/argspec.yml: a bad variable did not fail its entry point's argument validation first"
        return 1
    fi
    n=$(grep -c '"msg": "[a-z_]*: .* validation failed first: ' "$log/argspec.log")
    ok "tests/ecosystem/argspec.yml: $n cases, each failed first in its entry point's argument validation, naming the variable"
}

# 8. Output for people: does each runbook end with a summary? (report only: playbooks/ is not ours)
check_summary() {
    "$python" - "${playbooks[@]}" <<'PY'
import os, sys
import yaml
def last_task(tasks, base):
    task = tasks[-1]
    for key in ("ansible.builtin.import_tasks", "import_tasks", "ansible.builtin.include_tasks", "include_tasks"):
        if key in task:
            path = os.path.join(base, task[key])
            return last_task(yaml.safe_load(open(path)), os.path.dirname(path))
    return task
lacking = []
for name in sys.argv[1:]:
    play = yaml.safe_load(open("playbooks/%s.yml" % name))[-1]
    tasks = play.get("post_tasks") or play.get("tasks") or []
    task = last_task(tasks, "playbooks") if tasks and not (play.get("roles") and not play.get("post_tasks")) else {}
    label = task.get("name", "")
    if any(word in label.lower() for word in ("summary", "report")):
        print("  ok: %s ends with %r" % (name, label))
    else:
        lacking.append(name)
        print("  NOTE: %s does not end with a summary task (last: %r)" % (name, label or "a role"))
print("  playbooks without a closing summary: %s" % (", ".join(lacking) or "none"))
PY
}

echo "ecosystem: runbook.sqlite_app $version, $(ansible --version 2>/dev/null | sed -n 1p), temp $tmp"
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(docs release awx encryption awx-hosts metrics ee awx-code argspec summary)
# awx-hosts mostly waits on containers (docker round trips, systemd, health retries): it runs in the
# background while the other checks run, its output shown when it ends. RUNBOOK_ECOSYSTEM_SERIAL=1
# runs every check in turn.
bg_pid=""
if [ "${RUNBOOK_ECOSYSTEM_SERIAL:-0}" != 1 ] && [ ${#checks[@]} -gt 1 ] && printf '%s\n' "${checks[@]}" | grep -qx awx-hosts; then
    echo "--- awx-hosts: started in the background"
    ( passed=0 failed=0; check awx-hosts >"$log/check-awx-hosts.out" 2>&1; [ "$failed" = 0 ] ) &
    bg_pid=$!
fi
for c in "${checks[@]}"; do
    [ -n "$bg_pid" ] && [ "$c" = awx-hosts ] && continue
    check "$c"
done
if [ -n "$bg_pid" ]; then
    if wait "$bg_pid"; then passed=$((passed + 1)); else failed=$((failed + 1)); failed_names+=(awx-hosts); fi
    cat "$log/check-awx-hosts.out"
fi
[ "$failed" = 0 ] || echo "failed checks: ${failed_names[*]}"
echo "ecosystem: $passed passed, $failed failed"
[ "$failed" = 0 ]
