"""The errors the library raises for bad input, which every command shows as one line."""

from __future__ import annotations

import sys
from typing import Any, Callable

USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, ModuleNotFoundError)


def reporting_user_errors(run: Callable[[Any], int], args: Any) -> int:
    """``run(args)``; a user error is printed as ``error: ...`` and gives exit status 2."""
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
