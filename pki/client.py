"""Client side of the CA's gRPC API, shared by the agent, the runner and the tests.

Clients dial the CA by any address but verify its certificate against the
trust bundle and the DNS name ca.shopmesh.internal (ssl_target_name_override),
so the CA can move between 127.0.0.1, a compose service name or a pod IP
without reissuing its certificate.
"""

from __future__ import annotations

import grpc

from pki.ca import CA_SERVER_DNS_NAME


def ca_channel(
    address: str,
    bundle_pem: bytes,
    *,
    key_pem: bytes | None = None,
    cert_chain_pem: bytes | None = None,
) -> grpc.aio.Channel:
    """A TLS channel to the CA at address ('host:port'); pass key and chain for the mTLS renew port."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=bundle_pem, private_key=key_pem, certificate_chain=cert_chain_pem
    )
    options = [
        ("grpc.ssl_target_name_override", CA_SERVER_DNS_NAME),
        # A private subchannel pool: each rotation dials with a new client
        # certificate and must never reuse a connection made with the old one.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.aio.secure_channel(address, credentials, options=options)
