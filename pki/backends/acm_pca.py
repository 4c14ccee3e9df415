"""AWS Certificate Manager Private CA as the mesh's CA, through boto3.

Two modes (`python -m pki.ca_server --ca acm-pca --pca-mode upstream|direct`):

- **upstream**: PCA signs the mesh's intermediate (template
  SubordinateCACertificate_PathLen0/V1); the intermediate, whose key stays in
  the CA state directory (0600), signs the short-lived leaves. One PCA
  certificate per intermediate lifetime instead of one per leaf: the cheap
  path for short TTLs (SPIRE's `aws_pca` UpstreamAuthority does the same).
  The intermediate is renewed at half its life; `shopmesh ca rotate` forces it.
- **direct**: PCA signs every leaf: IssueCertificate with the API-passthrough
  template (EndEntityCertificate_APIPassthrough/V1) carrying the URI SAN, key
  usage and extended key usage, the validity as an ABSOLUTE time, then the
  `certificate_issued` waiter, as AWS recommends (issuance is asynchronous).

Endpoint, region and credentials come from the standard AWS SDK configuration
(AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_ACM_PCA, AWS_REGION, AWS_PROFILE, …), so
the same code runs against moto, LocalStack and AWS.

Whatever PCA returns is checked before anyone gets it: it must parse, carry
the CSR's key and the requested SPIFFE ID, meet the X509-SVID profile (or the
CA profile for an intermediate), and chain to the PCA's certificate. A
failure is an IssuanceError: the agent keeps its current certificate and
retries with back-off (ACCEPTANCE row 27).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from pki.authority import (
    BACKDATE,
    AuthorityKey,
    AuthorityState,
    AuthorityStore,
    ca_profile_problems,
    fingerprint,
    leaf_spiffe_id,
    serial_hex,
    svid_profile_problems,
    write_public_file,
)
from pki.backends import BackendState, CaBackend, Profile, authority_infos
from pki.errors import (
    CaNotUsableError,
    CaResponseError,
    CaStateError,
    CaUnavailableError,
    IssuanceError,
    RotationError,
    SvidError,
)

log = logging.getLogger("pki.backends.acm_pca")

TEMPLATE_API_PASSTHROUGH = "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"
TEMPLATE_SUBORDINATE_PATHLEN0 = "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1"
TEMPLATE_ROOT = "arn:aws:acm-pca:::template/RootCACertificate/V1"
ARN_PATTERN = re.compile(r"^arn:aws[a-z-]*:acm-pca:([a-z0-9-]+):(\d{12}):certificate-authority/([0-9a-fA-F-]{1,64})$")
MODES = ("upstream", "direct")
CREATED_FILE = "pca-created.json"

# The certificate_issued waiter polls GetCertificate; bounded so that a CA
# call finishes well inside the agent's deadline (pki.agent.CA_CALL_TIMEOUT_S).
WAITER = {"Delay": 1, "MaxAttempts": 6}
# The mesh intermediate lives at least this long (or four agent-SVID
# lifetimes), and is renewed at half its life.
MIN_INTERMEDIATE_TTL = timedelta(hours=24)

_THROTTLING = {"ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded", "Throttling", "SlowDown"}


def parse_arn(arn: str) -> tuple[str, str, str]:
    """(region, account, CA id) of a PCA ARN; ValueError naming the ARN if it is not one."""
    match = ARN_PATTERN.match(arn)
    if not match:
        raise ValueError(
            f"'{arn}' is not an ACM PCA ARN (arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID)"
        )
    return match.group(1), match.group(2), match.group(3)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _epoch(when: datetime) -> int:
    return int(when.timestamp())


@dataclass(frozen=True)
class PcaCertificate:
    """A PCA's own certificate and the chain above it (empty for a root CA)."""

    cert: x509.Certificate
    chain: list[x509.Certificate]

    @property
    def anchor(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.cert

    @property
    def below_anchor(self) -> list[x509.Certificate]:
        """The PCA certificate and any CA between it and the anchor (what leaf chains carry)."""
        return [self.cert, *self.chain[:-1]] if self.chain else []


class PcaClient:
    """The few ACM PCA calls the mesh makes, with every AWS error turned into a message that says what to do."""

    def __init__(self, arn: str | None, region: str | None = None) -> None:
        # Imported here: only the ACM PCA backends need boto3, and it is slow to import.
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        if arn is not None:
            region = parse_arn(arn)[0]
        region = region or session.region_name
        if not region:
            raise CaStateError("no AWS region: set AWS_REGION (or a region in the AWS config)")
        self.region = region
        self.arn = arn or ""
        self._client = session.client(
            "acm-pca",
            region_name=region,
            # Bounded network waits; retries follow the SDK configuration
            # (AWS_RETRY_MODE, AWS_MAX_ATTEMPTS), throttling included.
            config=Config(connect_timeout=3, read_timeout=5, user_agent_extra="shopmesh-ca"),
        )
        self.endpoint = self._client.meta.endpoint_url

    # --- errors --------------------------------------------------------------

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            response: dict[str, Any] = getattr(self._client, _snake(operation))(**params)
            return response
        except ClientError as err:
            raise self._client_error(operation, err.response.get("Error", {})) from err
        except NoCredentialsError as err:
            raise CaNotUsableError(f"ACM PCA {operation}: no AWS credentials ({err})") from err
        except BotoCoreError as err:
            raise CaUnavailableError(f"cannot reach ACM PCA at {self.endpoint} for {operation}: {err}") from err

    def _client_error(self, operation: str, error: dict[str, Any]) -> IssuanceError:
        code, message = error.get("Code", "Unknown"), error.get("Message", "")
        where = f"ACM PCA {self.arn or self.region}"
        if code in _THROTTLING:
            return CaUnavailableError(f"{where} throttled {operation} ({code}: {message}); retrying with back-off")
        if code == "InvalidStateException":
            return CaNotUsableError(
                f"{where} cannot {operation} ({code}: {message}): the CA is not ACTIVE "
                "(disabled, expired or pending); enable it (aws acm-pca update-certificate-authority --status ACTIVE)"
            )
        if code == "ResourceNotFoundException":
            return CaNotUsableError(
                f"{where} not found in {self.region} ({code}: {message}); check --pca-arn and AWS_REGION"
            )
        if code in ("AccessDeniedException", "UnauthorizedOperation", "UnrecognizedClientException"):
            return CaNotUsableError(
                f"{where}: {operation} denied ({code}: {message}); the CA server's IAM policy needs "
                f"acm-pca:{operation} on this CA (see docs/pki.md)"
            )
        return CaNotUsableError(f"{where}: {operation} failed ({code}: {message})")

    # --- calls -----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        ca: dict[str, Any] = self._call("DescribeCertificateAuthority", CertificateAuthorityArn=self.arn)[
            "CertificateAuthority"
        ]
        return ca

    def require_active(self) -> dict[str, Any]:
        ca = self.describe()
        if ca.get("Status") != "ACTIVE":
            raise CaNotUsableError(
                f"ACM PCA {self.arn} is {ca.get('Status')}, not ACTIVE: it cannot issue "
                "(enable it, or import its certificate if it is PENDING_CERTIFICATE)"
            )
        return ca

    def ca_certificate(self) -> PcaCertificate:
        reply = self._call("GetCertificateAuthorityCertificate", CertificateAuthorityArn=self.arn)
        cert = _parse_pem_certs(reply.get("Certificate", ""), f"the certificate of {self.arn}")
        chain = _parse_pem_certs(reply["CertificateChain"], f"the chain of {self.arn}") if reply.get("CertificateChain") else []
        return PcaCertificate(cert[0], [*cert[1:], *chain])

    def issue(
        self,
        csr_pem: bytes,
        template_arn: str,
        signing_algorithm: str,
        not_before: datetime | None,
        not_after: datetime,
        api_passthrough: dict[str, Any] | None = None,
    ) -> tuple[str, list[x509.Certificate]]:
        """IssueCertificate, wait for it, GetCertificate: (certificate ARN, [cert, *chain])."""
        from botocore.exceptions import WaiterError

        params: dict[str, Any] = {
            "CertificateAuthorityArn": self.arn,
            "Csr": csr_pem,
            "SigningAlgorithm": signing_algorithm,
            "TemplateArn": template_arn,
            # Sub-day lifetimes need an absolute time: DAYS is the smallest unit.
            "Validity": {"Type": "ABSOLUTE", "Value": _epoch(not_after)},
            # Retries of this call (the SDK retries throttling) carry the same
            # token, so PCA issues once.
            "IdempotencyToken": uuid.uuid4().hex[:32],
        }
        if not_before is not None:
            params["ValidityNotBefore"] = {"Type": "ABSOLUTE", "Value": _epoch(not_before)}
        if api_passthrough is not None:
            params["ApiPassthrough"] = api_passthrough
        cert_arn = str(self._call("IssueCertificate", **params)["CertificateArn"])
        try:
            self._client.get_waiter("certificate_issued").wait(
                CertificateAuthorityArn=self.arn, CertificateArn=cert_arn, WaiterConfig=WAITER
            )
        except WaiterError as err:
            last = getattr(err, "last_response", None) or {}
            if "Error" in last:
                raise self._client_error("GetCertificate", last["Error"]) from err
            raise CaUnavailableError(
                f"ACM PCA {self.arn} did not issue {cert_arn} within "
                f"{WAITER['Delay'] * WAITER['MaxAttempts']}s: {err}"
            ) from err
        reply = self._call("GetCertificate", CertificateAuthorityArn=self.arn, CertificateArn=cert_arn)
        cert = _parse_pem_certs(reply.get("Certificate", ""), f"certificate {cert_arn}")
        chain = _parse_pem_certs(reply["CertificateChain"], f"the chain of {cert_arn}") if reply.get("CertificateChain") else []
        return cert_arn, [cert[0], *chain]

    def create_root_ca(self, trust_domain: str, usage_mode: str) -> str:
        """Create a root PCA and install its self-signed certificate (the documented AWS procedure)."""
        from botocore.exceptions import WaiterError

        reply = self._call(
            "CreateCertificateAuthority",
            CertificateAuthorityConfiguration={
                "KeyAlgorithm": "EC_prime256v1",
                "SigningAlgorithm": "SHA256WITHECDSA",
                "Subject": {"Organization": "ShopMesh", "CommonName": f"ShopMesh PCA root {trust_domain}"},
            },
            CertificateAuthorityType="ROOT",
            UsageMode=usage_mode,
            IdempotencyToken=uuid.uuid4().hex[:32],
            Tags=[{"Key": "shopmesh:trust-domain", "Value": trust_domain}],
        )
        self.arn = str(reply["CertificateAuthorityArn"])
        log.info("created ACM PCA %s (%s); installing its root certificate", self.arn, usage_mode)
        try:
            self._client.get_waiter("certificate_authority_csr_created").wait(
                CertificateAuthorityArn=self.arn, WaiterConfig={"Delay": 2, "MaxAttempts": 60}
            )
        except WaiterError as err:
            raise CaUnavailableError(f"ACM PCA {self.arn}: its CSR was not created in time: {err}") from err
        csr = self._call("GetCertificateAuthorityCsr", CertificateAuthorityArn=self.arn)["Csr"]
        not_after = _utcnow() + timedelta(days=3650)
        _, certs = self.issue(csr.encode(), TEMPLATE_ROOT, "SHA256WITHECDSA", None, not_after)
        self._call(
            "ImportCertificateAuthorityCertificate",
            CertificateAuthorityArn=self.arn,
            Certificate=certs[0].public_bytes(serialization.Encoding.PEM),
        )
        return self.arn


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def _parse_pem_certs(text: str | bytes, what: str) -> list[x509.Certificate]:
    data = text.encode() if isinstance(text, str) else text
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise CaResponseError(f"ACM PCA returned {what} that is not PEM ({len(data)} bytes): {err}") from err
    return certs


def _signing_algorithm(ca: dict[str, Any]) -> str:
    algorithm = ca.get("CertificateAuthorityConfiguration", {}).get("SigningAlgorithm")
    return str(algorithm or "SHA256WITHECDSA")


def resolve_pca(
    state_dir: Path, arn: str | None, create: bool, mode: str, trust_domain: str
) -> PcaClient:
    """A client for the PCA to use: --pca-arn, or with --pca-create the one created earlier for this
    state directory if it is still ACTIVE, else a new one."""
    if arn is not None:
        client = PcaClient(arn)
        client.require_active()
        return client
    assert create
    record = Path(state_dir) / "ca" / CREATED_FILE
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("mode") == mode:
            try:
                client = PcaClient(previous["arn"])
                client.require_active()
            except IssuanceError as err:
                log.info("not reusing ACM PCA %s created earlier: %s", previous.get("arn"), err)
            else:
                log.info("reusing ACM PCA %s created earlier for %s", client.arn, state_dir)
                return client
    client = PcaClient(None)
    # Short-lived mode is cheaper per certificate and caps validity at 7 days:
    # fine when PCA signs every (minutes-long) leaf, too short for an
    # intermediate that should outlive many agent SVIDs.
    client.create_root_ca(trust_domain, "SHORT_LIVED_CERTIFICATE" if mode == "direct" else "GENERAL_PURPOSE")
    record.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_public_file(record, json.dumps({"arn": client.arn, "mode": mode, "region": client.region}).encode() + b"\n")
    return client


class _PcaBackend(CaBackend):
    def __init__(self, client: PcaClient, trust_domain: str) -> None:
        self.client = client
        self.trust_domain = trust_domain
        ca = client.require_active()
        self.signing_algorithm = _signing_algorithm(ca)
        self.pca = client.ca_certificate()
        problems = ca_profile_problems(self.pca.cert)
        if problems:
            raise CaStateError(f"ACM PCA {client.arn}'s certificate is not a CA certificate: {'; '.join(problems)}")
        log.info(
            "ACM PCA %s (%s, %s, signs with %s): certificate %s, valid until %s, trust anchor %s",
            client.arn,
            ca.get("Type"),
            ca.get("UsageMode", "GENERAL_PURPOSE"),
            self.signing_algorithm,
            self.pca.cert.subject.rfc4514_string(),
            self.pca.cert.not_valid_after_utc.isoformat(),
            fingerprint(self.pca.anchor)[:16],
        )

    def _check_issued(
        self, certs: list[x509.Certificate], csr: x509.CertificateSigningRequest, spiffe_id: str, cert_arn: str
    ) -> None:
        leaf = certs[0]
        if leaf.public_key() != csr.public_key():
            raise CaResponseError(f"ACM PCA issued {cert_arn} (serial {serial_hex(leaf)}) for another key than the CSR's")
        try:
            got = leaf_spiffe_id(leaf)
        except SvidError as err:
            raise CaResponseError(f"ACM PCA issued {cert_arn} without the requested URI SAN: {err}") from err
        if got != spiffe_id:
            raise CaResponseError(f"ACM PCA issued {cert_arn} for '{got}', not '{spiffe_id}'")


class DirectBackend(_PcaBackend):
    """PCA signs every leaf (API-passthrough template)."""

    def __init__(self, client: PcaClient, trust_domain: str) -> None:
        self.name = "acm-pca direct"
        super().__init__(client, trust_domain)

    def state(self) -> BackendState:
        return BackendState(
            bundle=[self.pca.anchor],
            signing_authority=fingerprint(self.pca.cert),
            intermediates=self.pca.below_anchor,
        )

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        spiffe_id: str,
        ttl: timedelta,
        profile: Profile = Profile.SVID,
        dns_names: tuple[str, ...] = (),
    ) -> list[x509.Certificate]:
        now = _utcnow()
        not_after = min(now + ttl, self.pca.cert.not_valid_after_utc)
        sans: list[dict[str, str]] = [{"UniformResourceIdentifier": spiffe_id}]
        sans += [{"DnsName": d} for d in dns_names]
        usages = [{"ExtendedKeyUsageType": "SERVER_AUTH"}]
        if profile is Profile.SVID:
            usages.append({"ExtendedKeyUsageType": "CLIENT_AUTH"})
        passthrough = {
            "Subject": {"Organization": "SPIFFE"} if profile is Profile.SVID else {"CommonName": dns_names[0]},
            "Extensions": {
                "SubjectAlternativeNames": sans,
                "KeyUsage": {"DigitalSignature": True},
                "ExtendedKeyUsage": usages,
            },
        }
        cert_arn, certs = self.client.issue(
            csr.public_bytes(serialization.Encoding.PEM),
            TEMPLATE_API_PASSTHROUGH,
            self.signing_algorithm,
            now - BACKDATE,
            not_after,
            passthrough,
        )
        self._check_issued(certs, csr, spiffe_id, cert_arn)
        if profile is Profile.SVID:
            problems = svid_profile_problems(certs[0])
            if problems:
                raise CaResponseError(
                    f"ACM PCA issued {cert_arn} that is not an X509-SVID: {'; '.join(problems)} "
                    f"(template {TEMPLATE_API_PASSTHROUGH})"
                )
        # Serve the leaf with PCA's own chain below the anchor, whatever
        # GetCertificate put in CertificateChain.
        chain = [certs[0], *self.pca.below_anchor]
        log.info(
            "ACM PCA issued %s serial %s for %s, not_after %s (asked %s)",
            cert_arn,
            serial_hex(certs[0]),
            spiffe_id,
            certs[0].not_valid_after_utc.isoformat(),
            not_after.isoformat(),
        )
        return chain


class UpstreamBackend(_PcaBackend):
    """PCA signs the mesh's intermediate; the intermediate signs the leaves."""

    def __init__(self, client: PcaClient, trust_domain: str, state_dir: Path, leaf_ttl_hint: timedelta) -> None:
        self.name = "acm-pca upstream"
        super().__init__(client, trust_domain)
        self.intermediate_ttl = max(MIN_INTERMEDIATE_TTL, 4 * leaf_ttl_hint)
        ca_id = parse_arn(client.arn)[2]
        self.store = AuthorityStore(
            Path(state_dir) / "ca" / f"pca-{ca_id}", self._new_intermediate, f"ACM PCA upstream {ca_id[:8]}"
        )
        self._lock = threading.Lock()
        self._state = self.store.load()
        self._check_anchor(self._state)

    def _check_anchor(self, state: AuthorityState) -> None:
        anchor = fingerprint(self.pca.anchor)
        for authority in state.all():
            if fingerprint(authority.anchor) != anchor:
                raise CaStateError(
                    f"intermediate {authority.id} in {self.store.directory} chains to another root than "
                    f"{self.client.arn}'s; move that directory away"
                )

    def _new_intermediate(self, key: AuthorityKey) -> list[x509.Certificate]:
        now = _utcnow()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ShopMesh"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ShopMesh intermediate {self.trust_domain} {now:%Y-%m-%dT%H:%M:%S}"),
            ]
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(name)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        not_after = min(now + self.intermediate_ttl, self.pca.cert.not_valid_after_utc)
        cert_arn, certs = self.client.issue(
            csr.public_bytes(serialization.Encoding.PEM),
            TEMPLATE_SUBORDINATE_PATHLEN0,
            self.signing_algorithm,
            now - BACKDATE,
            not_after,
        )
        intermediate = certs[0]
        if intermediate.public_key() != key.public_key():
            raise CaResponseError(f"ACM PCA issued intermediate {cert_arn} for another key than ours")
        problems = ca_profile_problems(intermediate)
        if problems:
            raise CaResponseError(
                f"ACM PCA issued intermediate {cert_arn} that cannot sign leaves: {'; '.join(problems)} "
                f"(template {TEMPLATE_SUBORDINATE_PATHLEN0}; stock moto does not implement it: "
                "run `python -m pki.testing_moto`)"
            )
        log.info(
            "ACM PCA signed the mesh intermediate %s serial %s, valid until %s",
            cert_arn,
            serial_hex(intermediate),
            intermediate.not_valid_after_utc.isoformat(),
        )
        return [intermediate, self.pca.cert, *self.pca.chain]

    def state(self) -> BackendState:
        s = self._state
        return BackendState(
            bundle=s.bundle(),
            signing_authority=s.active.fingerprint,
            intermediates=s.intermediates(),
            authorities=authority_infos(s),
        )

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        spiffe_id: str,
        ttl: timedelta,
        profile: Profile = Profile.SVID,
        dns_names: tuple[str, ...] = (),
    ) -> list[x509.Certificate]:
        active = self._state.active
        if profile is Profile.SERVER:
            leaf = active.sign_server_certificate(csr.public_key(), spiffe_id, list(dns_names), ttl)
        else:
            leaf = active.sign_svid(csr.public_key(), spiffe_id, ttl)
        return [leaf, *active.leaf_intermediates]

    def maintain(self) -> bool:
        """Renew the intermediate at half its life; forget retiring ones once they expired."""
        with self._lock:
            state = self._state
            active = state.active.cert
            half = active.not_valid_before_utc + (active.not_valid_after_utc - active.not_valid_before_utc) / 2
            now = _utcnow()
            changed = False
            if now >= half and state.prepared is None:
                log.info("the mesh intermediate %s is past half its life: renewing it", state.active.id)
                self.store.prepare()
                state = self.store.activate()
                changed = True
            if any(a.cert.not_valid_after_utc <= now for a in state.retiring):
                # Every leaf an intermediate signed expires with it.
                state = self.store.retire()
                changed = True
            self._state = state
            return changed

    # Rotating the intermediate does not change the bundle (the PCA root):
    # leaves of the old intermediate keep verifying until they expire.
    def prepare(self) -> None:
        with self._lock:
            self._state = _rotation(self.store.prepare)

    def activate(self) -> None:
        with self._lock:
            self._state = _rotation(self.store.activate)

    def retire(self) -> None:
        with self._lock:
            self._state = _rotation(self.store.retire)


def _rotation(step: Any) -> AuthorityState:
    try:
        state: AuthorityState = step()
    except CaStateError as err:
        raise RotationError(str(err)) from err
    return state


def open_backend(
    state_dir: Path, trust_domain: str, arn: str | None, create: bool, mode: str, leaf_ttl_hint: timedelta
) -> CaBackend:
    if mode not in MODES:
        raise CaStateError(f"invalid ACM PCA mode '{mode}': one of {', '.join(MODES)}")
    client = resolve_pca(state_dir, arn, create, mode, trust_domain)
    if mode == "direct":
        return DirectBackend(client, trust_domain)
    return UpstreamBackend(client, trust_domain, state_dir, leaf_ttl_hint)
