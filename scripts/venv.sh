# Sourced by scripts/demo and scripts/test. `ensure_venv VENV REQUIREMENT...` makes VENV
# hold this project installed with the given pip requirements, and calls pip only when
# something that decides the install changed since the last one: pyproject.toml, the
# requirements (so OPENAI_SPEC switching openai lines reinstalls), the venv's Python and
# the checkout's path. Those are hashed into a stamp kept in the venv, written only after
# pip succeeded; with a matching stamp nothing is installed, so a second run needs no
# network. TOKENLAY_REINSTALL=1 installs anyway (to pick up newer releases).

ensure_venv() {
    local venv="$1"
    shift
    if [ ! -x "$venv/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$venv" || return
    fi
    local stamp_file="$venv/tokenlay-install.stamp"
    local stamp
    stamp="$("$venv/bin/python" - "$PWD" "$@" <<'PY'
import hashlib
import sys

digest = hashlib.sha256(sys.version.encode())
with open("pyproject.toml", "rb") as pyproject:
    digest.update(pyproject.read())
for argument in sys.argv[1:]:
    digest.update(b"\0" + argument.encode())
print(digest.hexdigest())
PY
)" || return
    # One stamp per set of requirements installed: the demo's and the tests' share a
    # venv, and each must find its own after the other ran.
    if [ "${TOKENLAY_REINSTALL:-0}" != 1 ] && [ -f "$stamp_file" ] \
        && grep -qxF "$stamp" "$stamp_file"; then
        return 0
    fi
    # A failed install leaves no stamp at all: what the venv holds is then unknown.
    if ! { "$venv/bin/python" -m pip install --quiet --upgrade pip \
        && "$venv/bin/python" -m pip install --quiet "$@"; }; then
        rm -f "$stamp_file"
        return 1
    fi
    echo "$stamp" >>"$stamp_file"
}
