"""Results kept as versioned JSON files: written whole or not at all, read back with one error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from lens_rome.errors import SavedFileError
from lens_rome.storage import replacing

Saved = TypeVar("Saved", bound="SavedAsJson")


class SavedAsJson:
    """``save`` and ``load`` for a result with ``to_dict`` and a ``from_dict`` classmethod.

    ``from_dict`` checks the ``"format"`` that ``to_dict`` writes;
    ``saved_as`` names what a file holds, for the error a bad file raises.
    """

    saved_as = "result"

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[Saved], data: dict) -> Saved:
        raise NotImplementedError

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write as JSON; refuses to replace an existing file unless ``overwrite``."""
        with replacing(path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls: type[Saved], path: str | Path) -> Saved:
        """What :meth:`save` wrote; a file that is not raises :class:`~lens_rome.errors.SavedFileError`."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise SavedFileError(f"{path} is not a readable lens_rome {cls.saved_as}: {error}"
                                 ) from None
