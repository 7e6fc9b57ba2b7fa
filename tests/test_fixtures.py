"""The fixtures the tests carry: where they are found, that they are the recorded bytes, and that a missing one
fails the run with one line (never a skip)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FIXTURES_ENV, REPO, fixtures_root

# a table row of the fixture READMEs naming a checkpoint and its sha256 (full, or its first 16 hex digits)
ROW = re.compile(r"^\| `?([\w.-]+\.pt)`? \|.*\| `?([0-9a-f]{16}|[0-9a-f]{64})`? \|$", re.M)


def test_default_root_is_the_repository_copy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(FIXTURES_ENV, raising=False)
    assert fixtures_root() == REPO / "tests" / "fixtures"
    monkeypatch.setenv(FIXTURES_ENV, str(tmp_path))
    assert fixtures_root() == tmp_path


def test_checkpoints_are_the_recorded_bytes(fixtures: Path) -> None:
    """Every checkpoint the READMEs list with a sha256 and that is here hashes to it (byte copies)."""
    checked = {}
    for folder, readme in (("ckpt", fixtures / "README.md"), ("eval", fixtures / "eval" / "README.md")):
        for name, digest in ROW.findall(readme.read_text()):
            path = fixtures / folder / name
            if path.is_file():
                checked[f"{folder}/{name}"] = hashlib.sha256(path.read_bytes()).hexdigest()[: len(digest)] == digest
    # what the tests convert and evaluate must be among them
    assert {"ckpt/yolov9-t-dual-best.pt", "ckpt/yolov9-t-dual-last.pt", "ckpt/yolov9-c-quarter-dual.pt",
            "ckpt/gelan-t.pt", "eval/yolov9-t-dual-shapes-early.pt",
            "eval/yolov9-t-dual-shapes-final.pt"} <= set(checked)  # fmt: skip
    assert [k for k, ok in checked.items() if not ok] == []


def test_missing_fixtures_fail_the_run_with_one_line(tmp_path: Path) -> None:
    """With the root pointing at an empty folder, a test asking for ``fixtures`` errors at setup and a module that
    reads a fixture at import fails its collection, each with the one ``fixture missing`` line; nothing is skipped."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, FIXTURES_ENV: str(empty)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-rfEs",
         "tests/test_official_configs.py::test_gelan_s_matches_official_converted_keys", "tests/test_store_sources.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    where = f"(fixtures root from {FIXTURES_ENV}={empty})"
    assert f"fixture missing: {empty / 'README.md'} {where}" in out  # the session fixture
    assert f"fixture missing: {empty / 'ckpt' / 'yolov9-t-dual-best.pt'} {where}" in out  # at collection
    assert "ERROR tests/test_store_sources.py - Failed: fixture missing:" in out
    assert "ERROR tests/test_official_configs.py::test_gelan_s_matches_official_converted_keys" in out
    summary = out.strip().splitlines()[-1]
    assert re.fullmatch(r"2 errors in [0-9.]+s( \(.*\))?", summary), summary  # nothing passed, nothing skipped
