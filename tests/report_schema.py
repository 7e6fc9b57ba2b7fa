"""Every conversion report the test suite produces is validated against the shipped JSON Schema.

``reparam/schemas/report.schema.json`` (:func:`reparam.report.schema`) is checked with the ``jsonschema`` library in
three places, all wired up by ``conftest.py``:

* in-process: every ``report.json`` the converter writes (``reparam.converter.artifacts._write_json`` is wrapped
  for the session), before it reaches the disk;
* out of process (the CLI run as a subprocess, the Job runner of the operator tests): at the end of the session
  every ``report.json`` under pytest's temporary folders is validated;
* ``--json`` outputs the tests parse go through :func:`check` where they are read.

A report that does not validate fails the session with one line per report naming the file and the first error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

from reparam import report as report_mod

_validator = jsonschema.Draft202012Validator(report_mod.schema())
#: How many reports were validated, and the problems found (``"<where>: <error>"``).
checked: list[str] = []
problems: list[str] = []


def problem(report: Any) -> str | None:
    """The first schema error of ``report`` in one line, or ``None`` when it validates."""
    err = jsonschema.exceptions.best_match(_validator.iter_errors(report))
    return None if err is None else f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message[:300]}"


def check(report: Any, where: str = "report") -> Any:
    """Validate ``report`` (a dict), record it, and return it; a schema error is recorded and raised."""
    checked.append(where)
    why = problem(report)
    if why:
        problems.append(f"{where}: {why}")
        raise AssertionError(f"{where} does not match report.schema.json: {why}")
    return report


def check_tree(root: Path) -> None:
    """Validate every ``report.json`` under ``root`` (recorded; errors are collected, not raised)."""
    for path in sorted(root.rglob("report.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            problems.append(f"{path}: not JSON ({exc})")
            continue
        checked.append(str(path))
        why = problem(data)
        if why:
            problems.append(f"{path}: {why}")
