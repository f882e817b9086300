"""Facts and edit cases: known facts, CounterFact, zsRE, edit requests, the statistics corpus."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".cases": (
        "CounterFactCase", "ZsreCase", "load_counterfact", "load_dataset", "load_zsre",
        "save_cases",
    ),
    ".known_facts": ("answered_correctly", "build_counterfact", "load_known_facts"),
    ".requests": ("EditRequest", "fill"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.data.cases import (
        CounterFactCase,
        ZsreCase,
        load_counterfact,
        load_dataset,
        load_zsre,
        save_cases,
    )
    from lens_rome.data.known_facts import (
        answered_correctly,
        build_counterfact,
        load_known_facts,
    )
    from lens_rome.data.requests import EditRequest, fill
