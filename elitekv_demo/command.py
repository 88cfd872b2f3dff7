"""``elitekv run``: the command-line handler of the embedded default job (imported lazily by ``elitekv_cli``)."""

from __future__ import annotations

import argparse

from elitekv_peft.cli import _settings_or_exit, quiet_progress


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run ``elitekv run``; input errors exit with status 2 through ``parser.error``."""
    from elitekv_peft.user_data import DataError
    from elitekv_peft.user_model import ModelError

    with quiet_progress(args):
        try:
            return run_run(parser, args)
        except (DataError, ModelError) as error:
            parser.error(str(error))
    return 2


def run_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``elitekv run``: `elitekv_demo.job.run_job` on SmolLM2-135M and the Debian documentation corpora."""
    from .corpora import parse_corpora
    from .job import run_job

    try:
        corpora = parse_corpora(args.train_corpora)
    except ValueError as error:
        parser.error(f"--train-corpora: {error}")
    settings = _settings_or_exit(parser, args)
    settings.train_corpora = corpora
    try:
        run_job(settings)
    except FileNotFoundError as error:  # the SmolLM2 package or a Debian corpus is not installed: the message says how
        parser.error(str(error))
    return 0
