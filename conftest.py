"""Session-wide pytest hooks: the `prefect3` marker and a one-line report of what it covered."""

from __future__ import annotations

import os

import pytest

#: Fixtures that make a test a real-Prefect-3 test even when its author forgot the marker.
PREFECT3_FIXTURES = frozenset({"prefect3_python", "prefect3_server", "prefect3_private_server"})
#: How many `prefect3` tests ran (passed or failed, not skipped); reports reach the xdist controller too.
_prefect3_ran = 0


def _prefect3_skipped() -> bool:
    """Whether the user asked to skip the real-Prefect-3 tests."""
    return os.environ.get("LOCAL_AGENT_SKIP_PREFECT3") == "1"


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker (pytest warns about unknown ones, and warnings are errors here)."""
    config.addinivalue_line("markers", "prefect3: runs against a real Prefect 3.9.1 server (a cached virtualenv)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Prefect 3 fixture, so the count below cannot miss one."""
    for item in items:
        if PREFECT3_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.prefect3)
            # One worker runs them all (with --dist loadgroup), so a run starts one server, not one per worker.
            item.add_marker(pytest.mark.xdist_group("prefect3"))


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say up front when the Prefect 3 tests will be skipped."""
    return "prefect3: skipped by LOCAL_AGENT_SKIP_PREFECT3=1" if _prefect3_skipped() else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count `prefect3` tests whose body ran (a skip in a fixture never reaches "call")."""
    global _prefect3_ran
    if report.when == "call" and "prefect3" in report.keywords and not report.skipped:
        _prefect3_ran += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line saying whether the real-server tests ran, so a green run cannot hide skipping them."""
    if _prefect3_skipped():
        terminalreporter.write_line("prefect3: skipped by LOCAL_AGENT_SKIP_PREFECT3=1")
    else:
        terminalreporter.write_line(f"prefect3: {_prefect3_ran} test(s) ran against a real prefect 3.9.1 server")
