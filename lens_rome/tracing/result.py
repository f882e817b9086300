"""A trace's scores and everything needed to read, save and draw them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float

from lens_rome.storage import replacing

SAVE_FORMAT = 1



@dataclass
class TraceResult:
    """One causal trace.

    ``scores[i, l]`` is the answer's score (probability, or mean
    log-probability) when state ``(token i, layer l)`` of the kind is
    restored; ``low_score`` is the corrupted run's, ``high_score`` the clean
    run's.  For ``kind="head"`` the scores are ``[n_tokens, n_layers,
    n_heads]``: ``scores[i, l, h]`` restores head ``h``'s output
    (``blocks.{l}.attn.hook_z``) at token ``i``.  An attribution estimate
    (:mod:`lens_rome.attribution`, ``meta["method"] == "attribution"``) has the
    same layout, with estimated scores.
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
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.scores.shape[1]

    @property
    def n_heads(self) -> int | None:
        """Heads per layer of a per-head trace (3-D ``scores``); None for other kinds."""
        return self.scores.shape[2] if self.scores.ndim == 3 else None

    @property
    def method(self) -> str:
        """``"exact"`` (restored runs) or ``"attribution"`` (a first-order estimate)."""
        return self.meta.get("method", "exact")

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
        layer, head) with a ``head`` column for a per-head trace."""
        import pandas as pd  # noqa: PLC0415

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
                    rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None, title: str | None = None, position: int | None = None):
        """A matplotlib heatmap in the paper's style; returns the figure.

        A per-head trace is drawn as a layer x head heatmap at token
        ``position`` (default: the token with the largest indirect effect).
        """
        from lens_rome.views.trace import plot_trace  # noqa: PLC0415

        return plot_trace(self, ax=ax, title=title, position=position)

    def show(self):
        """An inline circuitsvis view (renders offline, in Jupyter or saved as HTML)."""
        from lens_rome.views.trace import show_trace  # noqa: PLC0415

        return show_trace(self)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["scores"] = self.scores.tolist()
        data["subject_range"] = list(self.subject_range)
        data["format"] = SAVE_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        data = dict(data)
        if data.pop("format", None) != SAVE_FORMAT:
            raise ValueError("not a lens_rome trace result (missing or unknown 'format')")
        data["scores"] = torch.tensor(data["scores"], dtype=torch.float32)
        data["subject_range"] = tuple(data["subject_range"])
        return cls(**data)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the result as JSON; refuses to replace an existing file unless ``overwrite``."""
        with replacing(path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "TraceResult":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a readable lens_rome trace result: {error}") from None
