"""`shopmesh up --ca …` and `shopmesh ca rotate|status`: choosing the CA backend, rotating the CA.

CA rotation without downtime (ACCEPTANCE row 26), in three steps, each
followed by a wait until every agent of the mesh reports what the next step
needs (their status files carry the trust bundle's fingerprints, the
authority that signed each SVID, and whether Envoy ACKed the latest SDS push):

1. prepare  — the CA creates the next authority and publishes its root in the
              trust bundle; it signs nothing yet. Wait: every agent holds the
              new bundle and its Envoy applied it (ROOTCA over SDS).
2. activate — the CA signs with the new authority (the old key is destroyed);
              agents see the new signing authority on their WatchBundle
              stream and renew both SVIDs at once. Wait: every workload SVID
              and agent SVID comes from the new authority, and every Envoy
              serves the new certificate.
3. retire   — the old root leaves the bundle. Wait: every agent and Envoy
              trusts the new root only. From now on a certificate of the old
              CA is refused.

Each step alone (`--step`) first checks that the previous one completed, so
no step can break traffic; the CA server does the work through its admin
socket (<state>/ca/admin.sock, 0600).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from shopmesh import runner
from shopmesh.ca.v1 import ca_pb2, ca_pb2_grpc

STEPS = ("prepare", "activate", "retire")
ADMIN_TIMEOUT_S = 60.0
DEFAULT_WAIT_S = 120.0


class CaAdminError(RuntimeError):
    """A rotation step was refused or did not complete; the message says why and what to do."""


# --- `shopmesh up` options ----------------------------------------------------------


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    """The CA backend options of `shopmesh up`."""
    parser.add_argument("--ca", choices=("local", "acm-pca"), default="local",
                        help="who signs certificates: the local CA (default) or AWS ACM Private CA")
    parser.add_argument("--pca-arn", help="the ACM PCA to use with --ca acm-pca (AWS endpoint, region and "
                                          "credentials from the standard AWS SDK environment)")
    parser.add_argument("--pca-mode", choices=("upstream", "direct"), default=None,
                        help="upstream: PCA signs the mesh's intermediate, which signs the leaves (default); "
                             "direct: PCA signs every leaf")
    parser.add_argument("--pca-create", action="store_true",
                        help="create a root PCA first (for moto and LocalStack), or reuse the one created for this state dir")


def up_ca_args(args: argparse.Namespace) -> list[str]:
    """The CA server flags for `shopmesh up`'s options; ValueError naming the bad option."""
    if args.ca != "acm-pca":
        for flag, value in (("--pca-arn", args.pca_arn), ("--pca-mode", args.pca_mode), ("--pca-create", args.pca_create)):
            if value:
                raise ValueError(f"{flag}: only with --ca acm-pca")
        return []
    if args.pca_arn and args.pca_create:
        raise ValueError("--pca-create: not allowed with --pca-arn (use one or the other)")
    if not args.pca_arn and not args.pca_create:
        raise ValueError("--ca acm-pca needs --pca-arn ARN (or --pca-create to create a PCA)")
    out = ["--ca", "acm-pca", "--pca-mode", args.pca_mode or "upstream"]
    if args.pca_arn:
        from pki.backends.acm_pca import parse_arn

        parse_arn(args.pca_arn)  # ValueError names the ARN
        out += ["--pca-arn", args.pca_arn]
    else:
        out.append("--pca-create")
    return out


# --- talking to the CA server --------------------------------------------------------


def _admin_call(state_dir: Path, method: str) -> ca_pb2.AuthoritiesResponse:
    socket = state_dir / "ca" / "admin.sock"
    if not socket.exists():
        raise CaAdminError(f"no CA admin socket at {socket}: is the mesh running from {state_dir}?")
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        try:
            response: ca_pb2.AuthoritiesResponse = getattr(ca_pb2_grpc.CaAdminStub(channel), method)(
                ca_pb2.GetAuthoritiesRequest(), timeout=ADMIN_TIMEOUT_S
            )
        except grpc.RpcError as err:
            raise CaAdminError(f"the CA refused {method}: {err.code().name}: {err.details()}") from err
    return response


def authorities(state_dir: Path) -> ca_pb2.AuthoritiesResponse:
    return _admin_call(state_dir, "GetAuthorities")


# --- what the agents report ----------------------------------------------------------


def agent_reports(record: runner.MeshRecord) -> dict[str, dict[str, Any]]:
    """Each pod's agent status file (fresh ones only: a stale file says nothing about now)."""
    now = time.time()
    out: dict[str, dict[str, Any]] = {}
    for name, pod in record.pods.items():
        try:
            doc = json.loads(pod.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            doc = {}
        fresh = bool(doc) and now - float(doc.get("updated_at", 0)) < runner.STATUS_STALE_S and doc.get("running", False)
        out[name] = doc if fresh else {}
    return out


def _lagging(record: runner.MeshRecord, ok: Callable[[dict[str, Any]], bool]) -> list[str]:
    out = []
    for name, doc in agent_reports(record).items():
        if not doc:
            out.append(f"{name} (no fresh status)")
        elif not ok(doc):
            detail = f": {doc['last_error']}" if doc.get("last_error") else ""
            out.append(f"{name}{detail}")
    return out


def _synced(doc: dict[str, Any]) -> bool:
    # None: no Envoy managed by this agent, nothing to wait for.
    return doc.get("sds_synced") is not False


def has_bundle(fingerprints: set[str]) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: fingerprints <= set(doc.get("bundle_fingerprints") or []) and _synced(doc)


def exact_bundle(fingerprints: set[str]) -> Callable[[dict[str, Any]], bool]:
    return lambda doc: fingerprints == set(doc.get("bundle_fingerprints") or []) and _synced(doc)


def signed_by(authority: str) -> Callable[[dict[str, Any]], bool]:
    def ok(doc: dict[str, Any]) -> bool:
        return (
            doc.get("svid_authority") == authority
            and doc.get("agent_svid_authority") == authority
            # Envoy serves the SVID the agent holds (serial from admin /certs).
            and doc.get("serial") is not None
            and doc.get("serial") == doc.get("issued_serial")
            and _synced(doc)
        )

    return ok


def _wait(record: runner.MeshRecord, ok: Callable[[dict[str, Any]], bool], what: str, timeout_s: float) -> None:
    try:
        runner.wait_for(lambda: not _lagging(record, ok), timeout_s, what, interval_s=0.25)
    except runner.RunnerError as err:
        raise CaAdminError(f"{err}; still waiting for: {', '.join(_lagging(record, ok))}") from None


# --- the steps -----------------------------------------------------------------------


def _short(fp: str) -> str:
    return fp[:16]


def _role(response: ca_pb2.AuthoritiesResponse, role: str) -> list[ca_pb2.Authority]:
    return [a for a in response.authorities if a.role == role]


def step_prepare(record: runner.MeshRecord, timeout_s: float, wait: bool, say: Callable[[str], None]) -> None:
    state_dir = Path(record.state_dir)
    response = _admin_call(state_dir, "PrepareAuthority")
    prepared = _role(response, "prepared")
    label = f"{_short(prepared[0].fingerprint)}" if prepared else "(none)"
    say(f"prepare: authority {label} is in the trust bundle ({', '.join(map(_short, response.bundle_fingerprints))}); it signs nothing yet")
    if wait:
        _wait(record, has_bundle(set(response.bundle_fingerprints)), "every agent and Envoy to trust the new root", timeout_s)
        say("prepare: every agent and Envoy trusts the new root")


def step_activate(record: runner.MeshRecord, timeout_s: float, wait: bool, say: Callable[[str], None]) -> None:
    state_dir = Path(record.state_dir)
    before = authorities(state_dir)
    prepared = _role(before, "prepared")
    if not prepared:
        raise CaAdminError("nothing to activate: run `shopmesh ca rotate --step prepare` first")
    anchor = prepared[0].trust_anchor_fingerprint
    lagging = _lagging(record, has_bundle({anchor}))
    if lagging:
        raise CaAdminError(
            f"not activating: these agents do not trust the prepared root {_short(anchor)} yet: {', '.join(lagging)}; "
            "their certificates from the new CA would be refused by them (wait, or fix them first)"
        )
    response = _admin_call(state_dir, "ActivateAuthority")
    new = response.signing_authority
    say(f"activate: authority {_short(new)} signs; the previous one is retiring (its key is destroyed)")
    if wait:
        _wait(record, signed_by(new), "every agent and Envoy to hold certificates from the new authority", timeout_s)
        say("activate: every workload and agent SVID comes from the new authority, and every Envoy serves it")


def step_retire(record: runner.MeshRecord, timeout_s: float, wait: bool, say: Callable[[str], None]) -> None:
    state_dir = Path(record.state_dir)
    before = authorities(state_dir)
    if not _role(before, "retiring"):
        raise CaAdminError("nothing to retire: run `shopmesh ca rotate --step activate` first")
    lagging = _lagging(record, signed_by(before.signing_authority))
    if lagging:
        raise CaAdminError(
            f"not retiring: these agents still hold certificates of the old CA: {', '.join(lagging)}; "
            "removing its root now would break their traffic"
        )
    response = _admin_call(state_dir, "RetireAuthorities")
    say(f"retire: the trust bundle is now {', '.join(map(_short, response.bundle_fingerprints))}")
    if wait:
        _wait(record, exact_bundle(set(response.bundle_fingerprints)), "every agent and Envoy to drop the old root", timeout_s)
        say("retire: every agent and Envoy trusts the new root only; certificates of the old CA are refused")


def rotate(record: runner.MeshRecord, step: str | None, timeout_s: float, wait: bool, say: Callable[[str], None]) -> None:
    for name in [step] if step else STEPS:
        {"prepare": step_prepare, "activate": step_activate, "retire": step_retire}[name](record, timeout_s, wait, say)


# --- CLI -----------------------------------------------------------------------------


def cmd_ca_rotate(args: argparse.Namespace) -> int:
    record = runner.MeshRecord.load(Path(args.state_dir).resolve())
    try:
        rotate(record, args.step, args.timeout, not args.no_wait, lambda line: print(line, flush=True))
    except CaAdminError as err:
        print(f"shopmesh ca rotate: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_ca_status(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    record = runner.MeshRecord.load(state_dir)
    try:
        response = authorities(state_dir)
    except CaAdminError as err:
        print(f"shopmesh ca status: {err}", file=sys.stderr)
        return 1
    agents = {
        name: {
            "bundle_fingerprints": doc.get("bundle_fingerprints"),
            "svid_authority": doc.get("svid_authority"),
            "agent_svid_authority": doc.get("agent_svid_authority"),
            "agent_spiffe_id": doc.get("agent_spiffe_id"),
            "agent_expires_in_s": doc.get("agent_expires_in_s"),
            "sds_synced": doc.get("sds_synced"),
        }
        for name, doc in agent_reports(record).items()
    }
    doc = {
        "backend": response.backend,
        "signing_authority": response.signing_authority,
        "bundle_fingerprints": list(response.bundle_fingerprints),
        "authorities": [
            {
                "fingerprint": a.fingerprint,
                "role": a.role,
                "subject": a.subject,
                "not_after": a.not_after.ToDatetime().isoformat() + "Z",
                "trust_anchor_fingerprint": a.trust_anchor_fingerprint,
            }
            for a in response.authorities
        ],
        "agents": agents,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"backend   {response.backend}")
    print(f"bundle    {', '.join(map(_short, response.bundle_fingerprints))}")
    for a in doc["authorities"]:
        print(f"{a['role']:<9} {_short(a['fingerprint'])}  {a['subject']}  until {a['not_after']}")
    for name, info in agents.items():
        svid = _short(info["svid_authority"] or "-")
        bundle = ", ".join(map(_short, info["bundle_fingerprints"] or [])) or "-"
        print(f"agent {name:<9} svid from {svid}  bundle {bundle}")
    return 0


def register(sub: Any, add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """`shopmesh ca rotate` and `shopmesh ca status` (add: the CLI's helper that adds --state-dir)."""
    ca = add("ca", "the mesh's certificate authority: rotate it, show its authorities")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    rotate_p = ca_sub.add_parser("rotate", help="rotate the CA without downtime: prepare, activate, retire")
    rotate_p.add_argument("--step", choices=STEPS, help="run one step only (default: all three, waiting between them)")
    rotate_p.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S,
                          help="seconds to wait for the agents after each step (default: %(default)s)")
    rotate_p.add_argument("--no-wait", action="store_true", help="do not wait for the agents after the step")
    rotate_p.add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    rotate_p.set_defaults(func=cmd_ca_rotate)
    status_p = ca_sub.add_parser("status", help="the CA's authorities and what each agent trusts")
    status_p.add_argument("--json", action="store_true")
    status_p.add_argument("--state-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    status_p.set_defaults(func=cmd_ca_status)
