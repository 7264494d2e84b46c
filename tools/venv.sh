#!/usr/bin/env bash
# Create or refresh .venv with the pinned controller/test tools (requirements/controller.txt).
# Re-installs only when the requirements file changed since the last install.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
req="$root/requirements/controller.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "venv: creating $venv with $($python --version 2>&1)"
    "$python" -m venv "$venv"
fi
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "venv: installing pinned tools from requirements/controller.txt (about a minute)"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    "$venv/bin/python" -c "import ansible, molecule, testinfra" || { echo "venv: install failed" >&2; exit 1; }
    echo "$want" >"$stamp"
fi
