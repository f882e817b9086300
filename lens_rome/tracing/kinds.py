"""The vocabulary of tracing: kinds of state and their windows, metrics, methods, token
categories (imports nothing)."""

KINDS = ("hidden", "mlp", "attn")
HEAD = "head"  # one attention head's output at one layer (``attn.hook_z``)
ATTRIBUTION_KINDS = (*KINDS, HEAD)
TRACE_METRICS = ("prob", "logprob")  # what an exact trace scores
ATTRIBUTION_METRICS = (*TRACE_METRICS, "logit_diff")  # what attribution can also estimate
METHODS = ("exact", "attribution")  # how a dataset trace runs
HYBRID = "hybrid"  # an estimate with the top cells of each token restored exactly
TRACE_METHODS = ("exact", HYBRID)  # what trace() runs


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The layers restored for ``layer`` with a ``window``: the paper's centring."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


# The paper's groups of prompt tokens that dataset averages report, in its order.
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def token_categories(n_tokens: int, subject_start: int, subject_end: int) -> dict[str, list[int]]:
    """The paper's token categories: ``{category: token positions}``.

    A one-token subject is both the first and the last subject token; middle
    subject tokens exist for subjects of three or more tokens.  The first
    subsequent token and further tokens exclude the last token.
    """
    last = n_tokens - 1
    groups = {
        "first subject token": [subject_start],
        "middle subject tokens": list(range(subject_start + 1, subject_end - 1)),
        "last subject token": [subject_end - 1],
        "first subsequent token": [subject_end] if subject_end < last else [],
        "further tokens": list(range(subject_end + 1, last)),
        "last token": [last],
    }
    return {name: positions for name, positions in groups.items() if positions}
