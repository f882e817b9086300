"""Noise rules: how the subject's embeddings are corrupted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float
from transformer_lens.hook_points import HookPoint

from lens_rome.errors import InputError, WrongTypeError
from lens_rome.model.adapter import HOOK_NAMES, ModelAdapter, adapter_for
from lens_rome.model.backend import Model
from lens_rome.model.hooks import Hook


def corrupt(
    noise: Float[torch.Tensor, "samples n_subject d_model"],
    subject_range: tuple[int, int],
    *,
    replace: bool = False,
    rows: slice = slice(None),
    hook_name: str | None = None,
) -> Hook:
    """Add ``noise`` to (or, with ``replace``, put it in place of) the subject's embeddings.

    ``activation[rows]`` must have ``samples`` rows: one noise draw each.
    ``hook_name``: where the embeddings are (default: a ``HookedTransformer``'s
    embedding hook; tracing passes ``adapter.hook_name("embed")``).
    """
    start, end = subject_range
    if hook_name is None:
        hook_name = HOOK_NAMES[ModelAdapter.backend]["embed"]
    if noise.ndim != 3 or noise.shape[1] != end - start:
        raise InputError(
            f"noise must have shape [samples, n_subject_tokens={end - start}, d_model], "
            f"got {tuple(noise.shape)}"
        )

    def corrupt_hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        values = noise.to(device=activation.device, dtype=activation.dtype)
        if replace:
            activation[rows, start:end] = values
        else:
            activation[rows, start:end] += values
        return activation

    return hook_name, corrupt_hook


@dataclass(frozen=True)
class Corruption:
    """Noise drawn for one trace: ``values [samples, n_subject, d_model]``, added or replacing."""

    values: torch.Tensor
    replace: bool = False


class Noise:
    """A rule that draws the corruption of a subject's embeddings.

    ``draw(model, subject_tokens, samples, generator)`` returns a
    :class:`Corruption`; ``subject_tokens`` is ``[n_subject]``.
    """

    def draw(
        self,
        model: Model,
        subject_tokens: torch.Tensor,
        samples: int,
        generator: torch.Generator,
    ) -> Corruption:
        raise NotImplementedError

    def __str__(self) -> str:
        return repr(self)


def embedding_std(model: Model, subjects: Sequence[str] | None = None) -> float:
    """Standard deviation of token embeddings: of the subjects' tokens (the paper's
    ``collect_embedding_std``) when ``subjects`` are given, else of the whole vocabulary."""
    return _embedding_std(adapter_for(model), subjects)


def _embedding_std(adapter: ModelAdapter, subjects: Sequence[str] | None = None) -> float:
    return float(_embedding_rows(adapter, subjects).std())


def _embedding_rows(adapter: ModelAdapter, subjects: Sequence[str] | None
                    ) -> Float[torch.Tensor, "rows d_model"]:
    """The embeddings of the subjects' tokens, or the whole embedding matrix."""
    if subjects is None:
        return adapter.w_e.detach()
    ids = [adapter.tokenize(s)[0][0, adapter.n_bos :] for s in subjects]
    return adapter.embeddings(torch.cat(ids)[None])[0].detach()


@dataclass(frozen=True)
class Gaussian(Noise):
    """Spherical Gaussian noise, std ``level``, or ``scale`` x embedding std (the paper's "s3")."""

    scale: float = 3.0
    level: float | None = None

    def std(self, model: Model) -> float:
        return self._std(adapter_for(model))

    def _std(self, adapter: ModelAdapter) -> float:
        return self.level if self.level is not None else self.scale * _embedding_std(adapter)

    def draw(self, model, subject_tokens, samples, generator):
        adapter = adapter_for(model)
        shape = (samples, len(subject_tokens), adapter.d_model)
        return Corruption(torch.randn(shape, generator=generator) * self._std(adapter))


@dataclass(frozen=True)
class StudentT(Noise):
    """Student-t noise with ``df`` degrees of freedom, scaled like :class:`Gaussian`."""

    df: float = 3.0
    scale: float = 3.0

    def draw(self, model, subject_tokens, samples, generator):
        adapter = adapter_for(model)
        shape = (samples, len(subject_tokens), adapter.d_model)
        normal = torch.randn(shape, generator=generator)
        chi2 = 2 * torch._standard_gamma(torch.full(shape[:2] + (1,), self.df / 2))
        return Corruption(normal * torch.sqrt(self.df / chi2) * self.scale
                          * _embedding_std(adapter))


@dataclass(frozen=True)
class Uniform(Noise):
    """Uniform noise on ``[-1, 1]`` times ``scale`` x embedding std."""

    scale: float = 3.0

    def draw(self, model, subject_tokens, samples, generator):
        adapter = adapter_for(model)
        shape = (samples, len(subject_tokens), adapter.d_model)
        unit = torch.rand(shape, generator=generator) * 2 - 1
        return Corruption(unit * self.scale * _embedding_std(adapter))


@dataclass(frozen=True)
class MultivariateGaussian(Noise):
    """Noise from a Gaussian with the embeddings' mean and covariance.

    Added to the subject's embeddings, as the paper's "m" option; with
    ``replace=True`` the subject's embeddings are replaced by such draws.
    """

    replace: bool = False

    def draw(self, model, subject_tokens, samples, generator):
        adapter = adapter_for(model)
        rows = _embedding_rows(adapter, None).double()
        mean = rows.mean(0)
        centred = rows - mean
        cov = centred.T @ centred / (len(rows) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        transform = eigenvectors * eigenvalues.clamp(min=0).sqrt()
        shape = (samples, len(subject_tokens), adapter.d_model)
        normal = torch.randn(shape, generator=generator, dtype=torch.float64)
        return Corruption((normal @ transform.T + mean).float(), replace=self.replace)


def Replacement() -> MultivariateGaussian:  # noqa: N802 (reads as a rule, like the others)
    """Replace the subject's embeddings by random embedding-like vectors."""
    return MultivariateGaussian(replace=True)


@dataclass(frozen=True)
class SubjectSwap(Noise):
    """Symmetric token replacement: put another subject in the subject's place.

    Sample ``i`` uses ``alternatives[i % len(alternatives)]``; each must have
    exactly as many tokens as the subject (Zhang & Nanda 2023).
    """

    alternatives: tuple[str, ...]

    def __init__(self, alternatives: str | Sequence[str]):
        if isinstance(alternatives, str):
            alternatives = (alternatives,)
        if not alternatives:
            raise InputError("SubjectSwap needs at least one alternative subject")
        object.__setattr__(self, "alternatives", tuple(alternatives))

    def draw(self, model, subject_tokens, samples, generator):
        adapter = adapter_for(model)
        swaps = []
        for alternative in self.alternatives:
            tokens = adapter.tokenize(alternative)[0][:, adapter.n_bos :]
            if tokens.shape[1] != len(subject_tokens):
                raise InputError(
                    f"alternative subject {alternative!r} has {tokens.shape[1]} tokens, but the "
                    f"subject has {len(subject_tokens)}: pick alternatives of the same length"
                )
            swaps.append(adapter.embeddings(tokens)[0].detach())
        values = torch.stack([swaps[i % len(swaps)] for i in range(samples)])
        return Corruption(values, replace=True)


def draw_corruption(
    noise: float | torch.Tensor | Noise,
    adapter: ModelAdapter,
    subject_tokens: torch.Tensor,
    samples: int,
    seed: int,
) -> tuple[Corruption, str]:
    """Resolve ``trace``'s ``noise`` argument into a corruption and a description of it."""
    n_subject, d_model = len(subject_tokens), adapter.d_model
    if isinstance(noise, torch.Tensor):
        expected = (samples, n_subject, d_model)
        if tuple(noise.shape) != expected:
            raise InputError(
                f"noise tensor has shape {tuple(noise.shape)}; expected [samples, "
                f"n_subject_tokens, d_model] = {list(expected)} for this prompt and subject"
            )
        values = noise.detach().float().cpu()
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise InputError(
                f"noise tensor has {bad} NaN or infinite values of {values.numel()}; every "
                f"value must be finite (draw it e.g. with torch.randn(...) * level)"
            )
        return Corruption(values), "explicit tensor"
    if isinstance(noise, bool) or not isinstance(noise, (int, float, Noise)):
        raise WrongTypeError(
            f"noise must be a float level, a tensor [samples, n_subject_tokens, d_model] or a "
            f"lens_rome.tracing.noise_rules.Noise rule, got {noise!r}"
        )
    if not isinstance(noise, Noise):
        if not math.isfinite(noise) or noise < 0:
            raise InputError(f"noise level must be a finite number >= 0 (the std of the "
                             f"Gaussian noise, e.g. 0.1), got {noise}")
        noise = Gaussian(level=float(noise))
    generator = torch.Generator().manual_seed(seed)
    corruption = noise.draw(adapter.model, subject_tokens.cpu(), samples, generator)
    if not torch.isfinite(corruption.values).all():
        raise InputError(f"the noise rule {noise} drew NaN or infinite values; check its "
                         f"parameters (levels and scales must be finite)")
    return corruption, str(noise)
