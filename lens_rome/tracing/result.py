"""A trace's scores and everything needed to read, save and draw them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float

from lens_rome.errors import SavedFileError
from lens_rome.tracing.saved import SavedAsJson

SAVE_FORMAT = 2
READABLE_FORMATS = (1, 2)  # format 1 kept method, seed and the contrast tokens in ``meta``
FORMER_META_KEYS = ("method", "seed", "contrast", "contrast_tokens")


@dataclass
class TraceResult(SavedAsJson):
    """One causal trace.

    ``scores[i, l]`` is the answer's score (probability, or mean
    log-probability) when state ``(token i, layer l)`` of the kind is
    restored; ``low_score`` is the corrupted run's, ``high_score`` the clean
    run's.  For ``kind="head"`` the scores are ``[n_tokens, n_layers,
    n_heads]``: ``scores[i, l, h]`` restores head ``h``'s output
    (``blocks.{l}.attn.hook_z``) at token ``i``.  An attribution estimate
    (:mod:`lens_rome.tracing.attribution`, ``method == "attribution"``) has the same
    layout, with estimated scores.

    ``method``: ``"exact"`` (restored runs), ``"attribution"`` (an estimate)
    or ``"hybrid"`` (an estimate with the cells of ``exact_cells``, a bool mask
    shaped like ``scores``, restored exactly; None for the other methods, whose
    cells are all exact or all estimated); ``seed``: the seed of the noise draws;
    ``contrast`` and ``contrast_tokens``: the second answer of a
    ``"logit_diff"`` estimate per noise sample (text and token id), else
    None.  ``meta`` holds how it ran (precision, blocks, AtP* fixes).
    """

    scores: Float[torch.Tensor, "n_tokens n_layers *n_heads"]
    low_score: float
    high_score: float
    answer: str
    answer_token: int
    tokens: list[str]
    subject_range: tuple[int, int]
    kind: str
    window: int
    prompt: str
    subject: str
    metric: str = "prob"
    samples: int = 10
    sever: str | None = None
    noise: str = ""
    model_name: str = ""
    method: str = "exact"
    seed: int = 0
    contrast: list[str] | None = None
    contrast_tokens: list[int] | None = None
    meta: dict = field(default_factory=dict)
    exact_cells: torch.Tensor | None = None

    saved_as = "trace result"  # also reads format 1 (a class attribute, not a field)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    @property
    def n_heads(self) -> int | None:
        """Heads per layer of a per-head trace (3-D ``scores``); None for other kinds."""
        return self.scores.shape[2] if self.scores.ndim == 3 else None

    @property
    def total_effect(self) -> float:
        """Clean score minus corrupted score (the paper's TE)."""
        return self.high_score - self.low_score

    @property
    def indirect_effect(self) -> Float[torch.Tensor, "n_tokens n_layers *n_heads"]:
        """Restored score minus corrupted score for every state (the paper's IE)."""
        return self.scores - self.low_score

    def top_sites(self, n: int = 3) -> list[tuple]:
        """The ``n`` states with the highest score: ``(token index, token, layer, score)``,
        or ``(token index, token, layer, head, score)`` for a per-head trace.

        States that were not restored (NaN scores) are skipped.
        """
        flat = self.scores.flatten()
        valid = (~torch.isnan(flat)).nonzero().flatten()
        best = valid[flat[valid].topk(min(n, len(valid))).indices].tolist()
        shape = tuple(self.scores.shape)
        sites = []
        for i in best:
            index = [int(x) for x in torch.unravel_index(torch.tensor(i), shape)]
            sites.append((index[0], self.tokens[index[0]], *index[1:], float(flat[i])))
        return sites

    def to_frame(self):
        """Long-format ``pandas.DataFrame``: one row per (token, layer), or per (token,
        layer, head) with a ``head`` column for a per-head trace; a hybrid trace has an
        ``exact`` column (restored exactly, or estimated)."""
        import pandas as pd  # noqa: PLC0415 (pandas loads on use)

        start, end = self.subject_range
        scores = self.scores if self.scores.ndim == 3 else self.scores[:, :, None]
        heads = self.scores.ndim == 3
        rows = []
        for position, token in enumerate(self.tokens):
            for layer in range(self.n_layers):
                for head in range(scores.shape[2]):
                    score = float(scores[position, layer, head])
                    row = {
                        "position": position,
                        "token": token,
                        "is_subject": start <= position < end,
                        "layer": layer,
                    }
                    if heads:
                        row["head"] = head
                    row.update(kind=self.kind, score=score,
                               indirect_effect=score - self.low_score)
                    if self.exact_cells is not None:
                        cell = (position, layer, head) if heads else (position, layer)
                        row["exact"] = bool(self.exact_cells[cell])
                    rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None, title: str | None = None, position: int | None = None):
        """A matplotlib heatmap in the paper's style; returns the figure.

        A per-head trace is drawn as a layer x head heatmap at token
        ``position`` (default: the token with the largest indirect effect).
        """
        from lens_rome.views.trace import plot_trace  # noqa: PLC0415 (matplotlib loads on use)

        return plot_trace(self, ax=ax, title=title, position=position)

    def show(self):
        """An inline circuitsvis view (renders offline, in Jupyter or saved as HTML)."""
        from lens_rome.views.trace import show_trace  # noqa: PLC0415 (matplotlib loads on use)

        return show_trace(self)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scores"] = self.scores.tolist()
        data["subject_range"] = list(self.subject_range)
        if self.exact_cells is not None:
            data["exact_cells"] = self.exact_cells.tolist()
        data["format"] = SAVE_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        data = dict(data)
        saved_format = data.pop("format", None)
        if saved_format not in READABLE_FORMATS:
            raise SavedFileError("not a lens_rome trace result (missing or unknown 'format')")
        if saved_format == 1:
            data["meta"] = meta = dict(data.get("meta", {}))
            data.update({key: meta.pop(key) for key in FORMER_META_KEYS if key in meta})
        data["scores"] = torch.tensor(data["scores"], dtype=torch.float32)
        if data.get("exact_cells") is not None:
            data["exact_cells"] = torch.tensor(data["exact_cells"], dtype=torch.bool)
        data["subject_range"] = tuple(data["subject_range"])
        return cls(**data)
