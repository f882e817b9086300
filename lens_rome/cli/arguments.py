"""What the commands share: argument types, common options, model loading, error reporting."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import warnings
from typing import Callable

from lens_rome.errors import reporting_user_errors
from lens_rome.model.embedded import DEFAULT_MODEL, EMBEDDED_MODELS

log = logging.getLogger(__name__)


def command(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run(args)`` as a command: a user error (:data:`lens_rome.errors.USER_ERRORS`) prints
    one ``error: ...`` line and gives exit status 2; any other exception is a bug and keeps
    its traceback.  TransformerLens' deprecation warning is not shown."""

    @functools.wraps(run)
    def reporting(args: argparse.Namespace) -> int:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HookedTransformer is deprecated",
                                    category=DeprecationWarning)
            return reporting_user_errors(run, args)

    return reporting


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    return _whole_number(text, 1)


def count(text: str) -> int:
    """A whole number >= 0."""
    return _whole_number(text, 0)


def counts(text: str) -> list[int]:
    """Whole numbers >= 0 separated by commas: ``3,4,5``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. 3,4,5; got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 0, e.g. 3,4,5; got {text!r}")
    return values


def noise_level(text: str) -> float:
    """A number >= 0 (not nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model``: an embedded model or a TransformerLens name; ``--backend``: how it runs."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an embedded model that loads offline "
                             f"({', '.join(sorted(EMBEDDED_MODELS))}) or a TransformerLens model "
                             f"name, which downloads weights (default: %(default)s)")
    parser.add_argument("--backend", choices=("hooked", "bridge"), default=None,
                        help="hooked: a HookedTransformer (the default on TransformerLens 3.x); "
                             "bridge: a TransformerBridge around the Hugging Face model (the "
                             "default on 4.x, which has no HookedTransformer)")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads in this process (see :func:`set_threads`)."""
    parser.add_argument("--threads", type=positive_int, default=None, metavar="T",
                        help="torch CPU threads of this process (default: torch's choice)")


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads``, if given."""
    if args.threads:
        import torch  # noqa: PLC0415 (heavy import after parsing)

        torch.set_num_threads(args.threads)


def load(name: str, backend: str | None = None):
    """``load_model(name, backend=...)``, without TransformerLens' printed chatter."""
    from lens_rome.model.loading import load_model  # noqa: PLC0415 (heavy import after parsing)

    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter):
        model = load_model(name, backend=backend)
    if chatter.getvalue().strip():
        log.debug("load_model printed: %s", chatter.getvalue().strip())
    return model
