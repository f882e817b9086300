"""Views of a causal trace: a paper-style heatmap and an inline, offline widget.

A per-head trace (``kind="head"``, scores ``[n_tokens, n_layers, n_heads]``)
is drawn as a layer x head heatmap at one token, and shown as the prompt's
tokens coloured by the effect of restoring one head, for the heads with the
largest effects.

:func:`plot_trace` draws the heatmap of the paper's Figure 1 (Meng et al.
2022): one row per prompt token (subject tokens marked ``*``), one column per
layer, the colour the answer's score when that state is restored.  As in the
paper, the colour scale starts at the corrupted run's score, so white means
"restoring this state does not help" and dark means "restoring it brings the
answer back".  It returns a :class:`matplotlib.figure.Figure` built without
pyplot, so it needs no GUI backend and leaves a user's pyplot state alone.

:func:`show_trace` shows the prompt's tokens in circuitsvis's
``ColoredTokensMulti`` component: pick a layer, and each token is coloured by
the indirect effect of restoring its state at that layer; hover over a token
to read its value at every layer.  The circuitsvis wheel ships its whole
JavaScript bundle (``circuitsvis/dist/cdn/iife.js``, about 1.3 MB; React,
the components and their dependencies), and :class:`TraceView` embeds it
inline, so the view renders with no network access: in Jupyter, in VS Code,
and as a saved standalone HTML file.  (circuitsvis's own ``RenderedHTML``
probes the internet on every display and, when online, loads the bundle from
a CDN instead, so a notebook saved online shows nothing offline.)
"""

from __future__ import annotations

import functools
import html
import json
import re
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from matplotlib.figure import Figure

from lens_rome.errors import InputError, WrongTypeError
from lens_rome.storage import replacing
from lens_rome.tracing.kinds import HEAD, KINDS


class TraceLike(Protocol):
    """What a view reads of a :class:`lens_rome.tracing.TraceResult` (views import no results)."""

    scores: torch.Tensor  # [n_tokens, n_layers], or [n_tokens, n_layers, n_heads] for "head"
    kind: str
    tokens: list[str]
    subject_range: tuple[int, int]
    low_score: float
    high_score: float
    method: str

COLORMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds", "head": "Oranges"}
KIND_NAMES = {"hidden": "state", "mlp": "MLP", "attn": "Attn", "head": "one head"}
VIEW_KINDS = (*KINDS, HEAD)
SHOWN_HEADS = 24  # heads offered in the inline view of a per-head trace
SEVER_NAMES = {"mlp": "MLP", "attn": "Attn"}
# What a view reads of a TraceResult (checked by name: views never import tracing's results).
RESULT_FIELDS = ("scores", "kind", "tokens", "subject_range", "low_score", "high_score", "method")


def _checked_scores(result: TraceLike) -> np.ndarray:
    """``result.scores`` as a float64 array ``[n_tokens, n_layers]`` (``[n_tokens, n_layers,
    n_heads]`` for a per-head trace), checked against the tokens."""
    if not all(hasattr(result, name) for name in RESULT_FIELDS):
        raise WrongTypeError(f"expected a lens_rome TraceResult, got {type(result).__name__}")
    if result.kind not in VIEW_KINDS:
        raise InputError(f"result.kind must be one of {VIEW_KINDS}, got {result.kind!r}")
    scores = torch.as_tensor(result.scores).detach().to("cpu", torch.float64).numpy()
    ndim, layout = (3, "[n_tokens, n_layers, n_heads]") if result.kind == HEAD else (
        2, "[n_tokens, n_layers]")
    if scores.ndim != ndim or scores.shape[0] != len(result.tokens) or 0 in scores.shape:
        raise InputError(
            f"result.scores of a {result.kind!r} trace must be {layout} with n_tokens = "
            f"len(result.tokens) = {len(result.tokens)} and at least one layer; got shape "
            f"{tuple(scores.shape)}"
        )
    return scores


def _is_estimate(result: TraceLike) -> bool:
    return result.method == "attribution"


def score_label(result: TraceLike) -> str:
    """What a score measures, e.g. ``p(' Paris')``, ``log p(' Paris')`` or
    ``logit diff(' Paris')`` (the answer's logit minus a second answer's)."""
    prefix = {"logprob": "log p", "logit_diff": "logit diff"}.get(result.metric, "p")
    return f"{prefix}({result.answer!r})"


def default_title(result: TraceLike, position: int | None = None) -> str:
    """The paper's panel title, e.g. ``Impact of restoring MLP after corrupted input``;
    an attribution estimate's starts with ``Estimated``."""
    if result.kind == HEAD:
        title = (f"Impact of restoring one head's output at {result.tokens[position]!r} "
                 f"(token {position})")
    else:
        title = f"Impact of restoring {KIND_NAMES[result.kind]} after corrupted input"
    if result.sever:
        title += f" (severed {SEVER_NAMES.get(result.sever, result.sever)})"
    if _is_estimate(result):
        title = f"Estimated {title[0].lower()}{title[1:]} (attribution)"
    elif result.method == "hybrid":
        title += f" (hybrid: {_exact_share(result)})"
    return title


def _exact_share(result: TraceLike) -> str:
    """How much of a hybrid trace is exact, e.g. ``52 of 360 cells exact, the rest estimated``."""
    exact = getattr(result, "exact_cells", None)
    start = result.subject_range[0]
    if exact is None:
        return "some cells exact"
    return (f"{int(exact[start:].sum())} of {exact[start:].numel()} cells from the subject on "
            f"exact, the rest estimated")


def layer_axis_label(result: TraceLike) -> str:
    """The paper's x label: which layers one column restores."""
    if result.kind == HEAD:
        return f"layer within {result.model_name or 'the model'}"
    if result.kind == "hidden":
        return f"single restored layer within {result.model_name or 'the model'}"
    return f"center of interval of {result.window} restored {KIND_NAMES[result.kind]} layers"


def token_labels(result: TraceLike) -> list[str]:
    """The prompt's tokens with ``*`` after each subject token, as in the paper."""
    start, end = result.subject_range
    return [token + "*" if start <= i < end else token for i, token in enumerate(result.tokens)]


def _root_figure(ax) -> Figure:
    """The top-level figure holding ``ax`` (``ax.figure`` may be a subfigure)."""
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10: follow subfigures up by hand
        fig = ax.figure
        while getattr(fig, "figure", fig) is not fig:
            fig = fig.figure
        return fig


def head_position(result: TraceLike) -> int:
    """The token whose best head restoration has the largest indirect effect."""
    scores = _checked_scores(result)
    if np.isnan(scores).all():
        raise InputError("the per-head trace holds no restored states (all scores are NaN)")
    best = np.nanmax(np.where(np.isnan(scores), -np.inf, scores), axis=(1, 2))
    return int(np.argmax(best))


def plot_trace(result: TraceLike, ax=None, title: str | None = None,
               position: int | None = None) -> Figure:
    """Heatmap of ``result.scores`` in the style of the paper's Figure 1.

    Rows are the prompt's tokens (top to bottom, subject tokens marked ``*``),
    columns the layers; the colour scale runs from the corrupted score up.
    A per-head trace is drawn as heads (rows) x layers (columns) at token
    ``position`` (default: :func:`head_position`, the token with the largest
    effect).

    Args:
        ax: a matplotlib ``Axes`` to draw in (the colorbar goes next to it);
            default: a new figure sized to the prompt.
        title: default: the paper's, e.g. "Impact of restoring state after
            corrupted input".
        position: the token of a per-head trace's heatmap.

    Returns:
        The figure: ``fig.savefig("trace.png")``.  In Jupyter it displays
        inline once pyplot or ``%matplotlib inline`` has set up the inline
        backend; otherwise ``display(fig)`` after ``import matplotlib.pyplot``.
    """
    scores = _checked_scores(result)
    if result.kind == HEAD:
        return _plot_heads(result, scores, ax, title, position)
    if position is not None:
        raise InputError(f"position applies to per-head traces; this trace's kind is "
                         f"{result.kind!r}")
    n_tokens, n_layers = scores.shape
    if ax is None:
        fig = Figure(figsize=(4.5, 0.9 + 0.24 * n_tokens), dpi=150, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    # The paper's vmin: white means "no better than the corrupted run".
    vmax = max(float(np.nanmax(scores)), result.low_score)
    image = ax.imshow(
        scores, cmap=COLORMAPS[result.kind], vmin=result.low_score, vmax=vmax,
        aspect="auto", interpolation="nearest",
    )
    ax.set_yticks(range(n_tokens), token_labels(result))
    step = 5 if n_layers > 10 else 1
    ax.set_xticks(range(0, n_layers, step))
    ax.set_xlabel(layer_axis_label(result))
    ax.set_title(default_title(result) if title is None else title, fontsize="medium")
    colorbar = ax.figure.colorbar(image, ax=ax)
    colorbar.ax.set_xlabel(score_label(result))  # under the bar, where the paper puts it
    return fig


def _plot_heads(result: TraceLike, scores: np.ndarray, ax, title, position) -> Figure:
    """Heads x layers heatmap of a per-head trace at one token."""
    n_tokens, n_layers, n_heads = scores.shape
    if position is None:
        position = head_position(result)
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not (
            0 <= position < n_tokens):
        raise InputError(f"position must be a token index 0..{n_tokens - 1}, got {position!r}")
    grid = scores[position].T  # [head, layer]
    if ax is None:
        fig = Figure(figsize=(6, 1.2 + 0.24 * n_heads), dpi=150, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    finite = grid[~np.isnan(grid)]
    vmax = max(float(finite.max()) if finite.size else result.low_score, result.low_score)
    image = ax.imshow(grid, cmap=COLORMAPS[HEAD], vmin=result.low_score, vmax=vmax,
                      aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_heads), [f"H{h}" for h in range(n_heads)])
    ax.set_ylabel("head")
    ax.set_xticks(range(0, n_layers, 5 if n_layers > 10 else 1))
    ax.set_xlabel(layer_axis_label(result))
    ax.set_title(default_title(result, position) if title is None else title, fontsize="medium")
    colorbar = ax.figure.colorbar(image, ax=ax)
    colorbar.ax.set_xlabel(score_label(result))
    return fig


class TraceView:
    """An HTML view that displays inline in Jupyter and works offline.

    ``str(view)`` is the HTML fragment (header and widget, JavaScript inline);
    :meth:`save` writes it as a standalone page.
    """

    def __init__(self, fragment: str, title: str = "lens_rome causal trace"):
        self.fragment = fragment
        self.title = title

    def _repr_html_(self) -> str:
        return self.fragment

    def __html__(self) -> str:
        return self.fragment

    def __str__(self) -> str:
        return self.fragment

    def __repr__(self) -> str:
        return f"<TraceView {self.title!r}: {len(self.fragment)} characters of HTML>"

    def to_html(self) -> str:
        """A standalone HTML document holding the view."""
        return (
            "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n</head>\n<body>\n"
            f"{self.fragment}\n</body>\n</html>\n"
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write :meth:`to_html` to ``path``; refuses to replace a file unless ``overwrite``."""
        with replacing(path, overwrite=overwrite) as tmp:
            tmp.write_text(self.to_html(), encoding="utf-8")
        return Path(path)


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """circuitsvis's JavaScript bundle, safe to place inside a ``<script>`` element."""
    import circuitsvis  # noqa: PLC0415 (loads on first use)

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not bundle.is_file():
        raise FileNotFoundError(
            f"circuitsvis {circuitsvis.__version__} has no JavaScript bundle at {bundle}; "
            f"the offline view needs it: reinstall circuitsvis from its wheel "
            f"(pip install --force-reinstall circuitsvis)"
        )
    # "</script" would end the element early; "<\/script" is the same string to JavaScript.
    return re.sub(r"</(script)", r"<\\/\1", bundle.read_text(encoding="utf-8"), flags=re.I)


def render_offline(component: str, **props) -> str:
    """HTML that renders circuitsvis ``component`` with ``props``, bundle inline.

    Like ``circuitsvis.utils.render.render_local``, but the props cannot end
    the script element (``<`` is escaped inside the JSON).
    """
    if not component.isidentifier():
        raise InputError(f"component must be a circuitsvis component name such as "
                         f"'ColoredTokensMulti', got {component!r}")
    element_id = f"circuits-vis-{uuid.uuid4().hex[:13]}"
    props = {
        key: value.tolist() if isinstance(value, (torch.Tensor, np.ndarray)) else value
        for key, value in props.items()
        if value is not None
    }
    props_json = json.dumps(props).replace("<", "\\u003c")
    return (
        f'<div id="{element_id}" style="margin: 15px 0;"></div>\n'
        f'<script type="module">\n{circuitsvis_bundle()}\n'
        f'CircuitsVis.render("{element_id}", CircuitsVis.{component}, {props_json});\n'
        f"</script>"
    )


def _format_score(value: float) -> str:
    return f"{value:.4g}"


def _header(result: TraceLike) -> str:
    """Prompt, answer, clean and corrupted scores, and what the colours mean."""
    esc = html.escape
    start, end = result.subject_range
    label = score_label(result)
    if result.kind == "hidden":
        kind = "hidden (residual stream after each block)"
    elif result.kind == HEAD:
        kind = "head (one attention head's output, attn.hook_z, at one token)"
    else:
        kind = (f"{result.kind} (window of {result.window} {KIND_NAMES[result.kind]} layers "
                f"centred on each layer)")
    if result.sever:
        kind += f", {SEVER_NAMES.get(result.sever, result.sever)} severed"
    model = f" &middot; model {esc(result.model_name)}" if result.model_name else ""
    subject_tokens = "".join(result.tokens[start:end])
    method = ("Attribution estimate of a causal trace" if _is_estimate(result) else
              f"Hybrid causal trace ({_exact_share(result)})" if result.method == "hybrid"
              else "Causal trace")
    selected = "head" if result.kind == HEAD else "layer"
    rows = [
        f"<b>{method}</b> &middot; kind {esc(kind)}{model} &middot; {result.samples} "
        f"noise samples",
        f"prompt: <code>{esc(result.prompt)}</code>",
        f"subject: <code>{esc(result.subject)}</code> (tokens {start}&ndash;{end - 1}: "
        f"<code>{esc(subject_tokens)}</code>) &middot; answer: <code>{esc(repr(result.answer))}"
        f"</code>",
        f"clean {esc(label)} = <b>{_format_score(result.high_score)}</b> &middot; corrupted "
        f"{esc(label)} = <b>{_format_score(result.low_score)}</b> &middot; total effect "
        f"{_format_score(result.total_effect)}",
        f"colour: indirect effect of restoring the token's state at the selected {selected} "
        f"(restored score &minus; corrupted score; blue helps, red hurts); hover over a "
        f"token to read it at every {selected}",
    ]
    body = "".join(f"<div>{row}</div>" for row in rows)
    style = "font-family: sans-serif; font-size: 13px; line-height: 1.5;"
    return f'<div class="lens-rome-trace-header" style="{style}">{body}</div>'


def show_trace(result: TraceLike) -> TraceView:
    """The prompt's tokens coloured by the indirect effect of restoring them, layer by layer.

    Renders circuitsvis's ``ColoredTokensMulti`` (one button per layer) under a
    header with the prompt, the answer, the clean and corrupted scores and the
    kind.  The returned :class:`TraceView` displays inline in Jupyter, and
    ``view.save("trace.html")`` writes a page that opens offline.
    """
    scores = _checked_scores(result)
    effect = scores - result.low_score
    if result.kind == HEAD:
        effect, labels = _strongest_heads(effect)
    else:
        labels = [f"layer {layer}" for layer in range(effect.shape[1])]
    n_layers = effect.shape[1]
    # One colour scale for every layer, so layers compare by eye (circuitsvis
    # would otherwise keep the first layer's scale for all).  Bounds stay off
    # zero at circuitsvis's 6 displayed decimals, or its form shows a stray "0".
    high = max(float(np.nanmax(effect)), 1e-6)
    low = min(float(np.nanmin(effect)), -1e-6)
    widget = render_offline(
        "ColoredTokensMulti",
        # circuitsvis writes tokens as raw HTML; escape them so "<" shows as text.
        tokens=[html.escape(token, quote=False) for token in result.tokens],
        values=effect,
        labels=labels,
        positiveBounds=[high] * n_layers,
        negativeBounds=[low] * n_layers,
    )
    title = f"Causal trace ({result.kind}): {result.prompt} -> {result.answer!r}"
    return TraceView(f"<div>{_header(result)}\n{widget}\n</div>", title=title)


def _strongest_heads(effect: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """The ``SHOWN_HEADS`` heads with the largest effect at any token, strongest first:
    effects ``[n_tokens, shown]`` and labels ``L{layer}.H{head}``."""
    n_tokens, n_layers, n_heads = effect.shape
    flat = effect.reshape(n_tokens, n_layers * n_heads)
    strength = np.nanmax(np.where(np.isnan(flat), -np.inf, np.abs(flat)), axis=0)
    order = np.argsort(-strength, kind="stable")[:SHOWN_HEADS]
    labels = [f"L{i // n_heads}.H{i % n_heads}" for i in order]
    return flat[:, order], labels
