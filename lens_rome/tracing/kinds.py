"""The kinds of state a trace restores, and the metrics it reports (imports nothing)."""

KINDS = ("hidden", "mlp", "attn")
HEAD = "head"  # one attention head's output at one layer (``attn.hook_z``)
ATTRIBUTION_KINDS = (*KINDS, HEAD)
TRACE_METRICS = ("prob", "logprob")  # what an exact trace scores
ATTRIBUTION_METRICS = (*TRACE_METRICS, "logit_diff")  # what attribution can also estimate
METHODS = ("exact", "attribution")  # how a TraceResult was computed
