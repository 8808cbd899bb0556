#!/usr/bin/env bash
# Install Azurite (Microsoft's Azure Storage emulator) for the blob-store tests.
#
# npm puts it under .cache/azurite (git-ignored), only when its azurite-blob
# command is missing or another version is there; quiet when it is in place.
# The version is pinned: 3.35.0 is the newest release whose engines field
# still accepts Node 20 (Debian's nodejs); later ones ask for Node >= 21.
# Node and npm come from Debian. The tests start it with --disableTelemetry:
# by default Azurite reports usage to an Internet endpoint.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

AZURITE_VERSION=3.35.0
prefix="$ROOT/.cache/azurite"
bin="$prefix/node_modules/.bin/azurite-blob"

need_command node nodejs
if [ -x "$bin" ]; then
    have="$(node -p 'require(process.argv[1]).version' \
        "$prefix/node_modules/azurite/package.json" 2>/dev/null || true)"
    [ "$have" = "$AZURITE_VERSION" ] && exit 0
fi
need_command npm npm
say "installing azurite@$AZURITE_VERSION into $prefix"
mkdir -p "$prefix"
log="$prefix/install.log"
if ! npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error \
        "azurite@$AZURITE_VERSION" >"$log" 2>&1; then
    cat "$log" >&2
    die "npm install azurite failed (log: $log)"
fi
[ -x "$bin" ] || die "azurite installed but $bin is missing"
