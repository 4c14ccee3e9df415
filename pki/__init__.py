"""ShopMesh PKI: local CA, CA server, join tokens, and the per-pod agent (SDS, Envoy). See pki/README.md."""
