"""The paper's tracing and ROME on bare TransformerLens hooks: oracles for tests and benchmarks."""

from lens_rome.reference.rome import PAPER_HPARAMS, rome_weight_change
from lens_rome.reference.trace import reference_trace, trace_with_patch

__all__ = ["PAPER_HPARAMS", "reference_trace", "rome_weight_change", "trace_with_patch"]
