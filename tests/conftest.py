"""Shared test fixtures: where the real YOLOv9 fixtures live; real servers come from ``servers.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["servers"]

REPO = Path(__file__).resolve().parents[1]


def fixtures_root() -> Path:
    """``../shared/fixtures`` next to the checkout (``$REPARAM_FIXTURES`` overrides)."""
    env = os.environ.get("REPARAM_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    root = fixtures_root()
    if not (root / "README.md").is_file():
        pytest.fail(f"shared fixtures not found at {root}; set REPARAM_FIXTURES")
    return root
