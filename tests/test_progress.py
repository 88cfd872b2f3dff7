"""Progress bars: the library's follow transformers' switch, and ``--no-progress`` silences every bar of a command."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from elitekv_cli import main

from .test_cli import workspace  # noqa: F401  (the module fixture: a tiny model folder and text)
from .tiny import convert, tiny_model


@pytest.fixture
def bars_on(monkeypatch):
    """No TQDM_DISABLE (conftest sets it) and transformers' bars on, as a user's shell has them."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not was:
        hf_logging.disable_progress_bar()


def test_conversion_bars_follow_transformers_switch(bars_on, capsys):
    convert(tiny_model())
    assert "EliteKV calibration" in capsys.readouterr().err
    hf_logging.disable_progress_bar()
    convert(tiny_model())
    assert "EliteKV" not in capsys.readouterr().err


@pytest.mark.parametrize("quiet", [True, False])
def test_no_progress_silences_the_command_and_puts_the_switch_back(bars_on, workspace, capsys, quiet):  # noqa: F811
    args = ["eval", str(workspace["model"]), "--data", str(workspace["jsonl"]), "--seq-len", "64"]
    assert main([*args, "--eval-windows", "2", "--device", "cpu", *(["--no-progress"] if quiet else [])]) == 0
    assert ("%|" in capsys.readouterr().err) is not quiet
    assert hf_logging.is_progress_bar_enabled()
