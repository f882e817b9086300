"""Checking an attribution estimate: restore its top sites exactly, compare."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from lens_rome.checks import positive_int
from lens_rome.errors import InputError, SavedFileError, WrongTypeError
from lens_rome.model.adapter import ModelAdapter, adapter_for
from lens_rome.model.backend import Model
from lens_rome.model.hooks import attached
from lens_rome.tracing.attribution import (
    _UNSET,
    _check_common,
    _contrast_tokens,
    _last_logits,
    _metric,
    _prepare,
    _renamed_noise,
)
from lens_rome.tracing.interventions import patch, patch_head
from lens_rome.tracing.kinds import HEAD, window_layers
from lens_rome.tracing.noise_rules import Gaussian, Noise, corrupt
from lens_rome.tracing.result import TraceResult
from lens_rome.tracing.saved import SavedAsJson

VERIFY_FORMAT = 1
BATCH_ROWS = 160  # rows of one restoring pass: sites x samples

Site = tuple[int, int] | tuple[int, int, int]


def restore_sites(
    model: Model,
    prompt: str,
    subject: str,
    kind: str,
    sites: Sequence[Site],
    *,
    noise: float | torch.Tensor | Noise | None = None,
    samples: int = 10,
    window: int = 10,
    metric: str = "logprob",
    target: str | int | None = None,
    contrast: str | Sequence[int] | None = None,
    seed: int = 0,
    batch_rows: int = BATCH_ROWS,
    corruption: float | torch.Tensor | Noise | None = _UNSET,
) -> tuple[torch.Tensor, float, float]:
    """Exact restorations of chosen sites: ``(scores [n_sites], low_score, high_score)``.

    A site is ``(token, layer)``, or ``(token, layer, head)`` for ``kind="head"``
    (head ``h``'s ``attn.hook_z`` at that token restored to its clean value).
    Each site's score is the metric averaged over the noise samples, as in
    :func:`lens_rome.trace` (the paper's algorithm: a corrupted run with the
    site's clean values patched in; sites share batches of ``batch_rows`` rows).
    ``target`` may be a token id; ``contrast`` for ``"logit_diff"`` may also be
    one token id per sample.  ``noise`` is as :func:`lens_rome.trace`'s
    (``corruption``: its deprecated old name).
    """
    noise = _renamed_noise(noise, corruption, "restore_sites")
    return _restore_sites(adapter_for(model), prompt, subject, kind, sites, noise=noise,
                          samples=samples, window=window, metric=metric, target=target,
                          contrast=contrast, seed=seed, batch_rows=batch_rows)


def _checked_sites(sites: Sequence[Site], kind: str, n_tokens: int, n_layers: int,
                   n_heads: int) -> list[Site]:
    checked = []
    for site in sites:
        expected = 3 if kind == HEAD else 2
        if len(site) != expected or any(isinstance(v, bool) or not isinstance(v, int)
                                        for v in site):
            raise InputError(f"site {site!r} must be {expected} integers "
                             f"({'token, layer, head' if kind == HEAD else 'token, layer'})")
        if not (0 <= site[0] < n_tokens and 0 <= site[1] < n_layers) or (
                kind == HEAD and not 0 <= site[2] < n_heads):
            raise InputError(f"site {site!r} is out of range: {n_tokens} tokens, {n_layers} "
                             f"layers{f', {n_heads} heads' if kind == HEAD else ''}")
        checked.append(tuple(site))
    return checked


def _restore_sites(adapter: ModelAdapter, prompt, subject, kind, sites, *, noise, samples, window,
                   metric, target, contrast, seed, batch_rows=BATCH_ROWS
                   ) -> tuple[torch.Tensor, float, float]:
    model = adapter.model
    _check_common([kind], metric, samples, window)
    prepared = _prepare(adapter, prompt, subject, noise, samples, seed, target)
    tokens, n_tokens, n_layers = prepared.tokens, prepared.tokens.shape[1], adapter.n_layers
    checked = _checked_sites(sites, kind, n_tokens, n_layers, adapter.n_heads)
    layers_of = (lambda layer: [layer]) if kind in ("hidden", HEAD) else (
        lambda layer: list(window_layers(layer, window, n_layers)))
    names = sorted({adapter.hook_name(kind, l) for s in checked for l in layers_of(s[1])})
    embed = adapter.hook_name("embed")

    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(tokens, names_filter=set(names).__contains__)
        values, replace = prepared.corruption.values.to(tokens.device), prepared.corruption.replace
        with attached(model, [corrupt(values, prepared.subject_range, replace=replace,
                                      hook_name=embed)]):
            logits = _last_logits(adapter, tokens.expand(samples, -1))
        if metric != "logit_diff":
            contrast_tokens = None
        elif contrast is None or isinstance(contrast, str):
            contrast_tokens = _contrast_tokens(adapter, contrast, logits, prepared.answer)
        else:
            contrast_tokens = torch.as_tensor(list(contrast), dtype=torch.long)
            if contrast_tokens.shape != (samples,):
                raise InputError(f"contrast token ids must be one per sample ({samples}), "
                                 f"got {len(contrast_tokens)}")
        low = float(_metric(logits, prepared.answer, contrast_tokens, metric).mean())
        high = float(_metric(clean_logits[:, -1].expand(samples, -1), prepared.answer,
                             contrast_tokens, metric).mean())

        per_batch = max(1, batch_rows // samples)
        scores = []
        for first in range(0, len(checked), per_batch):
            chunk = checked[first : first + per_batch]
            fwd = [corrupt(values.repeat(len(chunk), 1, 1), prepared.subject_range,
                           replace=replace, hook_name=embed)]
            for g, site in enumerate(chunk):  # the tracer's own hook factories, one per site
                rows = slice(g * samples, (g + 1) * samples)
                for layer in layers_of(site[1]):
                    name = adapter.hook_name(kind, layer)
                    fwd.append(patch_head(name, cache[name][0, site[0]], site[0], site[2],
                                          rows=rows) if kind == HEAD else
                               patch(name, cache[name][0, site[0]], site[0], rows=rows))
            with attached(model, fwd):
                out = _last_logits(adapter, tokens.expand(len(chunk) * samples, -1))
            rows_contrast = None if contrast_tokens is None else contrast_tokens.repeat(len(chunk))
            per_row = _metric(out, prepared.answer, rows_contrast, metric)
            scores.append(per_row.view(len(chunk), samples).mean(1).cpu())
    return (torch.cat(scores) if scores else torch.empty(0)), low, high


@dataclass
class Verification(SavedAsJson):
    """The top sites of an attribution estimate, restored exactly, side by side.

    ``sites``: ``(token, layer)`` or ``(token, layer, head)`` in the estimate's
    ranking; ``estimated`` and ``exact`` are indirect effects (score minus the
    corrupted score) in the estimate's metric.
    """

    sites: list[tuple[int, ...]]
    estimated: list[float]
    exact: list[float]
    tokens: list[str]
    kind: str
    metric: str
    low_score: float
    high_score: float
    prompt: str
    subject: str
    answer: str
    window: int = 1
    meta: dict = field(default_factory=dict)

    saved_as = "verification"

    @property
    def spearman(self) -> float:
        """Rank correlation of estimated and exact effects over the verified sites."""
        return spearman(torch.tensor(self.estimated), torch.tensor(self.exact))

    @property
    def sign_agreement(self) -> float:
        """Fraction of verified sites whose estimate has the exact effect's sign."""
        pairs = list(zip(self.estimated, self.exact))
        return sum((a > 0) == (b > 0) for a, b in pairs) / len(pairs) if pairs else math.nan

    def to_frame(self):
        """One row per site: rank, position, token, layer (, head), estimated, exact, error."""
        import pandas as pd  # noqa: PLC0415 (pandas loads on use)

        rows = []
        for rank, (site, estimated, exact) in enumerate(
                zip(self.sites, self.estimated, self.exact), start=1):
            row = {"rank": rank, "position": site[0], "token": self.tokens[site[0]],
                   "layer": site[1]}
            if self.kind == HEAD:
                row["head"] = site[2]
            row.update(estimated=estimated, exact=exact, error=estimated - exact)
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Estimated against exact indirect effects (one point per site); returns the figure."""
        from matplotlib.figure import Figure  # noqa: PLC0415 (matplotlib loads on use)

        if ax is None:
            fig = Figure(figsize=(4, 4), dpi=150, layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        ax.scatter(self.exact, self.estimated, s=14)
        values = [*self.exact, *self.estimated, 0.0]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="grey", linewidth=0.6)
        ax.set_xlabel(f"exact indirect effect ({self.metric})")
        ax.set_ylabel(f"attribution estimate ({self.metric})")
        ax.set_title(f"top {len(self.sites)} {self.kind} sites, Spearman {self.spearman:.2f}",
                     fontsize="medium")
        return fig

    def to_dict(self) -> dict:
        data = asdict(self)
        data["sites"] = [list(site) for site in self.sites]
        data["format"] = VERIFY_FORMAT
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Verification":
        data = dict(data)
        if data.pop("format", None) != VERIFY_FORMAT:
            raise SavedFileError("missing or unknown 'format'")
        data["sites"] = [tuple(site) for site in data["sites"]]
        return cls(**data)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long vectors (average ranks for ties)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.shape != b.shape or a.numel() < 2:
        raise InputError(f"need two vectors of the same length >= 2, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator > 0 else math.nan


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in x.unique():  # ties get their average rank
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def ranked_sites(result: TraceResult, by: str = "effect") -> list[tuple[int, ...]]:
    """All sites of a trace from the highest score down (``by="magnitude"``: largest
    absolute indirect effect first); sites before the subject are left out."""
    if by not in ("effect", "magnitude"):
        raise InputError(f"by must be 'effect' or 'magnitude', got {by!r}")
    effect = (result.scores - result.low_score)[result.subject_range[0]:]
    key = effect.abs() if by == "magnitude" else effect
    key = torch.nan_to_num(key.float(), nan=-math.inf)
    order = key.flatten().argsort(descending=True, stable=True).tolist()
    shape = effect.shape
    sites = []
    for flat in order:
        index = torch.unravel_index(torch.tensor(flat), shape)
        site = (int(index[0]) + result.subject_range[0], *(int(i) for i in index[1:]))
        sites.append(site)
    return sites


def verify(
    model: Model,
    estimate: TraceResult,
    k: int = 10,
    *,
    noise: float | torch.Tensor | Noise | None = None,
    by: str = "effect",
    corruption: float | torch.Tensor | Noise | None = _UNSET,
) -> Verification:
    """Restore the ``k`` top sites of an attribution ``estimate`` exactly.

    The sites are ranked by estimated indirect effect (``by="magnitude"``: by its
    absolute value, right for ``grad_drop`` estimates); each is then restored
    with the same noise draws (the estimate's ``seed`` and ``noise``, which
    must be the one the estimate was made with; default: the default
    Gaussian), the same metric and second answer.  ``corruption``: the
    deprecated old name of ``noise``.
    """
    noise = _renamed_noise(noise, corruption, "verify")
    if not isinstance(estimate, TraceResult):
        raise WrongTypeError(f"estimate must be a TraceResult from attribute(), got "
                             f"{type(estimate).__name__}")
    positive_int(k, "k")
    if noise is None:
        noise = Gaussian(scale=3.0)
    if isinstance(noise, Noise) and str(noise) != estimate.noise:
        raise InputError(f"the estimate was made with noise {estimate.noise!r}, not "
                         f"{str(noise)!r}: pass the same noise to verify")
    sites = ranked_sites(estimate, by)[:k]
    exact, low, _ = _restore_sites(
        adapter_for(model), estimate.prompt, estimate.subject, estimate.kind, sites, noise=noise,
        samples=estimate.samples, window=estimate.window, metric=estimate.metric,
        target=estimate.answer_token, contrast=estimate.contrast_tokens, seed=estimate.seed,
    )
    estimated = [float(estimate.scores[site]) - estimate.low_score for site in sites]
    about = {"method": estimate.method, "seed": estimate.seed, **estimate.meta}
    if estimate.contrast_tokens is not None:
        about.update(contrast=estimate.contrast, contrast_tokens=estimate.contrast_tokens)
    return Verification(
        sites=sites, estimated=estimated, exact=[float(x) - low for x in exact],
        tokens=list(estimate.tokens), kind=estimate.kind, metric=estimate.metric,
        low_score=low, high_score=estimate.high_score, prompt=estimate.prompt,
        subject=estimate.subject, answer=estimate.answer, window=estimate.window,
        meta={"by": by, "estimate": about, "noise": estimate.noise},
    )
