"""The CA container's entry point in compose: the CA server plus a join token keeper.

    python -m shopmesh.ca_pod --state-dir /var/lib/shopmesh/state \\
        --join-root /var/lib/shopmesh/join --ttl 5m [-- EXTRA CA SERVER FLAGS]

It runs `python -m pki.ca_server` (listening on every interface of the CA
container, ports from shopmesh.topology) and, beside it, keeps each pod's
join volume stocked: `<join-root>/<workload>/` is a named volume that only
the CA and that one pod mount, and it holds

- `root.pem`: the trust bundle, rewritten whenever the CA's bundle changes;
- `join-token`: an unused one-time join token bound to that workload's
  SPIFFE ID (mode 0600). The pod's agent spends it on its first start (or
  after its certificate expired while it was down) and deletes it; the
  keeper then writes a fresh one, and replaces any token that has lived
  half its TTL, so a pod that restarts at any time can join again.

Why a standing token: in compose nobody is around to hand a token to a pod
that restarts, and the alternative (a long-lived credential, or the CA's
database on a shared volume) is worse. A token is not a key: it is single
use, expires (10 minutes by default), is bound to one identity, and is
readable only inside the one pod whose identity it grants; whoever can read
that volume could equally read the pod's own private key. Private keys never
leave their container: the CA's stay on the CA's state volume, each agent's
on its pod's own volume.

Under compose's `aws` profile the CA server runs on ACM Private CA (the flags
come from shopmesh.aws_profile). Health (`python -m shopmesh.healthcheck ca`) needs the CA's join port
SERVING and a token written for every pod; the keeper's progress is in
/run/shopmesh/join-keeper.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pki import tokens as join_tokens
from pki.durations import parse_duration
from pki.errors import PkiError
from shopmesh import aws_profile, topology

log = logging.getLogger("shopmesh.ca_pod")

BUNDLE_NAME = "root.pem"
TOKEN_NAME = "join-token"
KEEPER_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 15.0


@dataclass
class PodJoinDir:
    workload: str
    path: Path
    token_expires_at: float | None = None  # of the token this keeper wrote; None: none yet

    @property
    def token_file(self) -> Path:
        return self.path / TOKEN_NAME


@dataclass
class Keeper:
    state_dir: Path
    pods: list[PodJoinDir]
    token_ttl_s: float
    status_file: Path
    _bundle: bytes | None = field(default=None, init=False)

    def bundle_path(self) -> Path:
        return self.state_dir / "ca" / BUNDLE_NAME

    def tick(self, now: float) -> None:
        """One pass: publish the bundle, top up tokens, write the status file."""
        try:
            bundle = self.bundle_path().read_bytes()
        except FileNotFoundError:
            bundle = None  # the CA server has not created its root yet
        waiting = []
        for pod in self.pods:
            if bundle is None:
                waiting.append(pod.workload)
                continue
            self._publish_bundle(pod, bundle)
            try:
                self._top_up_token(pod, now)
            except (PkiError, OSError) as err:
                log.error("cannot write a join token for %s into %s: %s", pod.workload, pod.path, err)
            if pod.token_expires_at is None:
                waiting.append(pod.workload)
        self._bundle = bundle
        self._write_status(now, waiting)

    def _publish_bundle(self, pod: PodJoinDir, bundle: bytes) -> None:
        target = pod.path / BUNDLE_NAME
        if bundle == self._bundle and target.exists():
            return
        try:
            if target.read_bytes() == bundle:
                return
        except FileNotFoundError:
            pass
        tmp = target.with_name(f".{BUNDLE_NAME}.tmp")
        tmp.write_bytes(bundle)
        os.chmod(tmp, 0o644)
        tmp.replace(target)
        log.info("published the trust bundle to %s", target)

    def _top_up_token(self, pod: PodJoinDir, now: float) -> None:
        present = pod.token_file.exists()
        fresh = pod.token_expires_at is not None and pod.token_expires_at - now > self.token_ttl_s / 2
        if present and fresh:
            return
        # Missing (the agent spent it), never written by us (left over from an
        # earlier run: it may have expired), or past half its life: replace it.
        spiffe_id = topology.spiffe_id_for(pod.workload)
        token = join_tokens.create_join_token(self.state_dir, spiffe_id, self.token_ttl_s)
        join_tokens.write_token_file(pod.token_file, token)
        why = "spent" if pod.token_expires_at is not None and not present else ("new" if not present else "refreshed")
        pod.token_expires_at = now + self.token_ttl_s
        log.info("join token for %s written to %s (%s)", spiffe_id, pod.token_file, why)

    def _write_status(self, now: float, waiting: list[str]) -> None:
        doc = {"updated_at": now, "waiting": waiting, "pods": [p.workload for p in self.pods]}
        tmp = self.status_file.with_name(f".{self.status_file.name}.tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        os.chmod(tmp, 0o644)
        tmp.replace(self.status_file)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shopmesh.ca_pod", description="CA server + join token keeper (compose).")
    p.add_argument("--state-dir", type=Path, required=True, help="the CA's state (its own volume)")
    p.add_argument("--join-root", type=Path, required=True, help="holds one join volume per workload, named after it")
    p.add_argument("--ttl", default="5m", help="SVID lifetime, passed to the CA server (default 5m)")
    p.add_argument("--token-ttl", default="10m", help="join token lifetime (default 10m)")
    p.add_argument("--status-file", type=Path, default=Path("/run/shopmesh/join-keeper.json"))
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument("ca_server_args", nargs=argparse.REMAINDER,
                   help="after --: more flags for python -m pki.ca_server (e.g. the ACM PCA backend)")
    args = p.parse_args(argv)
    try:
        args.token_ttl_s = parse_duration(args.token_ttl).total_seconds()
        parse_duration(args.ttl)
    except PkiError as err:
        p.error(f"argument --ttl/--token-ttl: {err}")
    if not args.join_root.is_dir():
        p.error(f"argument --join-root: '{args.join_root}' is not a directory")
    missing = [w for w in topology.WORKLOADS if not (args.join_root / w).is_dir()]
    if missing:
        p.error(f"argument --join-root: no join volume for {', '.join(missing)} under '{args.join_root}'")
    if args.ca_server_args[:1] == ["--"]:
        args.ca_server_args = args.ca_server_args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    os.umask(0o077)
    args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    args.status_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend_args = aws_profile.ca_server_args()
        if backend_args:
            aws_profile.wait_for_endpoint()
    except aws_profile.AwsProfileError as err:
        log.error("%s", err)
        return 1
    argv_ca = [
        sys.executable, "-m", "pki.ca_server",
        "--state-dir", str(args.state_dir),
        "--join-listen", f"0.0.0.0:{topology.CA_JOIN_PORT}",
        "--renew-listen", f"0.0.0.0:{topology.CA_RENEW_PORT}",
        "--ttl", args.ttl,
        "--log-level", args.log_level,
        *backend_args,
        *args.ca_server_args,
    ]
    log.info("starting %s", " ".join(argv_ca))
    server = subprocess.Popen(argv_ca)
    stopping = {"signal": 0}

    def forward(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        if server.poll() is None:
            server.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)

    keeper = Keeper(
        state_dir=args.state_dir,
        pods=[PodJoinDir(w, args.join_root / w) for w in topology.WORKLOADS],
        token_ttl_s=args.token_ttl_s,
        status_file=args.status_file,
    )
    while server.poll() is None and not stopping["signal"]:
        keeper.tick(time.time())
        try:
            server.wait(timeout=KEEPER_INTERVAL_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        code = server.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("the CA server ignored signal %d for %.0fs: killing it", stopping["signal"], STOP_TIMEOUT_S)
        server.kill()
        code = server.wait()
    if not stopping["signal"]:
        log.error("the CA server exited with status %d", code)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
