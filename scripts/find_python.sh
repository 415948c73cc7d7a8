#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter, or fail with a message that says what to install.
# Order: $PYTHON, python3.12/3.13/3.14 on PATH, pyenv-installed versions, then python3.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
cands=()
[ -n "${PYTHON:-}" ] && cands+=("$PYTHON")
cands+=(python3.12 python3.13 python3.14)
root="${PYENV_ROOT:-$HOME/.pyenv}"
for v in "$root"/versions/3.1[2-9]*; do [ -x "$v/bin/python3" ] && cands+=("$v/bin/python3"); done
cands+=(python3 python)
for c in "${cands[@]}"; do
  if ok "$c"; then command -v "$c" 2>/dev/null || echo "$c"; exit 0; fi
done
echo "perturbax needs Python >= 3.12 and none was found (tried: ${cands[*]})." >&2
echo "Install one (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
exit 1
