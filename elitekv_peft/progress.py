"""Progress bars of the library's long work (calibration, conversion, scoring), switched off as transformers' are.

A bar is shown unless the caller passes ``enabled=False``, transformers' bars are off
(``transformers.utils.logging.disable_progress_bar()``, which ``elitekv ... --no-progress`` calls) or the
environment sets ``TQDM_DISABLE=1``. tqdm reads ``TQDM_DISABLE`` only for a ``disable`` argument nobody passed, so
`progress_bar` passes one only to switch a bar off.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging


def bars_enabled(enabled: bool = True) -> bool:
    """Whether a bar that the caller wants (``enabled``) may be shown: transformers' bars are on."""
    return enabled and hf_logging.is_progress_bar_enabled()


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, disabled when ``enabled`` is False or transformers' bars are off; with
    ``TQDM_DISABLE=1`` in the environment tqdm disables it itself."""
    if not bars_enabled(enabled):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
