"""ACM Private CA through boto3 against moto (ACCEPTANCE row 27), CA server and agent as processes.

moto runs as a real HTTP server (pki.testing_moto: moto with the two PCA
templates it lacks); a fault-injecting proxy sits in front of it so that
throttling, a corrupted certificate or a vanished CA reach the CA server as
real HTTP answers. The code under test uses boto3 unmodified, configured
only through the standard AWS SDK environment. The mesh tests at the end
place real orders through Envoy in both modes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography import x509

from pki import db
from pki.authority import ca_profile_problems, fingerprint, svid_profile_problems, verify_svid_chain
from pki.backends.acm_pca import TEMPLATE_API_PASSTHROUGH, TEMPLATE_SUBORDINATE_PATHLEN0
from pki.testing import AgentProcess, CaServer, run_ca_server, start_agent
from pki.testing_moto import PcaFaultProxy, pca_moto_server
from pki.tokens import create_join_token, write_token_file
from shopmesh.awsstub import MotoServer

ORDERS = "spiffe://shopmesh.internal/ns/shop/sa/orders"
AGENT = "spiffe://shopmesh.internal/shopmesh/agent/ns/shop/sa/orders"


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with pca_moto_server(log_file=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="module")
def proxy(moto: MotoServer) -> Iterator[PcaFaultProxy]:
    with PcaFaultProxy(moto.endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def aws_env(moto: MotoServer, proxy: PcaFaultProxy) -> dict[str, str]:
    """The CA server's AWS configuration: standard SDK variables only, pointing at the proxy."""
    return {
        **moto.env(),
        "AWS_ENDPOINT_URL_ACM_PCA": proxy.endpoint,
        # One retry: enough to show the SDK retries throttling, quick to give up.
        "AWS_RETRY_MODE": "standard",
        "AWS_MAX_ATTEMPTS": "2",
    }


def pca_client(moto: MotoServer) -> Any:
    """A boto3 client straight to moto, for the test's own look at the PCA (not through the proxy)."""
    return boto3.client(
        "acm-pca", endpoint_url=moto.endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


def joined_agent(ca: CaServer, pod: Path) -> AgentProcess:
    pod.mkdir(parents=True, exist_ok=True)
    write_token_file(pod / "join-token", create_join_token(ca.state_dir, ORDERS))
    return start_agent(ORDERS, ca, pod)


def created_arn(state_dir: Path) -> str:
    return str(json.loads((state_dir / "ca" / "pca-created.json").read_text())["arn"])


def chain_of(agent: AgentProcess) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((agent.data_dir / "svid.pem").read_bytes())


# --- direct mode -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def direct(
    tmp_path_factory: pytest.TempPathFactory, aws_env: dict[str, str], proxy: PcaFaultProxy
) -> Iterator[tuple[CaServer, AgentProcess]]:
    base = tmp_path_factory.mktemp("pca-direct")
    extra = ["--ca", "acm-pca", "--pca-create", "--pca-mode", "direct"]
    with run_ca_server(base / "state", ttl="10s", extra=extra, env=aws_env, timeout=60) as ca:
        agent = joined_agent(ca, base / "orders")
        try:
            agent.status_where(lambda s: s["ready"], "the first SVID from ACM PCA", timeout=30)
            yield ca, agent
        finally:
            agent.process.stop()


def test_direct_mode_has_pca_sign_every_leaf(direct: tuple[CaServer, AgentProcess], moto: MotoServer, proxy: PcaFaultProxy) -> None:
    ca, agent = direct
    arn = created_arn(ca.state_dir)
    pca_cert = x509.load_pem_x509_certificate(
        pca_client(moto).get_certificate_authority_certificate(CertificateAuthorityArn=arn)["Certificate"].encode()
    )
    # The bundle is the PCA's root; the leaf verifies to it and is an X509-SVID.
    assert [fingerprint(c) for c in x509.load_pem_x509_certificates(ca.bundle_path.read_bytes())] == [fingerprint(pca_cert)]
    chain = chain_of(agent)
    assert verify_svid_chain(chain, [pca_cert], "shopmesh.internal") == ORDERS
    assert svid_profile_problems(chain[0]) == []
    status = agent.status()
    assert status is not None and status["issued_serial"] in db.issued_serials(ca.state_dir, ORDERS)

    # What the CA server asked PCA for: the API-passthrough template carrying
    # the URI SAN and key usages, the validity as an ABSOLUTE epoch time.
    issued = [body for op, body in proxy.requests if op == "IssueCertificate" and body.get("TemplateArn") == TEMPLATE_API_PASSTHROUGH]
    sans = [b["ApiPassthrough"]["Extensions"]["SubjectAlternativeNames"] for b in issued]
    assert [{"UniformResourceIdentifier": ORDERS}] in sans and [{"UniformResourceIdentifier": AGENT}] in sans
    workload_request = next(b for b in issued if b["ApiPassthrough"]["Extensions"]["SubjectAlternativeNames"] == [{"UniformResourceIdentifier": ORDERS}])
    # Asked: now + the 10 s TTL, as an absolute time (moto then ignored it and issued a year).
    assert workload_request["Validity"]["Type"] == "ABSOLUTE"
    assert abs(workload_request["Validity"]["Value"] - (chain[0].not_valid_before_utc.timestamp() + 10)) < 5
    assert workload_request["ValidityNotBefore"]["Type"] == "ABSOLUTE"
    assert workload_request["ApiPassthrough"]["Extensions"]["KeyUsage"] == {"DigitalSignature": True}
    assert {u["ExtendedKeyUsageType"] for u in workload_request["ApiPassthrough"]["Extensions"]["ExtendedKeyUsage"]} == {
        "SERVER_AUTH", "CLIENT_AUTH",
    }  # fmt: skip
    assert proxy.calls["GetCertificate"] >= len(issued), "each issuance waits with GetCertificate (certificate_issued)"


def test_direct_mode_rotation_follows_the_certificates_not_after(direct: tuple[CaServer, AgentProcess]) -> None:
    """moto ignores the requested 10 s and issues a year: the agent schedules from notAfter, not from the TTL."""
    _, agent = direct
    status = agent.status()
    assert status is not None
    lifetime = status["not_after"] - status["updated_at"]
    assert lifetime > 300 * 86400, "moto issued about a year"
    next_in = status["next_rotation_at"] - status["updated_at"]
    assert 0.4 * lifetime < next_in < 0.6 * lifetime, "half the remaining lifetime, ±10 %"


FAULTS = {
    "throttling": ("ThrottlingException", "throttled IssueCertificate"),
    "missing ARN": ("ResourceNotFoundException", "not found in us-east-1"),
    "bad PEM": (None, "that is not PEM"),
    "CA disabled": (None, "not ACTIVE"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_issuance_failures_keep_the_current_svid_and_are_retried(
    fault: str, direct: tuple[CaServer, AgentProcess], proxy: PcaFaultProxy, moto: MotoServer
) -> None:
    """Row 27: a clear error in the status, the current certificate kept and served, retried with back-off,
    and a new certificate as soon as PCA issues again (no SIGHUP needed for the retry)."""
    ca, agent = direct
    arn = created_arn(ca.state_dir)
    code, expected = FAULTS[fault]
    before = agent.status_where(lambda s: s["ready"] and s["last_error"] is None, "a healthy agent")
    failures_before = before["renewal_failures"]
    injected_before = sum(proxy.injected.values())
    if fault == "bad PEM":
        proxy.corrupt("GetCertificate")
    elif fault == "CA disabled":
        pca_client(moto).update_certificate_authority(CertificateAuthorityArn=arn, Status="DISABLED")
    else:
        assert code is not None
        proxy.fail("IssueCertificate", code, "injected by the test")
    try:
        agent.process.signal(signal.SIGHUP)
        failing = agent.status_where(
            lambda s: s["renewal_failures"] >= failures_before + 2, f"retried renewals during '{fault}'", timeout=30
        )
        assert expected in failing["last_error"], failing["last_error"]
        assert failing["issued_serial"] == before["issued_serial"] and failing["ready"] is True, "the current SVID is kept"
        if fault != "CA disabled":
            assert sum(proxy.injected.values()) > injected_before
        if fault == "throttling":
            assert proxy.injected["IssueCertificate"] - injected_before >= 2 * 2, "the SDK retried each call once"
    finally:
        proxy.clear()
        if fault == "CA disabled":
            pca_client(moto).update_certificate_authority(CertificateAuthorityArn=arn, Status="ACTIVE")
    recovered = agent.status_where(
        lambda s: s["issued_serial"] != before["issued_serial"] and s["last_error"] is None,
        "a new SVID once PCA issues again", timeout=30,
    )  # fmt: skip
    assert recovered["ready"] is True
    log = (ca.log_path).read_text()
    assert "refused Renew" in log


# --- upstream mode ---------------------------------------------------------------------------


def test_upstream_mode_pca_signs_the_intermediate_once(tmp_path: Path, aws_env: dict[str, str], proxy: PcaFaultProxy) -> None:
    extra = ["--ca", "acm-pca", "--pca-create", "--pca-mode", "upstream"]
    with run_ca_server(tmp_path / "state", ttl="3s", extra=extra, env=aws_env, timeout=60) as ca:
        subordinate_before = sum(
            1 for op, b in proxy.requests if op == "IssueCertificate" and b.get("TemplateArn") == TEMPLATE_SUBORDINATE_PATHLEN0
        )
        agent = joined_agent(ca, tmp_path / "orders")
        try:
            first = agent.status_where(lambda s: s["ready"], "the first SVID")
            # Renewals with the agent SVID, whose chain carries the intermediate.
            agent.status_where(lambda s: s["rotations"] >= 2, "two rotations", timeout=20)
            chain = chain_of(agent)
        finally:
            agent.process.stop()
        assert first["last_error"] is None
        leaf, intermediate = chain
        assert svid_profile_problems(leaf) == []
        assert ca_profile_problems(intermediate) == []
        bc = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca and bc.path_length == 0
        bundle = x509.load_pem_x509_certificates(ca.bundle_path.read_bytes())
        assert verify_svid_chain(chain, bundle, "shopmesh.internal") == ORDERS
        assert fingerprint(intermediate) not in {fingerprint(c) for c in bundle}, "the bundle is the PCA root only"
        # The intermediate key stays in the CA state directory, private.
        [key_file] = list((ca.state_dir / "ca").glob("pca-*/*/key.pem"))
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        subordinate = [b for op, b in proxy.requests if op == "IssueCertificate" and b.get("TemplateArn") == TEMPLATE_SUBORDINATE_PATHLEN0]
        assert len(subordinate) == subordinate_before, "no PCA call per leaf"
        assert len(db.issued_serials(ca.state_dir, ORDERS)) >= 3


# --- configuration errors, at start-up ---------------------------------------------------------


def ca_server(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pki.ca_server", "--state-dir", str(tmp_path / "state"),
            "--join-listen", "127.0.0.1:1", "--renew-listen", "127.0.0.1:2", *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ca", "acm-pca"], "argument --pca-arn: required with --ca acm-pca"),
        (["--ca", "acm-pca", "--pca-arn", "arn:aws:kms:us-east-1:123456789012:key/x"], "is not an ACM PCA ARN"),
        (["--ca", "acm-pca", "--pca-create", "--pca-arn",
          "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/0000"], "not allowed with --pca-arn"),
        (["--pca-create"], "only with --ca acm-pca"),
    ],
    ids=["no ARN", "not a PCA ARN", "ARN and create", "create without acm-pca"],
)
def test_bad_ca_flags_exit_2_naming_the_flag(tmp_path: Path, args: list[str], expected: str) -> None:
    result = ca_server(tmp_path, {}, *args)
    assert result.returncode == 2
    assert expected in result.stderr


def test_a_missing_or_disabled_pca_stops_the_ca_server_at_start_up(tmp_path: Path, aws_env: dict[str, str], moto: MotoServer) -> None:
    missing = "arn:aws:acm-pca:us-east-1:123456789012:certificate-authority/11111111-2222-3333-4444-555555555555"
    result = ca_server(tmp_path, aws_env, "--ca", "acm-pca", "--pca-arn", missing)
    assert result.returncode == 1
    assert f"ACM PCA {missing} not found in us-east-1 (ResourceNotFoundException" in result.stderr

    client = pca_client(moto)
    arn = client.create_certificate_authority(
        CertificateAuthorityConfiguration={
            "KeyAlgorithm": "EC_prime256v1", "SigningAlgorithm": "SHA256WITHECDSA", "Subject": {"CommonName": "disabled"},
        },
        CertificateAuthorityType="ROOT",
    )["CertificateAuthorityArn"]  # fmt: skip
    result = ca_server(tmp_path, aws_env, "--ca", "acm-pca", "--pca-arn", arn)
    assert result.returncode == 1
    assert f"ACM PCA {arn} is PENDING_CERTIFICATE, not ACTIVE" in result.stderr


# --- through the real mesh: orders are paid in both modes ----------------------------------------


@pytest.mark.mesh
@pytest.mark.parametrize("mode", ["upstream", "direct"])
def test_the_mesh_places_real_orders_with_acm_pca(
    mode: str, tmp_path: Path, moto: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shopmesh.testing import start_mesh, stop_mesh

    if os.geteuid() != 0:
        pytest.fail("mesh tests need root for one network namespace per pod")
    # The CA server runs in the host network namespace: moto on 127.0.0.1 is
    # reachable. `shopmesh up` passes this environment to it.
    for name, value in moto.env().items():
        monkeypatch.setenv(name, value)
    mesh = start_mesh(tmp_path / "state", "10s", "netns", ["--ca", "acm-pca", "--pca-create", "--pca-mode", mode])
    try:
        status = mesh.status()
        assert all(entry["ready"] for entry in status.values()), status
        if mode == "upstream":
            # Let every workload rotate once: renewals go through the intermediate too.
            first = {name: entry["serial"] for name, entry in status.items()}
            mesh.wait_until(
                lambda: all(e["serial"] not in (None, first[n]) for n, e in mesh.status().items()),
                30, "every workload to rotate",
            )  # fmt: skip
        else:
            # PCA (moto) issued a year: nothing rotates during the test.
            assert all(entry["expires_in_s"] > 300 * 86400 for entry in status.values()), status
        out = mesh.cli("demo", "--json")
        result = json.loads(out.stdout)
        assert result["state"] == "paid", result
        # Envoys trust the PCA root alone; in upstream mode the leaf is the
        # intermediate's, so the paid order proves every sidecar sent (and
        # every peer verified) the chain leaf + intermediate that SDS serves.
        bundle = x509.load_pem_x509_certificates((mesh.state_dir / "ca" / "root.pem").read_bytes())
        assert len(bundle) == 1 and "ShopMesh PCA root" in bundle[0].subject.rfc4514_string()
        assert datetime.now(timezone.utc) < bundle[0].not_valid_after_utc
        served = x509.load_pem_x509_certificates((mesh.state_dir / "pods" / "orders" / "agent" / "svid.pem").read_bytes())
        if mode == "upstream":
            assert len(served) == 2 and served[0].issuer == served[1].subject != bundle[0].subject
            assert served[1].issuer == bundle[0].subject
        else:
            assert len(served) == 1 and served[0].issuer == bundle[0].subject
    finally:
        stop_mesh(mesh)
