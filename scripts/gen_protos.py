"""Generate the Python gRPC stubs from protos/ (run: `make protos`).

The stubs are committed so that `pip install` needs no code generator, but they
are never edited by hand: tests/test_protos.py regenerates them into a
temporary directory and fails if the committed copies differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Generate stubs for every .proto under protos/ into out_dir; return the files written."""
    sources = sorted(PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    written = []
    for src in sources:
        rel = src.relative_to(PROTOS).with_suffix("")
        pkg_dir = out_dir / rel.parent
        # Make every directory on the way a regular package.
        d = pkg_dir
        while d != out_dir:
            init = d / "__init__.py"
            if not init.exists() and d.name != "shopmesh":
                init.write_text("")
            d = d.parent
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            written.append(pkg_dir / f"{rel.name}{suffix}")
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path.relative_to(out))
