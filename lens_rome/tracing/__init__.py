"""Causal tracing: exact restoration runs, attribution estimates, noise rules, dataset averages."""

from lens_rome.tracing.attribution import attribute, attribute_many
from lens_rome.tracing.engine import trace, trace_all, trace_many, window_layers
from lens_rome.tracing.interventions import patch, patch_head, record, restore, restore_window, sever
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

__all__ = [
    "ATTRIBUTION_KINDS", "Gaussian", "HEAD", "KINDS", "MultivariateGaussian", "Noise",
    "Replacement", "StudentT", "SubjectSwap", "TraceResult", "Uniform", "Verification",
    "answer_token", "attribute", "attribute_many", "corrupt", "embedding_std", "locate_subject",
    "patch", "patch_head", "record", "restore", "restore_window", "sever", "spearman", "trace",
    "trace_all", "trace_many", "verify", "window_layers",
]
