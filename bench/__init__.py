"""ShopMesh benchmarks: what the mesh costs and how it behaves under load.

`make bench` (python -m bench) runs them all and writes bench/results.json
and docs/benchmarks.md. See docs/benchmarks.md for what each one measures.
"""
