#!/usr/bin/env bash
# Build the local stand-in for the official python:3.11-slim-bookworm image.
#
# This machine has a Docker engine but no registry, so no base image can be
# pulled. We debootstrap a minimal Debian bookworm (the release python:3.11-slim
# is built on, and the one this host's apt sources serve), install Debian's
# Python 3.11 with venv support into it, and `docker import` the tree. The
# Dockerfiles and compose.yaml take their base image from PYTHON_IMAGE, so the
# same files build on python:3.11-slim-bookworm elsewhere and on this image here.
#
# Usage: docker/base/build.sh [--force]
#   IMAGE  the tag to create      (default shopmesh/python-base:3.11-bookworm)
#   MIRROR the Debian mirror      (default: the first bookworm URI in this host's apt sources)
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${IMAGE:-shopmesh/python-base:3.11-bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
# Certificate authorities this host trusts beyond Debian's (a TLS-inspecting
# egress proxy's, say): the image trusts them too, so pip inside `docker build`
# reaches PyPI exactly as pip on the host does. Public certificates, not secrets.
EXTRA_CAS=/usr/local/share/ca-certificates
# The image is rebuilt when this script or those certificates change: the hash is stored as a label.
RECIPE=$( (cat docker/base/build.sh; find "$EXTRA_CAS" -name '*.crt' -type f -print0 2>/dev/null | sort -z | xargs -0r cat) | sha256sum | cut -c1-16)

if [ "${1:-}" != "--force" ]; then
  have=$(docker image inspect --format '{{ index .Config.Labels "org.shopmesh.base-recipe" }}' "$IMAGE" 2>/dev/null || true)
  if [ "$have" = "$RECIPE" ]; then
    echo "base image $IMAGE is up to date"
    exit 0
  fi
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "building $IMAGE needs root (debootstrap creates device nodes and chowns files): run as root" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "installing debootstrap from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends debootstrap
fi

if [ -z "${MIRROR:-}" ]; then
  # Use the mirror this host already reaches; deb822 (URIs:) and one-line (deb URL suite) formats.
  sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && sources+=("$f")
  done
  MIRROR=$(awk '
    /^URIs:/ { uri=$2 }
    /^Suites:/ { for (i=2;i<=NF;i++) if ($i=="'$SUITE'" && uri !~ /security/) { print uri; exit } }
    /^deb / && $3=="'$SUITE'" && $2 !~ /security/ { print $2; exit }
  ' "${sources[@]}" /dev/null || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

WORK=build/docker-base
ROOTFS=$WORK/rootfs
rm -rf "$WORK"
mkdir -p "$WORK"
echo "debootstrap $SUITE from $MIRROR into $ROOTFS (a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
  tail -n 40 "$WORK/debootstrap.log" >&2
  exit 1
}

# Package sources inside the image: the same mirror plus security updates.
security=${MIRROR%/debian}/debian-security
cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $security $SUITE-security main
SOURCES

if compgen -G "$EXTRA_CAS/*.crt" >/dev/null; then
  echo "trusting this host's extra CAs: $(cd "$EXTRA_CAS" && echo *.crt)"
  cp "$EXTRA_CAS"/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1
fi

# Keep the image small: nothing at run time reads docs, man pages, apt lists or caches.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/var/log/*.log "$ROOTFS"/debootstrap
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} + 2>/dev/null || true

version=$(chroot "$ROOTFS" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$version" != "3.11" ]; then
  echo "expected Python 3.11 in $SUITE, found $version" >&2
  exit 1
fi
chroot "$ROOTFS" python3 -c 'import ensurepip, venv, ssl' || { echo "venv/ensurepip/ssl missing in the base" >&2; exit 1; }

echo "importing $ROOTFS as $IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --change "LABEL org.shopmesh.base-recipe=$RECIPE" \
  --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase with Python $version, local stand-in for python:3.11-slim-bookworm\"" \
  - "$IMAGE" >/dev/null
rm -rf "$WORK"
docker image ls "$IMAGE"
