"""Shared test fixtures: where the real YOLOv9 fixtures live; real servers come from ``servers.py``.

The fixtures (official YOLOv9 checkpoints, reference outputs, block goldens, the eval set) ship with the repository
in ``tests/fixtures`` (see its README); ``$REPARAM_FIXTURES`` points the tests at another copy. This module is the
one place that resolves them: tests use the session fixture ``fixtures`` or, at import time, ``fixture_path``, and
the benchmarks in ``bench/`` import ``fixtures_root``. A missing fixture fails with one line naming the path; it is
never a skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["servers"]

REPO = Path(__file__).resolve().parents[1]
#: the variable that overrides the fixtures root
FIXTURES_ENV = "REPARAM_FIXTURES"


def fixtures_root() -> Path:
    """The fixtures root: ``tests/fixtures`` of this checkout, or ``$REPARAM_FIXTURES`` when set (not checked)."""
    env = os.environ.get(FIXTURES_ENV)
    return Path(env) if env else REPO / "tests" / "fixtures"


def missing_fixture(path: Path) -> str:
    """The one line that reports a missing fixture ``path`` (it names the path and how to override the root)."""
    env = os.environ.get(FIXTURES_ENV)
    where = f"{FIXTURES_ENV}={env}" if env else f"the repository's tests/fixtures; {FIXTURES_ENV} overrides it"
    return f"fixture missing: {path} (fixtures root from {where})"


def fixture_path(*parts: str) -> Path:
    """``fixtures_root() / parts`` when it exists, for module-level use (collection time).

    Raises ``pytest.fail.Exception`` (one line, no traceback) when the file or folder is missing: during collection
    that is a collection error, so the run fails instead of collecting nothing.
    """
    path = fixtures_root().joinpath(*parts)
    if not path.exists():
        pytest.fail(missing_fixture(path), pytrace=False)
    return path


def installed(path: str | None, name: str) -> str:
    """``path`` of Debian's ``prometheus`` package binary ``name`` (``shutil.which``); when it is missing the test
    fails in one line (never a skip: ``.ci/run`` installs the package)."""
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install -y prometheus (as root; .ci/run does it)",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The fixtures root (a Path); fails every test that asks for it when the root has no README.md."""
    return fixture_path("README.md").parent


# --- every report.json the suite produces is validated against the shipped schema (tests/report_schema.py) -------

@pytest.fixture(scope="session", autouse=True)
def _report_schema_in_process():
    """Validate each report the converter writes in this process, before it is written."""
    from reparam import report as report_mod
    from reparam.converter import artifacts

    import report_schema

    original = artifacts._write_json

    def checked_write(path: Path, report) -> None:
        if path.name in ("report.json", ".report.json.tmp"):
            report_schema.check(json.loads(report_mod.dumps(report)), str(path))
        original(path, report)

    artifacts._write_json = checked_write
    yield
    artifacts._write_json = original


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Validate every report.json left under pytest's temporary folders (written by CLI subprocesses too)."""
    import report_schema

    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and getattr(factory, "_basetemp", None) is not None:
        report_schema.check_tree(factory.getbasetemp())
    if report_schema.problems:
        for line in report_schema.problems[:20]:
            print(f"\nreport.schema.json: {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    import report_schema

    if report_schema.checked:
        terminalreporter.write_line(f"report.schema.json: {len(report_schema.checked)} reports validated, "
                                    f"{len(report_schema.problems)} invalid")
