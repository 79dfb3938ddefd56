"""Fixtures of the reliability tests.

* ``fuzz_cases``: a counter of fuzz cases sent, by ``(app, status)``; the totals are printed
  in the terminal summary ("fuzz cases run: ...").
"""

from __future__ import annotations

from collections import Counter

import pytest

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
