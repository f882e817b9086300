"""Measuring edits: CounterFact and zsRE metrics (teacher-forced and generated), CounterFact+,
the collapse monitor, the resumable runner, sequential runs."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".collapse": ("perplexity",),
    ".counterfact": ("plus_prompts",),
    ".measures": (
        "generate", "greedy_answers", "greedy_continuation", "next_token_log_probs",
        "next_token_probs", "target_log_probs",
    ),
    ".runner": ("evaluate", "load_records", "measure_cases", "summarize"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.evaluation.collapse import perplexity
    from lens_rome.evaluation.counterfact import plus_prompts
    from lens_rome.evaluation.measures import (
        generate,
        greedy_answers,
        greedy_continuation,
        next_token_log_probs,
        next_token_probs,
        target_log_probs,
    )
    from lens_rome.evaluation.runner import (
        evaluate,
        load_records,
        measure_cases,
        summarize,
    )
