"""Measuring edits: CounterFact and zsRE metrics, the resumable runner, sequential runs."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".measures": (
        "generate", "greedy_continuation", "next_token_probs", "target_log_probs",
    ),
    ".runner": ("evaluate", "load_records", "measure_cases", "summarize"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.evaluation.measures import (
        generate,
        greedy_continuation,
        next_token_probs,
        target_log_probs,
    )
    from lens_rome.evaluation.runner import (
        evaluate,
        load_records,
        measure_cases,
        summarize,
    )
