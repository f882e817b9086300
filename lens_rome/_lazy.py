"""Lazy re-exports (PEP 562): a package's names are imported from their modules at first use."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(name: str, exports: Mapping[str, Sequence[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for the module ``name`` (usually a package).

    ``exports`` maps each module, relative to the package (``".engine"``), to
    the names it gives ``name``; a name that is the module's own last part
    (``".rome": ("rome",)``) is the submodule itself.  A name is imported at its
    first use and then kept, so each is imported once.
    """
    module = sys.modules[name]
    namespace = module.__dict__
    origin = {attribute: importlib.util.resolve_name(source, module.__package__)
              for source, attributes in exports.items() for attribute in attributes}

    def __getattr__(attribute: str) -> Any:  # noqa: N807 (PEP 562)
        if attribute not in origin:
            raise AttributeError(f"module {name!r} has no attribute {attribute!r}")
        source = importlib.import_module(origin[attribute])
        value = source if origin[attribute] == f"{name}.{attribute}" else getattr(source, attribute)
        namespace[attribute] = value
        return value

    def __dir__() -> list[str]:  # noqa: N807 (PEP 562)
        return sorted({*namespace, *origin})

    return sorted(origin), __getattr__, __dir__
