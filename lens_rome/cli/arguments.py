"""Argument types and model loading shared by the commands."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging

log = logging.getLogger(__name__)


class CommandError(Exception):
    """A problem with the command's input, reported as ``error: ...`` with status 2."""



def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def noise_level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value



def load(name: str):
    """``load_model(name)``, without TransformerLens' printed chatter ("Moving model to ...")."""
    from lens_rome.model.loading import load_model  # noqa: PLC0415 (slow import, after parsing)

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        model = load_model(name)
    if chatter.getvalue().strip():
        log.debug("load_model printed: %s", chatter.getvalue().strip())
    return model
