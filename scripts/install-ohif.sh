#!/usr/bin/env bash
# Install the OHIF viewer (the static build that the npm package @ohif/app ships in
# dist/) into .cache/ohif/<version>, where `pacs-edge serve` finds it by default
# ([http] viewer_root, see docs/web.md "Viewer").
#
# The build is fetched with `npm pack` from the registry, pinned by version and by
# integrity: npm checks the tarball against the registry's sha512, and this script
# checks it again against the value recorded below, so a re-published or tampered
# package is refused. Nothing is built and nothing is committed.
#
# What the box does not need is dropped (about 150 MB of the 204 MB):
#   *.map                     source maps
#   ort/                      onnxruntime for the AI segmentation tools, whose models
#                             would come from third-party hosts
#   app-config.js, google.js  demo configurations pointing at public servers (the box
#                             generates its own /app-config.js)
#   sw.js, oidc-client.min.js, silent-refresh.html
#                             a Workbox service worker and OpenID Connect sign-in the
#                             box does not use (it has its own login)
#   _headers, _redirects, serve.json
#                             hosting files for Netlify and `serve`
# and init-service-worker.js, which index.html loads, is replaced by its first
# statement alone (unregister any service worker) without the dead branch that names
# a CDN. Text and wasm files get a gzip copy beside them (name.gz), which the server
# sends to browsers that accept gzip: the 17 MB main bundle crosses the LAN as 4 MB.
#
# Idempotent and quiet: a stamp in the target records the integrity installed and the
# layout of this script (bump LAYOUT when the steps above change). The
# target appears in one rename, so a killed install leaves no half-built viewer.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Keep in step with appliance/http/viewer.py OHIF_VERSION (a test checks both).
OHIF_VERSION=3.13.2
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
LAYOUT=2

base="$ROOT/.cache/ohif"
target="$base/$OHIF_VERSION"
stamp="$target/.pacs-edge-installed"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$OHIF_INTEGRITY layout=$LAYOUT" ] \
        && [ -f "$target/index.html" ]; then
    exit 0
fi

need_command node nodejs
need_command npm npm
say "installing the OHIF viewer @ohif/app@$OHIF_VERSION into $target"
mkdir -p "$base"
work="$(mktemp -d "$base/.install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
log="$work/npm.log"
if ! npm pack "@ohif/app@$OHIF_VERSION" --pack-destination "$work" \
        --loglevel=error >"$log" 2>&1; then
    cat "$log" >&2
    die "npm pack @ohif/app@$OHIF_VERSION failed"
fi
tarball="$work/ohif-app-$OHIF_VERSION.tgz"
[ -f "$tarball" ] || die "npm pack did not write $tarball"

have="sha512-$(node -e '
    const data = require("fs").readFileSync(process.argv[1]);
    process.stdout.write(require("crypto").createHash("sha512").update(data).digest("base64"));
' "$tarball")"
[ "$have" = "$OHIF_INTEGRITY" ] \
    || die "@ohif/app@$OHIF_VERSION integrity mismatch: got $have, expected $OHIF_INTEGRITY"

mkdir "$work/package"
tar -xzf "$tarball" -C "$work/package" --strip-components=1 package/dist
dist="$work/package/dist"
[ -f "$dist/index.html" ] || die "@ohif/app@$OHIF_VERSION has no dist/index.html"

find "$dist" -name '*.map' -type f -delete
rm -rf "$dist/ort"
rm -f "$dist/app-config.js" "$dist/google.js" "$dist/sw.js" "$dist/oidc-client.min.js" \
    "$dist/silent-refresh.html" "$dist/_headers" "$dist/_redirects" "$dist/serve.json"
cat >"$dist/init-service-worker.js" <<'EOF'
// pacs-edge: the box registers no service worker; drop any left from another build.
navigator.serviceWorker.getRegistrations().then(function (registrations) {
  for (let registration of registrations) {
    registration.unregister();
  }
});
EOF
find "$dist" -type f -size +8k \( -name '*.js' -o -name '*.css' -o -name '*.wasm' \
    -o -name '*.json' -o -name '*.svg' -o -name '*.html' \) -exec gzip -k -n -6 {} +
printf '%s' "$OHIF_INTEGRITY layout=$LAYOUT" >"$dist/.pacs-edge-installed"

rm -rf "$target"
mv -T "$dist" "$target"
