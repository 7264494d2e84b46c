#!/usr/bin/env bash
# Run one molecule scenario: create, prepare, converge, idempotence (changed=0), a check-mode
# converge that must also report changed=0 on the converged host (not for `runbook`, see below),
# verify (testinfra), side-effect (only where the scenario has a side_effect.yml), destroy.
# molecule's own `check` step does not fail on changes, so the recap is read here.
set -uo pipefail
scenario="$1"
root=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$root/.venv/bin:$PATH"
export NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
log="$root/build/molecule-$scenario.log"
mkdir -p "$root/build"
: >"$log"
# Each step's line carries its elapsed seconds ("molecule[x]: converge (123 s)") so the CI log
# shows where the time goes; the step's output stays in $log.
scenario_start=$(date +%s)
run() {
    local t0 rc
    t0=$(date +%s)
    echo "molecule[$scenario]: $* ..." >>"$log"
    "$root/.venv/bin/molecule" "$@" -s "$scenario" >>"$log" 2>&1
    rc=$?
    echo "molecule[$scenario]: $* ($(( $(date +%s) - t0 )) s)$([ "$rc" = 0 ] || echo " rc=$rc")" | tee -a "$log"
    return "$rc"
}
status=0
run destroy >/dev/null || true
# The check step re-runs the whole converge in check mode. `runbook` converges with the same deploy
# playbook that `examples` checks on five apps (and every role scenario checks its role), so its own
# check run (~4-7 min of CPU on 5 containers) adds no coverage; its verify is the end-to-end sequence.
skip_check=" ${RUNBOOK_MOLECULE_SKIP_CHECK-runbook} "
if run create && run prepare && run converge && run idempotence; then
    check_log="$root/build/molecule-$scenario-check.log"
    t0=$(date +%s)
    if [[ "$skip_check" == *" $scenario "* ]]; then
        echo "molecule[$scenario]: check skipped (covered by the examples scenario; RUNBOOK_MOLECULE_SKIP_CHECK=\"\" runs it)" | tee -a "$log"
    elif "$root/.venv/bin/molecule" check -s "$scenario" >"$check_log" 2>&1; then
        echo "molecule[$scenario]: check, a check-mode converge must change nothing ($(( $(date +%s) - t0 )) s)" | tee -a "$log"
        cat "$check_log" >>"$log"
        # PLAY RECAP lines: "<host> : ok=N changed=N ..." (molecule may frame them in a box).
        recap=$(grep -oE '[A-Za-z0-9_.-]+ +: ok=[0-9]+ +changed=[0-9]+' "$check_log")
        if [ -z "$recap" ]; then
            echo "molecule[$scenario]: FAILED: no PLAY RECAP found in the check-mode run" | tee -a "$log"
            status=1
        elif grep -Ev 'changed=0$' <<<"$recap" >/dev/null; then
            echo "molecule[$scenario]: FAILED: the check-mode run on a converged host reports changes:" | tee -a "$log"
            tee -a "$log" <<<"$recap"
            status=1
        fi
    else
        cat "$check_log" >>"$log"
        echo "molecule[$scenario]: FAILED: check-mode run failed ($(( $(date +%s) - t0 )) s)" | tee -a "$log"
        status=1
    fi
    if [ "$status" = 0 ]; then
        run verify || status=1
    fi
    # A scenario with a side_effect.yml (app: upgrade, gate, rollback, retention, remote archive, build,
    # git; data_dir: ownership repair; secrets: mode repair, forced rotation) runs it
    # after verify, on the verified host. molecule skips a side-effect playbook it cannot find and
    # still exits 0, so the step also fails when its output has no PLAY RECAP.
    if [ "$status" = 0 ] && [ -f "$root/molecule/$scenario/side_effect.yml" ]; then
        mark=$(wc -l <"$log")
        if ! run side-effect; then
            status=1
        elif ! tail -n +"$((mark + 1))" "$log" | grep -q 'PLAY RECAP'; then
            echo "molecule[$scenario]: FAILED: side-effect ran no playbook (is provisioner.playbooks.side_effect set?)" | tee -a "$log"
            status=1
        fi
    fi
else
    status=1
fi
# What failed, before destroy's output follows it in the log: make test prints it again at the end.
excerpt="$root/build/molecule-$scenario.failure.txt"
rm -f "$excerpt"
[ "$status" = 0 ] || tail -n 80 "$log" >"$excerpt"
run destroy >/dev/null || true
echo "molecule[$scenario]: $([ "$status" = 0 ] && echo ok || echo FAILED) in $(( $(date +%s) - scenario_start )) s" | tee -a "$log"
if [ "$status" != 0 ]; then
    [ -z "${RUNBOOK_MOLECULE_FAILED:-}" ] || echo "$scenario" >>"$RUNBOOK_MOLECULE_FAILED"
    echo "molecule[$scenario]: FAILED; the end of $log before destroy:"
    cat "$excerpt"
fi
exit "$status"
