#!/usr/bin/env bash
# Build the agent-authz image without a Docker engine: podman (daemonless), chroot isolation, its own
# container storage under the cache directory (nothing shared with other podman users).
#
# The base is PYTHON_IMAGE (default python:3.11-slim-bookworm). When it cannot be pulled (no access
# to Docker Hub), a stand-in is made with debootstrap from the Debian mirror apt uses here
# (scripts/make-standin-base.sh) and cached as a tarball keyed by that script, the mirror and the
# architecture; a later run with the same key only imports it (or finds it already imported).
#
# The build stage reaches the package index the way this machine does: the effective pip
# configuration (pip config files and PIP_* variables, merged by `pip config list`) is written to a
# temporary pip.conf that is bind-mounted read-only at /etc/pip.conf, with every local file or
# directory it names (CA bundle, constraints, find-links, file:// indexes) mounted read-only at the
# same path. Only the build stage gets these mounts (it is built first, with `--target build`; the
# full build then takes it from the layer cache, where mounts are not part of the key), so no mount
# point of them is left in the runtime stage, and nothing of them is committed to a layer.
#
# Caches, all under the cache directory: the stand-in base tarball, and the container storage with
# its layer cache (the dependencies' layer is rebuilt only when pyproject.toml changes); the two
# stages are tagged localhost/agent-authz-cache:build and :runtime to keep their layers, and
# untagged images are pruned after each build. For a clean build, remove the cache directory.
#
# Usage: scripts/build-image.sh [--tag TAG] [--info FILE]
#   --tag   image name (default localhost/agent-authz:dev)
#   --info  write a JSON summary here: tag, id, size, base, storage flags, seconds
# Environment: PYTHON_IMAGE, AGENT_AUTHZ_IMAGE_CACHE (default /var/cache/agent-authz-image),
#   AGENT_AUTHZ_STORAGE_DRIVER (default: overlay where it works, else vfs), DEBIAN_MIRROR (default: the first Debian URI in
#   /etc/apt/sources.list*, else http://deb.debian.org/debian). Root only (chroot isolation).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
tag=localhost/agent-authz:dev
info=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --info) info="$2"; shift 2 ;;
    *) echo "build-image: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "build-image: run as root (chroot isolation)" >&2; exit 1; }
command -v podman >/dev/null || { echo "build-image: apt-get install podman (and debootstrap)" >&2; exit 1; }

started=$SECONDS
cache="${AGENT_AUTHZ_IMAGE_CACHE:-/var/cache/agent-authz-image}"
python_image="${PYTHON_IMAGE:-python:3.11-slim-bookworm}"
mkdir -p "$cache"
storage_args() {
  echo --root "$cache/storage-$1" --runroot "$cache/run-$1" --storage-driver "$1" --cgroup-manager cgroupfs \
    --events-backend file
}
driver="${AGENT_AUTHZ_STORAGE_DRIVER:-}"
if [ -z "$driver" ]; then
  # overlay where the kernel and the cache's file system allow it (layers store differences only),
  # else vfs (every layer a full copy: ~3x slower builds and ~4x the disk here)
  # shellcheck disable=SC2046
  if podman $(storage_args overlay) info >/dev/null 2>&1; then driver=overlay; else driver=vfs; fi
fi
read -r -a podman_args <<<"$(storage_args "$driver")"
pm() { podman "${podman_args[@]}" "$@"; }

exec 9>"$cache/lock"
flock 9  # one build at a time per cache

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -v '^\s*#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -1 | tr -d ' ')" || true
  echo "${uri:-http://deb.debian.org/debian}"
}

base="$python_image"
if ! pm image exists "$python_image" && ! timeout 120 podman "${podman_args[@]}" pull -q "$python_image" >/dev/null 2>&1; then
  mirror="$(debian_mirror)"
  key="$( (cat "$repo/scripts/make-standin-base.sh"; echo "$mirror"; uname -m) | sha256sum | cut -c1-16)"
  base="localhost/agent-authz-standin-base:$key"
  if ! pm image exists "$base"; then
    tarball="$cache/standin-base-$key.tar"
    if [ ! -f "$tarball" ]; then
      echo "build-image: $python_image cannot be pulled; making a stand-in with debootstrap from $mirror"
      t0=$SECONDS
      "$repo/scripts/make-standin-base.sh" "$tarball" "$mirror"
      echo "build-image: stand-in base made in $((SECONDS - t0)) s (cached as $tarball)"
      find "$cache" -maxdepth 1 -name 'standin-base-*.tar' ! -name "standin-base-$key.tar" -delete
    fi
    pm import -q \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
      "$tarball" "$base" >/dev/null
    # earlier stand-ins: untagged (their layers go with the prune below once nothing builds on them)
    pm images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/agent-authz-standin-base:' |
      grep -v ":$key\$" | xargs -r podman "${podman_args[@]}" untag || true
  fi
  echo "build-image: base $base (stand-in for $python_image)"
fi

# The host's pip configuration, for the build stage's `pip install` (removed when the script ends).
secrets="$cache/build-pip"
rm -rf "$secrets"
mkdir -m 700 "$secrets"
trap 'rm -rf "$secrets"' EXIT
volumes=()
if python3 -m pip --version >/dev/null 2>&1; then
  python3 -m pip config list 2>/dev/null | python3 -c '
import ast, os, sys
from urllib.parse import urlparse
sections, mounts = {}, set()
for line in sys.stdin:
    name, sep, value = line.rstrip("\n").partition("=")
    if not sep:
        continue
    section, _, key = name.partition(".")
    value = ast.literal_eval(value)
    if section == ":env:":  # PIP_* variables override the files
        section = "global"
    sections.setdefault(section, {})[key] = value
    for word in value.split():
        path = urlparse(word).path if word.startswith("file://") else word
        if key.endswith("index-url") and word.startswith("file://"):
            path = os.path.dirname(path.rstrip("/"))  # a PEP 503 index links to files beside simple/
        if path.startswith("/") and os.path.exists(path):
            mounts.add(os.path.realpath(path))
if "cert" not in sections.get("global", {}) and os.path.exists("/etc/ssl/certs/ca-certificates.crt"):
    sections.setdefault("global", {})["cert"] = "/etc/ssl/certs/ca-certificates.crt"
    mounts.add("/etc/ssl/certs/ca-certificates.crt")
with open(sys.argv[1], "w") as out:
    for section, items in sections.items():
        out.write(f"[{section}]\n")
        for key, value in items.items():
            out.write(f"{key} = " + "\n    ".join(value.splitlines() or [""]) + "\n")
with open(sys.argv[2], "w") as out:
    out.writelines(f"{path}\n" for path in sorted(mounts))
' "$secrets/pip.conf" "$secrets/mounts"
  volumes+=(-v "$secrets/pip.conf:/etc/pip.conf:ro")
  while IFS= read -r path; do
    [ -n "$path" ] && volumes+=(-v "$path:$path:ro")
  done <"$secrets/mounts"
fi

echo "build-image: building $tag (storage: $driver under $cache/storage-$driver)"
t0=$SECONDS
build=(pm build --isolation chroot --layers --build-arg "PYTHON_IMAGE=$base" -f "$repo/Dockerfile")
# The two stages are tagged so that their layers stay in the cache: the prune below then drops only
# what no tagged image builds on (the previous build's last steps), which keeps the storage bounded.
"${build[@]}" --target build "${volumes[@]}" -t localhost/agent-authz-cache:build "$repo"
"${build[@]}" --target runtime -t localhost/agent-authz-cache:runtime "$repo"
"${build[@]}" -t "$tag" "$repo"
build_seconds=$((SECONDS - t0))
pm image prune -f >/dev/null

size="$(pm image inspect --format '{{.Size}}' "$tag")"
base_size="$(pm image inspect --format '{{.Size}}' "$base")"
id="$(pm image inspect --format '{{.Id}}' "$tag")"
echo "build-image: $tag ${id:0:12}: $((size / 1000000)) MB uncompressed (the base alone: $((base_size / 1000000)) MB);" \
  "built in ${build_seconds} s, $((SECONDS - started)) s in all"
pm history --format '{{.Size}}\t{{.CreatedBy}}' "$tag" | cut -c1-140 | head -12

if [ -n "$info" ]; then
  python3 - "$info" "$tag" "$id" "$size" "$base" "$base_size" "$python_image" "$((SECONDS - started))" "${podman_args[@]}" <<'EOF'
import json, sys
out, tag, image_id, size, base, base_size, wanted, seconds, *args = sys.argv[1:]
json.dump({"tag": tag, "id": image_id, "size": int(size), "base": base, "base_size": int(base_size),
           "python_image": wanted, "seconds": int(seconds), "podman_args": args}, open(out, "w"), indent=1)
EOF
fi
