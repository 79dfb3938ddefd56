"""Fixtures of the reliability tests.

* ``fleet``: the integration tests' fleet (a real controller process and real in-process
  sidecars), re-exported rather than copied.
* ``fuzz_cases``: a counter of fuzz cases sent, by ``(app, status)``; the totals are printed
  in the terminal summary ("fuzz cases run: ...").
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.integration.conftest import fleet  # noqa: F401  (a pytest fixture, used by name)

_FUZZ_CASES: Counter = Counter()


@pytest.fixture(scope="session")
def fuzz_cases() -> Counter:
    return _FUZZ_CASES


def pytest_terminal_summary(terminalreporter) -> None:
    if not _FUZZ_CASES:
        return
    apps: Counter = Counter()
    for (app, _), n in _FUZZ_CASES.items():
        apps[app] += n
    for app, n in sorted(apps.items()):
        statuses = ", ".join(f"{status}: {k}" for (a, status), k in sorted(_FUZZ_CASES.items())
                             if a == app)
        terminalreporter.write_line(f"fuzz cases run against the {app}: {n} ({statuses})")
    terminalreporter.write_line(f"fuzz cases run: {sum(apps.values())}")
