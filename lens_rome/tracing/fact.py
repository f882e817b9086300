"""One fact of a dataset run traced for every kind: the work a process or a Ray worker does.

:func:`trace_fact` is what :func:`lens_rome.tracing.dataset.trace_dataset`
runs per fact, here or in :mod:`lens_rome.tracing.distributed`'s workers;
:class:`TraceSettings` is what every fact of a run is traced with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model
from lens_rome.tracing.attribution import _attribute_many
from lens_rome.tracing.engine import _trace_many
from lens_rome.tracing.kinds import KINDS
from lens_rome.tracing.noise_rules import Gaussian
from lens_rome.tracing.subject import _locate_subject


@dataclass(frozen=True)
class TraceSettings:
    """What every fact of a run is traced with; a resumed run must use the same."""

    model: str
    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    window: int = 10
    noise_level: float = 0.0
    severed: bool = True
    seed: int = 0
    bf16: bool = False
    method: str = "exact"  # or "attribution": estimates instead of restored runs
    fingerprint: str = ""  # the model's (lens_rome.model.adapter.model_fingerprint)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["kinds"] = list(self.kinds)
        return data


def trace_fact(model: Model, fact: Mapping, settings: TraceSettings) -> pd.DataFrame:
    """Trace one fact for every kind (and the severed experiment): long-format rows.

    Columns: known_id, kind, sever, token, layer, score, low_score, high_score,
    n_tokens, subject_start, subject_end, answer; ``sever`` is ``"none"`` for
    the plain traces and ``"mlp"``/``"attn"`` for the severed hidden traces,
    which cover the last subject token only.
    """
    adapter = adapter_for(model)
    noise, seed = Gaussian(level=settings.noise_level), settings.seed + int(fact["known_id"])
    if settings.method == "attribution":
        results = _attribute_many(adapter, fact["prompt"], fact["subject"], settings.kinds,
                                  noise=noise, samples=settings.samples, window=settings.window,
                                  metric="prob", target=None, contrast=None, seed=seed,
                                  qk_fix=False, grad_drop=False)
        return _fact_rows(fact, results)
    requests = [(kind, None, None) for kind in settings.kinds]
    if settings.severed:
        _, (_, subject_end) = _locate_subject(adapter, fact["prompt"], fact["subject"])
        requests += [("hidden", part, [subject_end - 1]) for part in ("mlp", "attn")]
    results = _trace_many(adapter, fact["prompt"], fact["subject"], requests,
                          samples=settings.samples, window=settings.window, noise=noise,
                          target=None, metric="prob", seed=seed, bf16=settings.bf16,
                          progress=False)
    return _fact_rows(fact, results)


def _fact_rows(fact: Mapping, results) -> pd.DataFrame:
    """The long-format rows of one fact's traces (or estimates)."""
    frames = []
    for result in results:
        n_tokens, n_layers = result.scores.shape
        scores = result.scores.numpy()
        rows = np.argwhere(~np.isnan(scores))
        frames.append(pd.DataFrame({
            "known_id": int(fact["known_id"]),
            "kind": result.kind,
            "sever": result.sever or "none",
            "token": rows[:, 0].astype(np.int16),
            "layer": rows[:, 1].astype(np.int16),
            "score": scores[rows[:, 0], rows[:, 1]],
            "low_score": result.low_score,
            "high_score": result.high_score,
            "n_tokens": n_tokens,
            "subject_start": result.subject_range[0],
            "subject_end": result.subject_range[1],
            "answer": result.answer,
        }))
    return pd.concat(frames, ignore_index=True)
