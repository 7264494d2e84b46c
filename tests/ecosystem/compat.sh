#!/usr/bin/env bash
# Compatibility matrix: ansible-test sanity (validate-modules, import, compile, runtime-metadata)
# and units on older ansible-core lines, Python 3.11. (2.19, the venv's line, runs the full sanity
# and units stages of make test.)
#   bash tests/ecosystem/compat.sh            # 2.17 and 2.18, all units (make compat)
#   bash tests/ecosystem/compat.sh 2.18       # one line
#   bash tests/ecosystem/compat.sh --quick    # the CI variant (make test's compat stage): units only
#       for tests/unit/plugins, the engines through that line's ansible-test and collection loader;
#       tests/unit/examples (the sample app) imports no Ansible and runs once, on 2.19.
# Each line gets its own venv and its own collection tree under build-compat/ (kept between runs:
# the pip install happens once). Ends with "compat: N passed, N failed" counting lines.
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export NO_COLOR=1 PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1
python="${PYTHON:-python3.11}"
work="${RUNBOOK_COMPAT_DIR:-$root/build-compat}"
quick=0
lines=()
for arg in "$@"; do
    if [ "$arg" = --quick ]; then quick=1; else lines+=("$arg"); fi
done
[ ${#lines[@]} -gt 0 ] || lines=(2.17 2.18)

one_line() {
    local v="$1" venv="$work/venv-$1" tree
    if [ ! -x "$venv/bin/ansible-test" ] || [ "$(cat "$venv/.line" 2>/dev/null)" != "$v" ]; then
        echo "compat $v: creating $venv"
        rm -rf "$venv"
        "$python" -m venv "$venv" || return 1
        "$venv/bin/pip" install -q --disable-pip-version-check "ansible-core~=$v.0" \
            pytest pytest-xdist pytest-mock mock cryptography pyyaml 2>&1 \
            | grep -v "is ignored: it is neither a file nor a directory" || true
        "$venv/bin/ansible-test" --version >/dev/null || { echo "compat $v: install failed" >&2; return 1; }
        echo "$v" >"$venv/.line"
    fi
    # sed reads all of it: head would close the pipe and ansible prints a BrokenPipeError traceback.
    echo "compat $v: $("$venv/bin/ansible" --version | sed -n 1p)"
    # ansible-test downloads a get-pip script for its sanity venvs; each ansible-test pins its
    # own pip version, so the stand-in is installed under that version's cache name.
    local pip_version
    pip_version=$("$venv/bin/python" - <<'PY'
import inspect
import re
import ansible_test._internal.python_requirements as req
print(re.search(r"pip='([0-9.]+)'", inspect.getsource(req.get_venv_packages)).group(1))
PY
) || return 1
    mkdir -p "$HOME/.ansible/test/cache"
    install -m 0644 "$root/tools/ansible-test-pip-bootstrap.py" "$HOME/.ansible/test/cache/get_pip_${pip_version//./_}.py"
    tree=$(bash tools/collection-tree.sh "$work/tree-$v") || return 1
    local rc=0
    local units=()
    [ "$quick" = 1 ] && units=(tests/unit/plugins/module_utils/)
    (cd "$tree" && PATH="$venv/bin:$PATH" ansible-test units --local --python 3.11 --color no "${units[@]}") || rc=1
    # The sanity tests whose verdict depends on the ansible-core line: module docs and argument specs
    # against its schema, imports against its module_utils, meta/runtime.yml against its loader.
    (cd "$tree" && PATH="$venv/bin:$PATH" ansible-test sanity --test validate-modules --test import \
        --test compile --test runtime-metadata --python 3.11 --venv --requirements --color no) || rc=1
    return $rc
}

passed=0 failed=0
for v in "${lines[@]}"; do
    start=$(date +%s)
    echo "=== compat ansible-core $v ==="
    if one_line "$v"; then
        passed=$((passed + 1)); echo "=== compat $v: ok ($(( $(date +%s) - start )) s) ==="
    else
        failed=$((failed + 1)); echo "=== compat $v: FAILED ($(( $(date +%s) - start )) s) ==="
    fi
done
echo "compat: $passed passed, $failed failed"
[ "$failed" = 0 ]
