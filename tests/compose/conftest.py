"""The compose suite's fixture: the real stack, built, started, torn down.

Needs a Docker engine. Without one the suite is skipped, and the skip says
why; with SHOPMESH_REQUIRE_DOCKER=1 (set by .ci/run) a missing engine is a
failure instead, so CI on this machine always runs it.

Teardown always runs `compose down -v` (containers, network and every named
volume). If any compose test failed, `compose logs` is printed first and kept
in build/compose-test/compose.log.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from compose_stack import LOG_DIR, Stack, StackError, engine_problem, prepare, say

# Short enough for several rotations within a test, long enough that two
# slow cores never let a certificate lapse between renewals.
TEST_TTL = "20s"
REQUIRE_ENV = "SHOPMESH_REQUIRE_DOCKER"

_outcome: dict[str, object] = {"ran": False, "reason": None, "failed": False, "notes": []}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "compose: the compose suite (real compose.yaml under a real Docker engine)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.compose)
            # Slow like the mesh tests: the fast suite (-m "not mesh") leaves it out.
            item.add_marker(pytest.mark.mesh)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and "compose" in item.keywords:
        _outcome["failed"] = True


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _outcome["ran"]:
        terminalreporter.write_line("compose suite: ran against the Docker engine; " + "; ".join(map(str, _outcome["notes"])))
    elif _outcome["reason"]:
        terminalreporter.write_line(f"compose suite did NOT run: {_outcome['reason']}", yellow=True)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    problem = engine_problem()
    if problem:
        _outcome["reason"] = problem
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"the compose suite must run here ({REQUIRE_ENV}=1), but {problem}", pytrace=False)
        pytest.skip(f"compose suite did not run: {problem} (set {REQUIRE_ENV}=1 to make this a failure)")
    try:
        s = prepare(TEST_TTL)
    except StackError as err:
        pytest.fail(f"compose suite: preparing the images failed: {err}", pytrace=False)
    _outcome["notes"] = s.notes
    s.down()  # leftovers of an interrupted run
    try:
        s.build()
        s.up()
    except StackError as err:
        _dump_logs(s)
        s.down()
        pytest.fail(f"compose suite: bringing the stack up failed: {err}", pytrace=False)
    _outcome["ran"] = True
    try:
        yield s
    finally:
        if _outcome["failed"]:
            _dump_logs(s)
        s.down()


def _dump_logs(s: Stack) -> None:
    logs = s.logs()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    path = LOG_DIR / "compose.log"
    path.write_text(logs)
    states = s.states() if logs else {}
    say(f"container states: {states}")
    say(f"compose logs (full text in {path}):\n" + "\n".join(logs.splitlines()[-400:]))
