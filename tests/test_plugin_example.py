"""The pytest plugin used from a test suite outside the package, the way a
user would: examples/rotation-tests runs in its own pytest process, with its
own pytest.ini, and gets the `mesh` fixture from the installed plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mesh

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rotation-tests"


def test_the_example_suite_passes_with_the_installed_plugin(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the example suite needs root for one network namespace per pod")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE), "-q", "-p", "no:cacheprovider",
         "--rootdir", str(EXAMPLE), "--basetemp", str(tmp_path / "basetemp")],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "5 passed" in proc.stdout, proc.stdout[-3000:]
