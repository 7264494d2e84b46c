#!/usr/bin/env bash
# ansible-test's sanity venvs bootstrap pip with a script downloaded from a host this lab cannot
# reach; put our stand-in (tools/ansible-test-pip-bootstrap.py) where ansible-test caches it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
pip_version=$("$root/.venv/bin/python" - <<'PY'
import re
import ansible_test._internal.python_requirements as req
import inspect
print(re.search(r"pip='([0-9.]+)'", inspect.getsource(req.get_venv_packages)).group(1))
PY
)
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
install -m 0644 "$root/tools/ansible-test-pip-bootstrap.py" "$cache/get_pip_${pip_version//./_}.py"
