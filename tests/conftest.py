"""Test settings: no progress bars."""

import pytest


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


def pytest_report_header(config):
    """The versions this run tests (CI runs the suite on a locked, the newest and the lowest allowed set)."""
    import importlib.metadata as metadata

    names = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
    return "elitekv-peft deps: " + ", ".join(f"{name} {metadata.version(name)}" for name in names)
