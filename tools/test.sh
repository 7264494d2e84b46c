#!/usr/bin/env bash
# Everything CI runs, in one command (make test): lint, sanity, units, integration, reliability,
# ecosystem, compat (ansible-core 2.17/2.18, quick), molecule.
# Stages: pass names to run some (tools/test.sh lint units); default: all.
# Ends with a "test: N passed, N failed" line counting stages.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$root/.venv/bin:$PATH"
export NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint sanity units integration reliability ecosystem compat molecule)

bash tools/venv.sh || exit 1
tree=$(bash tools/collection-tree.sh) || exit 1
export ANSIBLE_COLLECTIONS_PATH="$root/build"

stage_lint() {
    local rc=0
    yamllint -s . || rc=1
    ruff check plugins tests examples bench tools molecule || rc=1
    antsibull-changelog lint || rc=1
    ansible-lint --profile production --offline || rc=1
    return $rc
}
stage_sanity() {
    bash tools/ansible-test-prepare.sh &&
    (cd "$tree" && ansible-test sanity --venv --requirements --python 3.11 --color no)
}
stage_units() {
    (cd "$tree" && ansible-test units --local --python 3.11 --color no)
}
stage_integration() {
    (cd "$tree" && ansible-test integration --local --python 3.11 --color no)
}
stage_reliability() {
    # Faults, bad input, leaks, permissions: tests/reliability (RUNBOOK_SOAK=1 for the long mode).
    (cd "$tree" && PYTHONPATH="$root/build" python -m pytest -q -p no:cacheprovider tests/reliability)
}
stage_ecosystem() {
    # Release hygiene, AWX/ansible-runner, docs and metrics checks: tests/ecosystem/run.sh. Its
    # awx-hosts check runs upgrade and disaster recovery on lab containers: docker and the image first.
    bash tools/dockerd.sh && bash tools/lab-image.sh || return 1
    bash tests/ecosystem/run.sh
}
stage_compat() {
    # Units (engines) and version-sensitive sanity tests on ansible-core 2.17 and 2.18; make compat
    # runs the full units there.
    bash tests/ecosystem/compat.sh --quick
}
stage_molecule() {
    bash tools/dockerd.sh && bash tools/lab-image.sh || return 1
    # Scenarios are independent (own containers, own molecule state): run a few at once. Most of
    # their time is waiting on containers, so 3 at a time on 2 cores finishes sooner than 1.
    local scenarios
    # The multi-host scenarios take longest: start them first.
    scenarios=$(cd molecule && for d in runbook examples */; do [ -f "$d/molecule.yml" ] && echo "${d%/}"; done | awk '!seen[$0]++')
    # A failing scenario appends its name here; the end of the run prints those logs' tails again,
    # because CI shows only the end of the output and compat's log is printed after molecule.
    export RUNBOOK_MOLECULE_FAILED="$root/build/molecule-failed.txt"
    : >"$RUNBOOK_MOLECULE_FAILED"
    printf '%s\n' $scenarios | xargs -P "${RUNBOOK_MOLECULE_JOBS:-3}" -I{} bash tools/molecule-scenario.sh {}
}

passed=0
failed=0
failed_names=()
# compat is pip, pytest and ansible-test on this machine; molecule mostly waits on containers. When
# both are asked for, compat runs in the background during molecule (RUNBOOK_TEST_SERIAL=1: in turn).
compat_bg=0
if [ "${RUNBOOK_TEST_SERIAL:-0}" != 1 ] && printf '%s\n' "${stages[@]}" | grep -qx compat \
    && printf '%s\n' "${stages[@]}" | grep -qx molecule; then
    compat_bg=1
fi
compat_pid=""
compat_log="$root/build/compat-stage.log"
compat_start=0
finish() {  # finish STAGE START RC
    if [ "$3" = 0 ]; then
        passed=$((passed + 1))
        echo "=== $1: ok ($(( $(date +%s) - $2 )) s) ==="
    else
        failed=$((failed + 1))
        failed_names+=("$1")
        echo "=== $1: FAILED ($(( $(date +%s) - $2 )) s) ==="
    fi
}
for stage in "${stages[@]}"; do
    [ "$stage" = compat ] && [ "$compat_bg" = 1 ] && continue
    if [ "$stage" = molecule ] && [ "$compat_bg" = 1 ]; then
        compat_start=$(date +%s)
        echo "=== compat: started in the background during molecule (log: $compat_log) ==="
        stage_compat >"$compat_log" 2>&1 &
        compat_pid=$!
    fi
    start=$(date +%s)
    echo "=== $stage ==="
    "stage_$stage"
    finish "$stage" "$start" $?
done
if [ -n "$compat_pid" ]; then
    wait "$compat_pid"
    rc=$?
    echo "=== compat (background) ==="
    cat "$compat_log"
    finish compat "$compat_start" $rc
fi
if [ -s "$root/build/molecule-failed.txt" ] && printf '%s\n' "${failed_names[@]}" | grep -qx molecule; then
    while read -r name; do
        echo "=== molecule[$name] failed; the end of build/molecule-$name.log before destroy ==="
        cat "$root/build/molecule-$name.failure.txt" 2>/dev/null || tail -n 80 "$root/build/molecule-$name.log"
    done <"$root/build/molecule-failed.txt"
fi
[ "$failed" = 0 ] || echo "failed stages: ${failed_names[*]}"
echo "test: $passed passed, $failed failed"
[ "$failed" = 0 ]
