"""Pod networking for the local runner: one Linux network namespace per pod.

Each pod gets a namespace with its own loopback (so an app bound to
127.0.0.1 is truly private to its pod) and one veth leg on a bridge in the
host namespace, which carries the pod address. The host keeps the bridge's
first address, so inbound ports are reachable from the host for probing with
openssl or curl, and the CA (in the host namespace) is reachable from pods.

Where a Docker engine runs, it sets the iptables FORWARD policy to DROP and
loads br_netfilter, which makes bridged traffic between pods traverse that
chain; we insert one ACCEPT rule for our bridge and remove it on teardown.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("shopmesh.netns")

IPTABLES_COMMENT = "shopmesh"


class NetworkError(RuntimeError):
    """A pod network could not be set up or torn down."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetworkError(f"`{' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def available() -> str | None:
    """None when pod namespaces can be made here, else the reason they cannot."""
    import os

    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (make system-deps installs it)"
    return None


@dataclass(frozen=True)
class PodNetwork:
    """Names and addresses of one mesh's bridge and pod namespaces."""

    mesh_id: str  # 4 hex chars, derived from the state directory
    subnet: str  # e.g. 10.89.37.0/24

    @property
    def bridge(self) -> str:
        return f"smb{self.mesh_id}"

    @property
    def host_ip(self) -> str:
        return str(ipaddress.ip_network(self.subnet).network_address + 1)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def netns(self, pod: str) -> str:
        return f"sm{self.mesh_id}-{pod}"

    def host_veth(self, index: int) -> str:
        return f"sm{self.mesh_id}v{index}"

    def pod_ip(self, index: int) -> str:
        return str(ipaddress.ip_network(self.subnet).network_address + 10 + index)

    def iptables_rule(self) -> list[str]:
        return ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT",
                "-m", "comment", "--comment", IPTABLES_COMMENT]

    # -- set-up and teardown ------------------------------------------------

    def create_bridge(self) -> None:
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise NetworkError(
                f"bridge {self.bridge} already exists: a mesh with this state directory is "
                "running or was not torn down (run `shopmesh down` with the same --state-dir)"
            )
        for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines():
            addr = line.split()[3]
            if ipaddress.ip_interface(addr).network.overlaps(ipaddress.ip_network(self.subnet)):
                raise NetworkError(f"subnet {self.subnet} is already in use on this machine ({line.split()[1]})")
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_ip}/{self.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        _run("iptables", "-I", *self.iptables_rule())

    def create_pod(self, pod: str, index: int) -> str:
        """Create the namespace of one pod; return its address."""
        ns, veth, ip = self.netns(pod), self.host_veth(index), self.pod_ip(index)
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge)
        _run("ip", "link", "set", veth, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/{self.prefixlen}", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        return ip

    def exec_prefix(self, pod: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns(pod)]

    def pids_in(self, pod: str) -> list[int]:
        proc = _run("ip", "netns", "pids", self.netns(pod), check=False)
        return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []

    def destroy(self, pods: list[str]) -> None:
        """Remove everything create_* made; safe to call on a partial set-up."""
        for pod in pods:
            if Path(f"/run/netns/{self.netns(pod)}").exists():
                _run("ip", "netns", "delete", self.netns(pod), check=False)
        if Path(f"/sys/class/net/{self.bridge}").exists():
            _run("ip", "link", "delete", self.bridge, check=False)
        while _run("iptables", "-C", *self.iptables_rule(), check=False).returncode == 0:
            _run("iptables", "-D", *self.iptables_rule(), check=False)
