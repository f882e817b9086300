"""lens_rome: causal tracing and ROME fact editing on TransformerLens hook points."""

from lens_rome import hooks
from lens_rome.attribution import attribute, verify
from lens_rome.models import DEFAULT_MODEL, adapter_for, load_model
from lens_rome.tracing import TraceResult, locate_subject, trace, trace_all, trace_many

__all__ = [
    "DEFAULT_MODEL",
    "TraceResult",
    "adapter_for",
    "attribute",
    "hooks",
    "load_model",
    "locate_subject",
    "trace",
    "trace_all",
    "trace_many",
    "verify",
]
__version__ = "0.1.0"
