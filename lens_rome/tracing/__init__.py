"""Causal tracing: exact restoration runs, attribution estimates, noise rules, dataset averages."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".attribution": ("attribute", "attribute_many"),
    ".engine": ("trace", "trace_all", "trace_many", "window_layers"),
    ".interventions": (
        "patch", "patch_head", "record", "restore", "restore_window", "sever",
    ),
    ".kinds": ("ATTRIBUTION_KINDS", "HEAD", "KINDS"),
    ".noise_rules": (
        "Gaussian", "MultivariateGaussian", "Noise", "Replacement", "StudentT", "SubjectSwap",
        "Uniform", "corrupt", "embedding_std",
    ),
    ".result": ("TraceResult",),
    ".subject": ("answer_token", "locate_subject"),
    ".verify": ("Verification", "spearman", "verify"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.tracing.attribution import attribute, attribute_many
    from lens_rome.tracing.engine import trace, trace_all, trace_many, window_layers
    from lens_rome.tracing.interventions import (
        patch,
        patch_head,
        record,
        restore,
        restore_window,
        sever,
    )
    from lens_rome.tracing.kinds import ATTRIBUTION_KINDS, HEAD, KINDS
    from lens_rome.tracing.noise_rules import (
        Gaussian,
        MultivariateGaussian,
        Noise,
        Replacement,
        StudentT,
        SubjectSwap,
        Uniform,
        corrupt,
        embedding_std,
    )
    from lens_rome.tracing.result import TraceResult
    from lens_rome.tracing.subject import answer_token, locate_subject
    from lens_rome.tracing.verify import Verification, spearman, verify
