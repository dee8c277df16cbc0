"""Paths to the real test data beside the project (../shared); never copied into the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"real test data not found at {SHARED} (the project expects ../shared)")
    return SHARED


@pytest.fixture(scope="session")
def media_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "media"


@pytest.fixture(scope="session")
def splits_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "splits"
