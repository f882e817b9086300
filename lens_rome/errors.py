"""The errors lens_rome raises for bad input; the command line shows only these as one line.

Every class derives from :class:`LensRomeError`, itself a ``ValueError``, so
``except ValueError`` keeps working.  Anything else that escapes the library
is a bug, and the command line lets its traceback through.
"""

from __future__ import annotations

import sys
from typing import Any, Callable


class LensRomeError(ValueError):
    """Bad input to lens_rome: the message names the value and the fix."""


class InputError(LensRomeError):
    """An argument is out of range or of the wrong kind (a layer, a count, a kind name)."""


class WrongTypeError(InputError, TypeError):
    """An argument has the wrong type (a float where a layer index is needed, ...);
    also a ``TypeError``, so ``except TypeError`` keeps working."""


class PromptError(LensRomeError):
    """A prompt, subject or target does not fit: a subject not in the prompt, an empty target,
    a text longer than the model's context."""


class ModelMismatchError(LensRomeError):
    """Something saved for one model (an edit, statistics, a run) is used with another."""


class SavedFileError(LensRomeError):
    """A saved file (an edit, a trace, a cache, a run folder) is damaged, of an unknown format,
    or would be overwritten."""


class ChecksumError(SavedFileError):
    """A saved file's tensors do not match the checksum written with them: it is damaged."""


class NonFiniteError(InputError):
    """A number or tensor on its way into a model's weights is NaN or infinite."""


class ModelUnavailableError(LensRomeError):
    """A model cannot be loaded here: unknown name, missing package, or no network."""


# What the command line reports as ``error: ...`` (exit status 2).  File errors
# are the user's too (a path that does not exist, an output that already does),
# and so is a model package that is not installed (the message says how).
USER_ERRORS = (LensRomeError, FileExistsError, FileNotFoundError, ModuleNotFoundError)


def reporting_user_errors(run: Callable[[Any], int], args: Any) -> int:
    """``run(args)``; a user error is printed as ``error: ...`` and gives exit status 2."""
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
