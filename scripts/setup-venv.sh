#!/usr/bin/env bash
# Create .venv and install the project into it (editable).
#
#   scripts/setup-venv.sh          the appliance only (what `make run` needs)
#   scripts/setup-venv.sh --test   plus the test extras (pytest, ruff, numpy)
#
# Idempotent: a stamp in .venv records the hash of pyproject.toml and the
# extras installed; a second run with nothing changed prints nothing.
# Python code is installed editable, so source edits need no reinstall.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

extras=""
case "${1:-}" in
    --test) extras="test" ;;
    "") ;;
    *) die "usage: $0 [--test]" ;;
esac

need_command python3 python3
# Debian splits venv/ensurepip out of the interpreter package.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    py="$(python3 -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install python3-venv "${py}-venv"
fi

# A venv whose interpreter is gone (python upgraded, folder copied) is rebuilt.
if [ -d "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "rebuilding broken virtual environment $VENV"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    python3 -m venv "$VENV"
fi

# A wheel install has its modules compiled by pip; this editable checkout has none, and
# under PYTHONDONTWRITEBYTECODE=1 (CI containers) every `pacs-edge` process would compile
# its ~170 modules again (~0.25 s of CPU each start; the test suite starts thousands).
# Cheap when nothing changed; a module edited later is recompiled in memory, as always.
compile_bytecode() {
    "$VENV/bin/python" -m compileall -q "$ROOT/appliance" "$ROOT/sync" "$ROOT/provisioning" >/dev/null
}

stamp="$VENV/.pacs-edge-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
# The stamp holds "<hash> <extras>"; a test install also satisfies a plain one.
if [ -f "$stamp" ]; then
    read -r have_hash have_extras < "$stamp" || true
    if [ "${have_hash:-}" = "$want" ] && { [ -z "$extras" ] || [ "${have_extras:-}" = "$extras" ]; }; then
        compile_bytecode
        exit 0
    fi
fi

target="$ROOT"
[ -n "$extras" ] && target="$ROOT[$extras]"
say "installing pacs-edge${extras:+ with [$extras] extras} into $VENV"
# pip and the build backend are chatty even with -q; keep the log, show it on failure.
log="$VENV/.pacs-edge-install.log"
if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$target" >"$log" 2>&1; then
    cat "$log" >&2
    die "pip install failed (log: $log)"
fi
printf '%s %s\n' "$want" "$extras" > "$stamp"
compile_bytecode
