"""Facts and edit cases: known facts, CounterFact, zsRE, edit requests, the statistics corpus."""

from lens_rome.data.cases import (
    CounterFactCase,
    ZsreCase,
    load_counterfact,
    load_dataset,
    load_zsre,
    save_cases,
)
from lens_rome.data.known_facts import answered_correctly, build_counterfact, load_known_facts
from lens_rome.data.requests import EditRequest, fill

__all__ = [
    "CounterFactCase", "EditRequest", "ZsreCase", "answered_correctly", "build_counterfact",
    "fill", "load_counterfact", "load_dataset", "load_known_facts", "load_zsre", "save_cases",
]
