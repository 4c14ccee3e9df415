#!/usr/bin/env bash
# Install the host tools the local runner uses, from Debian's packages, when
# they are missing: iproute2 (ip netns, veth, bridge) and iptables.
set -euo pipefail
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing ${missing[*]}: install them (sudo apt-get install ${missing[*]}) or the mesh falls back to loopback" >&2
  exit 0
fi
echo "installing ${missing[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
