#!/usr/bin/env bash
# Everything CI runs, in one command (make test): lint, sanity, units, integration, molecule.
# Stages: pass names to run some (tools/test.sh lint units); default: all.
# Ends with a "test: N passed, N failed" line counting stages.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export PATH="$root/.venv/bin:$PATH"
export NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(lint sanity units integration reliability ecosystem molecule)

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
    # Release hygiene, AWX/ansible-runner, docs and metrics checks: tests/ecosystem/run.sh.
    bash tests/ecosystem/run.sh
}
stage_molecule() {
    bash tools/dockerd.sh && bash tools/lab-image.sh || return 1
    # Scenarios are independent (own containers, own molecule state): run a few at once. Most of
    # their time is waiting on containers, so 3 at a time on 2 cores finishes sooner than 1.
    local scenarios
    # The multi-host scenarios take longest: start them first.
    scenarios=$(cd molecule && for d in runbook examples */; do [ -f "$d/molecule.yml" ] && echo "${d%/}"; done | awk '!seen[$0]++')
    printf '%s\n' $scenarios | xargs -P "${RUNBOOK_MOLECULE_JOBS:-3}" -I{} bash tools/molecule-scenario.sh {}
}

passed=0
failed=0
failed_names=()
for stage in "${stages[@]}"; do
    start=$(date +%s)
    echo "=== $stage ==="
    if "stage_$stage"; then
        passed=$((passed + 1))
        echo "=== $stage: ok ($(( $(date +%s) - start )) s) ==="
    else
        failed=$((failed + 1))
        failed_names+=("$stage")
        echo "=== $stage: FAILED ($(( $(date +%s) - start )) s) ==="
    fi
done
[ "$failed" = 0 ] || echo "failed stages: ${failed_names[*]}"
echo "test: $passed passed, $failed failed"
[ "$failed" = 0 ]
