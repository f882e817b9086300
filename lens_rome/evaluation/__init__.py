"""Measuring edits: CounterFact and zsRE metrics, the resumable runner, sequential runs."""

from lens_rome.evaluation.measures import generate, greedy_continuation, next_token_probs, target_log_probs
from lens_rome.evaluation.runner import evaluate, load_records, measure_cases, summarize

__all__ = [
    "evaluate", "generate", "greedy_continuation", "load_records", "measure_cases",
    "next_token_probs", "summarize", "target_log_probs",
]
