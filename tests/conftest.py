"""Test settings: no progress bars."""

import pytest


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
