# Shared helpers for the set-up scripts; source it, do not run it.
#
# Every installer here is idempotent and quiet when there is nothing to do:
# it checks for the thing it installs first and only then reaches for a
# package manager. Add a new dependency as a small script that sources this
# file (for example an Azurite installer that runs `npm install --prefix .`
# into the project's node_modules when `node_modules/.bin/azurite` is missing).

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly when we are root, else through sudo.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $* (run as root or install sudo)"
    fi
}

# apt_install PKG...: install Debian packages without recommends. The package
# lists are refreshed only when the first attempt fails (a fresh machine has
# no lists; a warm one should not pay for `apt-get update`).
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* by hand"
    say "installing Debian packages: $*"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q --no-install-recommends)
    if ! as_root "${apt[@]}" install "$@" >/dev/null; then
        say "first attempt failed; refreshing package lists"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -q update >/dev/null
        as_root "${apt[@]}" install "$@" >/dev/null
    fi
}

# need_command CMD PKG...: install PKG... when CMD is not on PATH.
need_command() {
    local cmd="$1"; shift
    command -v "$cmd" >/dev/null 2>&1 || apt_install "$@"
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd still missing after installing $*"
}
