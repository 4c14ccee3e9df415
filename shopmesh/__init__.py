"""ShopMesh: a reference zero-trust service mesh (shared plumbing, CLI, local runner)."""
