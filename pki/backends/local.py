"""The local CA backend: self-signed roots in <state>/ca/local, rotated without downtime."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from pki.authority import AuthorityState, AuthorityStore
from pki.backends import BackendState, CaBackend, Profile, authority_infos
from pki.ca import local_store
from pki.errors import CaStateError, RotationError


class LocalBackend(CaBackend):
    """Signs with the active root of an AuthorityStore; the store's roots form the bundle."""

    def __init__(self, state_dir: Path, trust_domain: str) -> None:
        self.name = "local"
        self.trust_domain = trust_domain
        self.store: AuthorityStore = local_store(state_dir, trust_domain)
        self._state = self.store.load()

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

    def prepare(self) -> None:
        self._state = self._rotation_step(self.store.prepare)

    def activate(self) -> None:
        self._state = self._rotation_step(self.store.activate)

    def retire(self) -> None:
        self._state = self._rotation_step(self.store.retire)

    @staticmethod
    def _rotation_step(step: Callable[[], AuthorityState]) -> AuthorityState:
        try:
            return step()
        except CaStateError as err:
            raise RotationError(str(err)) from err
