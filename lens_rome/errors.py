"""The errors the library raises for bad input, which every command shows as one line."""

USER_ERRORS = (ValueError, TypeError, FileExistsError, FileNotFoundError, ModuleNotFoundError)
