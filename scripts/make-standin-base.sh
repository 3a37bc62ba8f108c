#!/usr/bin/env bash
# Make a stand-in for python:3.11-slim-bookworm with debootstrap, as a root filesystem tarball, for
# machines that cannot pull from Docker Hub (scripts/build-image.sh calls this and caches the result,
# keyed by this file's content, the mirror and the architecture).
#
# What it matches in the official image, because the Dockerfile relies on it:
#   - Debian bookworm, "slim": --variant=minbase, and dpkg told to skip docs, man pages and locales
#     (the same path-exclude rules debian:bookworm-slim ships), apt lists and caches removed;
#   - `python` and `python3` on PATH (Debian's python3.11), `python -m venv` works;
#   - pip (and setuptools) installed *by pip* into /usr/local, so `python -m pip uninstall` works,
#     and no EXTERNALLY-MANAGED marker (the official image has none either);
#   - ca-certificates.
# It differs in the interpreter build (Debian's 3.11.2 from /usr/bin instead of python.org's in
# /usr/local) and is a little larger (Debian splits fewer files out of libpython).
#
# Usage: scripts/make-standin-base.sh OUT.tar [MIRROR]     (root; needs debootstrap)
set -euo pipefail

out="${1:?usage: make-standin-base.sh OUT.tar [MIRROR]}"
mirror="${2:-http://deb.debian.org/debian}"
suite=bookworm
[ "$(id -u)" = 0 ] || { echo "make-standin-base: run as root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "make-standin-base: apt-get install debootstrap" >&2; exit 1; }

work="$(mktemp -d /var/tmp/agent-authz-base.XXXXXX)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root/etc/dpkg/dpkg.cfg.d"
# debian:bookworm-slim's dpkg filter: no docs (copyright files stay), man pages, info or locales.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# apt as in the official images: no recommends, no translations, no .deb files kept.
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'APT::AutoRemove::SuggestsImportant "false";' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"

# pip (and setuptools) installed by pip, from the wheels Debian ships for venv; `python` on PATH.
rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED
chroot "$root" /bin/sh -c 'set -e; cd /usr/share/python-wheels; set -- pip-*.whl; \
  python3 "$1/pip" install --quiet --no-index --no-cache-dir --disable-pip-version-check \
    --root-user-action=ignore pip-*.whl setuptools-*.whl'
ln -sf /usr/bin/python3 "$root/usr/local/bin/python"

# What the build left behind: caches, lists, logs, the host's resolver and name.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* "$root"/usr/share/lintian/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find "$root/usr/local" -name __pycache__ -prune -exec rm -rf {} +  # as the official image: none in /usr/local
find "$root/dev" -mindepth 1 -delete  # a container runtime mounts its own /dev
: >"$root/etc/resolv.conf"
: >"$root/etc/machine-id"
echo localhost >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"

tar --numeric-owner --xattrs --sort=name -C "$root" -cf "$out.tmp" .
mv "$out.tmp" "$out"
