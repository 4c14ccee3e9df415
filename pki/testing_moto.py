"""ACM Private CA stand-ins for tests: moto taught two templates, and a fault-injecting proxy.

`python -m pki.testing_moto -H 127.0.0.1 -p PORT` runs moto's server (a real
HTTP endpoint, as `shopmesh.awsstub` does) after teaching its ACM PCA model
what AWS documents and moto 5.2.5 leaves out ("not yet implemented:
ApiPassthrough"; unknown templates get no extensions at all):

- template SubordinateCACertificate_PathLen0/V1: a CA certificate
  (basicConstraints cA=true pathLen=0, keyUsage keyCertSign+cRLSign+digitalSignature);
- template EndEntityCertificate_APIPassthrough/V1: basicConstraints cA=false,
  and the Subject, subject alternative names, key usage and extended key
  usage passed in ApiPassthrough;
- IssueCertificate on a CA that is not ACTIVE fails with InvalidStateException,
  as AWS does (moto issues anyway).

Without the first two, stock moto's "intermediate" cannot sign anything and
its "SVIDs" carry no key usage: the mesh refuses both, so tests need them.
Validity stays ignored (moto issues one year): the agent must, and does,
follow each certificate's own notAfter. Nothing here touches boto3: the code
under test talks HTTP to this server exactly as it would to AWS.

PcaFaultProxy sits between the CA server and moto and makes chosen ACM PCA
operations fail the way AWS fails (throttling, any error code) or return a
corrupted certificate, while everything else is forwarded untouched.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shopmesh.awsstub import MotoServer, moto_server

SUBORDINATE_PATHLEN0 = "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1"
API_PASSTHROUGH = "arn:aws:acm-pca:::template/EndEntityCertificate_APIPassthrough/V1"

_KEY_USAGE_FIELDS = {
    "DigitalSignature": "digital_signature",
    "NonRepudiation": "content_commitment",
    "KeyEncipherment": "key_encipherment",
    "DataEncipherment": "data_encipherment",
    "KeyAgreement": "key_agreement",
    "KeyCertSign": "key_cert_sign",
    "CRLSign": "crl_sign",
    "EncipherOnly": "encipher_only",
    "DecipherOnly": "decipher_only",
}


def install_templates() -> None:
    """Teach moto's ACM PCA model the two templates and the ACTIVE check (see the module doc)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    from moto.acmpca import models, responses
    from moto.acmpca.exceptions import InvalidStateException
    from moto.moto_api._internal import mock_random

    eku_oids = {
        "SERVER_AUTH": ExtendedKeyUsageOID.SERVER_AUTH,
        "CLIENT_AUTH": ExtendedKeyUsageOID.CLIENT_AUTH,
        "CODE_SIGNING": ExtendedKeyUsageOID.CODE_SIGNING,
        "EMAIL_PROTECTION": ExtendedKeyUsageOID.EMAIL_PROTECTION,
        "TIME_STAMPING": ExtendedKeyUsageOID.TIME_STAMPING,
        "OCSP_SIGNING": ExtendedKeyUsageOID.OCSP_SIGNING,
    }
    subject_oids = {
        "Country": NameOID.COUNTRY_NAME,
        "State": NameOID.STATE_OR_PROVINCE_NAME,
        "Organization": NameOID.ORGANIZATION_NAME,
        "OrganizationalUnit": NameOID.ORGANIZATIONAL_UNIT_NAME,
        "CommonName": NameOID.COMMON_NAME,
    }

    def key_usage(flags: dict[str, bool]) -> x509.KeyUsage:
        values = {attr: bool(flags.get(name, False)) for name, attr in _KEY_USAGE_FIELDS.items()}
        return x509.KeyUsage(**values)

    def general_name(entry: dict[str, str]) -> x509.GeneralName:
        if "UniformResourceIdentifier" in entry:
            return x509.UniformResourceIdentifier(entry["UniformResourceIdentifier"])
        if "DnsName" in entry:
            return x509.DNSName(entry["DnsName"])
        raise ValueError(f"unsupported SubjectAlternativeNames entry {entry}")

    original_issue = models.CertificateAuthority.issue_certificate

    def issue_certificate(self: Any, csr_bytes: bytes, template_arn: str | None, passthrough: dict[str, Any] | None = None) -> str:
        if template_arn not in (SUBORDINATE_PATHLEN0, API_PASSTHROUGH):
            return str(original_issue(self, csr_bytes, template_arn))
        csr = x509.load_pem_x509_csr(base64.b64decode(csr_bytes))
        issuer_key = self.key.public_key()
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key), False),
            (x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False),
        ]
        subject = csr.subject
        if template_arn == SUBORDINATE_PATHLEN0:
            extensions += [
                (x509.BasicConstraints(ca=True, path_length=0), True),
                (key_usage({"KeyCertSign": True, "CRLSign": True, "DigitalSignature": True}), True),
            ]
            with contextlib.suppress(x509.ExtensionNotFound):
                san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                extensions.append((san.value, san.critical))
        else:
            passthrough = passthrough or {}
            if passthrough.get("Subject"):
                subject = x509.Name(
                    [x509.NameAttribute(subject_oids[k], v) for k, v in passthrough["Subject"].items() if k in subject_oids]
                )
            ext = passthrough.get("Extensions", {})
            extensions.append((x509.BasicConstraints(ca=False, path_length=None), True))
            extensions.append(
                (key_usage(ext["KeyUsage"]) if "KeyUsage" in ext else key_usage({"DigitalSignature": True, "KeyEncipherment": True}), True)
            )
            if ext.get("ExtendedKeyUsage"):
                extensions.append(
                    (x509.ExtendedKeyUsage([eku_oids[u["ExtendedKeyUsageType"]] for u in ext["ExtendedKeyUsage"]]), False)
                )
            if ext.get("SubjectAlternativeNames"):
                names = [general_name(e) for e in ext["SubjectAlternativeNames"]]
                extensions.append((x509.SubjectAlternativeName(names), False))
            else:
                with contextlib.suppress(x509.ExtensionNotFound):
                    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                    extensions.append((san.value, san.critical))
        new_cert = self.generate_cert(subject=subject, public_key=csr.public_key(), extensions=extensions)
        cert_id = str(mock_random.uuid4()).replace("-", "")
        cert_arn = f"{self.arn}/certificate/{cert_id}"
        self.issued_certificates[cert_arn] = new_cert
        self.issued_certificates_certificate_chains[cert_arn] = self.certificate_bytes
        return cert_arn

    def backend_issue(
        self: Any, certificate_authority_arn: str, csr: bytes, template_arn: str | None, api_passthrough: dict[str, Any] | None = None
    ) -> str:
        ca = self.describe_certificate_authority(certificate_authority_arn)
        is_root_install = template_arn == "arn:aws:acm-pca:::template/RootCACertificate/V1"
        # AWS issues only from an ACTIVE CA, except the CA's own root
        # certificate while it is PENDING_CERTIFICATE.
        if ca.status != "ACTIVE" and not (is_root_install and ca.status == "PENDING_CERTIFICATE"):
            raise InvalidStateException(certificate_authority_arn)
        return str(ca.issue_certificate(csr, template_arn, api_passthrough))

    def response_issue(self: Any) -> str:
        params = json.loads(self.body)
        certificate_arn = self.acmpca_backend.issue_certificate(
            certificate_authority_arn=params.get("CertificateAuthorityArn"),
            csr=params.get("Csr").encode("utf-8"),
            template_arn=params.get("TemplateArn"),
            api_passthrough=params.get("ApiPassthrough"),
        )
        return json.dumps({"CertificateArn": certificate_arn})

    models.CertificateAuthority.issue_certificate = issue_certificate  # type: ignore[method-assign]
    models.ACMPCABackend.issue_certificate = backend_issue  # type: ignore[method-assign]
    responses.ACMPCAResponse.issue_certificate = response_issue  # type: ignore[method-assign]


@contextlib.contextmanager
def pca_moto_server(host: str = "127.0.0.1", log_file: Path | None = None, timeout_s: float = 30) -> Iterator[MotoServer]:
    """Start `python -m pki.testing_moto` (moto with the PCA templates); stop it by pid on exit."""
    with moto_server(host, log_file, timeout_s, module="pki.testing_moto") as server:
        yield server


@dataclass
class _Fault:
    operation: str
    kind: str  # "error" or "corrupt"
    code: str = ""
    message: str = ""
    status: int = 400
    remaining: int | None = None  # None: until cleared


class PcaFaultProxy:
    """An HTTP proxy in front of moto that fails chosen ACM PCA operations like AWS does.

        with PcaFaultProxy(moto.endpoint) as proxy:
            env = {**moto.env(), "AWS_ENDPOINT_URL": proxy.endpoint}
            proxy.fail("IssueCertificate", "ThrottlingException", "Rate exceeded")
            proxy.corrupt("GetCertificate")
            proxy.clear()
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.calls: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        # Every ACM PCA request body seen, in order: what the code under test asked AWS for.
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                proxy._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                proxy._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="pca-fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> PcaFaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def fail(self, operation: str, code: str, message: str = "", status: int = 400, times: int | None = None) -> None:
        """Answer `operation` with an AWS JSON error (e.g. ThrottlingException) instead of forwarding it."""
        with self._lock:
            self._faults.append(_Fault(operation, "error", code, message or code, status, times))

    def corrupt(self, operation: str = "GetCertificate", times: int | None = None) -> None:
        """Forward `operation`, then cut the PEM in its Certificate field in half."""
        with self._lock:
            self._faults.append(_Fault(operation, "corrupt", remaining=times))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take(self, operation: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.operation == operation:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        target = request.headers.get("X-Amz-Target", "")
        operation = target.rpartition(".")[2]
        self.calls[operation] += 1
        if operation and body:
            with contextlib.suppress(ValueError):
                self.requests.append((operation, json.loads(body)))
        fault = self._take(operation) if operation else None
        if fault is not None and fault.kind == "error":
            self.injected[operation] += 1
            payload = json.dumps({"__type": fault.code, "message": fault.message}).encode()
            self._reply(request, fault.status, {"Content-Type": "application/x-amz-json-1.1", "x-amzn-ErrorType": fault.code}, payload)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length", "connection")}
            conn.request(request.command, request.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            reply_headers = {k: v for k, v in response.getheaders() if k.lower() not in ("content-length", "connection", "transfer-encoding")}
            status = response.status
        finally:
            conn.close()
        if fault is not None and fault.kind == "corrupt" and status == 200:
            self.injected[operation] += 1
            doc = json.loads(data)
            cert = doc.get("Certificate", "")
            doc["Certificate"] = cert[: len(cert) // 2] + "\n-----END CERTIFICATE-----\n"
            data = json.dumps(doc).encode()
        self._reply(request, status, reply_headers, data)

    @staticmethod
    def _reply(request: http.server.BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def main(argv: list[str] | None = None) -> None:
    install_templates()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main()
