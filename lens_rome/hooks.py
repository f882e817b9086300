"""Interventions as TransformerLens hooks.

Causal tracing needs three interventions, and each is a plain hook
``fn(activation, hook) -> activation`` built by a small factory and returned
as a ``(hook_name, fn)`` pair, so it can go straight into
``model.run_with_hooks(fwd_hooks=[...])`` or ``with model.hooks(...)`` next to
a user's own hooks (an ablation, an SAE, a probe):

- **corrupt**: add noise to (or replace) the subject's token embeddings at
  ``hook_embed``.  :class:`Noise` rules draw that noise: the paper's spherical
  Gaussian at 3x the embedding standard deviation, a multivariate Gaussian
  matched to the embeddings, Student-t, uniform, replacement by random
  embeddings, or a symmetric swap for another subject of the same length.
- **restore**: set chosen positions of any hook point to clean values
  (``restore_window`` does it over a window of layers).
- **sever**: freeze MLP or attention outputs at chosen positions to their
  corrupted values, so a restored state cannot act through them.

Every activation is ``[batch, pos, ...]``; positions index dimension 1.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from jaxtyping import Float
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.hook_points import HookPoint

from lens_rome.models import adapter_for

HookFn = Callable[[torch.Tensor, HookPoint], torch.Tensor]
Hook = tuple[str, HookFn]
Positions = int | Sequence[int] | slice


# --------------------------------------------------------------------------- attaching


@contextlib.contextmanager
def attached(model: HookedTransformer, fwd_hooks: Sequence[Hook]) -> Iterator[HookedTransformer]:
    """Like ``model.hooks(fwd_hooks)``, but removes only its own hooks on exit.

    ``model.hooks`` resets every hook point of the model when it exits, which
    costs more than a transformer block on small inputs; this is cheap enough
    for inner loops, and leaves a user's own hooks in place.
    """
    handles = []
    try:
        for name, fn in fwd_hooks:
            point = model.hook_dict[name]
            handles.append(point.register_forward_hook(
                lambda module, inputs, output, fn=fn, point=point: fn(output, hook=point)
            ))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- generic patch


def patch(
    hook_name: str,
    values: torch.Tensor,
    positions: Positions,
    *,
    rows: slice = slice(None),
) -> Hook:
    """Set ``activation[rows, positions]`` to ``values`` at ``hook_name``.

    ``values`` broadcasts against ``activation[rows, positions]``, e.g.
    ``[len(positions), d_model]`` for every row alike, or
    ``[n_rows, len(positions), d_model]`` row by row.  The one generic
    intervention: ``restore`` and ``sever`` are names for uses of it.
    """
    index = _position_index(positions)

    def patch_hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        activation[rows, index] = values.to(activation.dtype)
        return activation

    return hook_name, patch_hook


def patch_head(
    hook_name: str,
    values: torch.Tensor,
    position: int,
    heads: int | Sequence[int],
    *,
    rows: slice = slice(None),
) -> Hook:
    """Set one head's output at ``position`` of a ``[batch, pos, head, d_head]`` hook point.

    For ``attn.hook_z``.  ``heads`` is one head for every row, or one head
    per row of ``rows`` (a slice with explicit start and stop); ``values`` is
    the heads' clean output at the position, ``[n_heads, d_head]``, from
    which each row takes its head's.
    """
    per_row = not isinstance(heads, int)
    head_index = torch.as_tensor(heads if per_row else [heads], dtype=torch.long)
    if per_row and (rows.start is None or rows.stop is None
                    or rows.stop - rows.start != len(head_index)):
        raise ValueError(f"a head per row needs rows with a start and stop spanning "
                         f"{len(head_index)} rows, got {rows}")

    def patch_head_hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        head_values = values[head_index].to(activation.dtype)  # [n_rows or 1, d_head]
        if per_row:
            row_index = torch.arange(rows.start, rows.stop)
            activation[row_index, position, head_index] = head_values
        else:
            activation[rows, position, int(head_index[0])] = head_values[0]
        return activation

    return hook_name, patch_head_hook


def _position_index(positions: Positions) -> slice | list[int]:
    if isinstance(positions, slice):
        return positions
    if isinstance(positions, int):
        return [positions]
    return list(positions)


# --------------------------------------------------------------------------- restore and sever


def restore(
    hook_name: str,
    clean: torch.Tensor | ActivationCache,
    positions: Positions,
    *,
    rows: slice = slice(None),
) -> Hook:
    """Restore clean values at ``positions`` of ``hook_name``.

    ``clean`` is an ``ActivationCache`` of a clean run (batch 1) or the clean
    activation itself, ``[1, pos, ...]`` or ``[pos, ...]``.
    """
    return patch(hook_name, _at_positions(clean, hook_name, positions), positions, rows=rows)


def restore_window(
    model: HookedTransformer,
    kind: str,
    layers: Iterable[int],
    positions: Positions,
    clean: ActivationCache,
    *,
    rows: slice = slice(None),
) -> list[Hook]:
    """Restore a kind of state (``"hidden"``, ``"mlp"``, ``"attn"``) over several layers."""
    adapter = adapter_for(model)
    return [
        restore(adapter.hook_name(kind, layer), clean, positions, rows=rows) for layer in layers
    ]


def sever(
    model: HookedTransformer,
    kind: str,
    positions: Positions,
    corrupted: ActivationCache,
    *,
    layers: Iterable[int] | None = None,
) -> list[Hook]:
    """Freeze ``kind`` outputs (``"mlp"`` or ``"attn"``) at ``positions`` to their corrupted values.

    ``corrupted`` is the cache of the corrupted run, with the same batch as the
    run the hooks go into.  All layers unless ``layers`` is given.
    """
    if kind not in ("mlp", "attn"):
        raise ValueError(f"can only sever 'mlp' or 'attn' outputs, got {kind!r}")
    adapter = adapter_for(model)
    layers = range(adapter.n_layers) if layers is None else layers
    hooks = []
    for layer in layers:
        name = adapter.hook_name(kind, layer)
        hooks.append(patch(name, corrupted[name][:, _position_index(positions)], positions))
    return hooks


def record(hook_name: str, store: dict[str, torch.Tensor]) -> Hook:
    """Keep a copy of the activation at ``hook_name`` in ``store[hook_name]``."""

    def record_hook(activation: torch.Tensor, hook: HookPoint) -> None:
        store[hook_name] = activation.detach().clone()

    return hook_name, record_hook


def _at_positions(
    clean: torch.Tensor | ActivationCache, hook_name: str, positions: Positions
) -> torch.Tensor:
    values = clean[hook_name] if isinstance(clean, ActivationCache) else clean
    if isinstance(clean, ActivationCache) or values.ndim >= 3:
        if values.shape[0] != 1:
            raise ValueError(
                f"clean values for {hook_name} must come from one clean run (batch 1), "
                f"got batch {values.shape[0]}"
            )
        values = values[0]
    return values[_position_index(positions)]


# --------------------------------------------------------------------------- corruption


def corrupt(
    noise: Float[torch.Tensor, "samples n_subject d_model"],
    subject_range: tuple[int, int],
    *,
    replace: bool = False,
    rows: slice = slice(None),
    hook_name: str = "hook_embed",
) -> Hook:
    """Add ``noise`` to (or, with ``replace``, put it in place of) the subject's embeddings.

    ``activation[rows]`` must have ``samples`` rows: one noise draw each.
    """
    start, end = subject_range
    if noise.ndim != 3 or noise.shape[1] != end - start:
        raise ValueError(
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
        model: HookedTransformer,
        subject_tokens: torch.Tensor,
        samples: int,
        generator: torch.Generator,
    ) -> Corruption:
        raise NotImplementedError

    def __str__(self) -> str:
        return repr(self)


def embedding_std(model: HookedTransformer, subjects: Sequence[str] | None = None) -> float:
    """Standard deviation of token embeddings: of the subjects' tokens (the paper's
    ``collect_embedding_std``) when ``subjects`` are given, else of the whole vocabulary."""
    return float(_embedding_rows(model, subjects).std())


def _embedding_rows(model: HookedTransformer, subjects: Sequence[str] | None) -> torch.Tensor:
    adapter = adapter_for(model)
    if subjects is None:
        return model.embed.W_E.detach()
    ids = [adapter.tokenize(s)[0][0, int(adapter.prepend_bos) :] for s in subjects]
    return adapter.embeddings(torch.cat(ids)[None])[0].detach()


@dataclass(frozen=True)
class Gaussian(Noise):
    """Spherical Gaussian noise, std ``level``, or ``scale`` x embedding std (the paper's "s3")."""

    scale: float = 3.0
    level: float | None = None

    def std(self, model: HookedTransformer) -> float:
        return self.level if self.level is not None else self.scale * embedding_std(model)

    def draw(self, model, subject_tokens, samples, generator):
        shape = (samples, len(subject_tokens), model.cfg.d_model)
        return Corruption(torch.randn(shape, generator=generator) * self.std(model))


@dataclass(frozen=True)
class StudentT(Noise):
    """Student-t noise with ``df`` degrees of freedom, scaled like :class:`Gaussian`."""

    df: float = 3.0
    scale: float = 3.0

    def draw(self, model, subject_tokens, samples, generator):
        shape = (samples, len(subject_tokens), model.cfg.d_model)
        normal = torch.randn(shape, generator=generator)
        chi2 = 2 * torch._standard_gamma(torch.full(shape[:2] + (1,), self.df / 2))
        return Corruption(normal * torch.sqrt(self.df / chi2) * self.scale * embedding_std(model))


@dataclass(frozen=True)
class Uniform(Noise):
    """Uniform noise on ``[-1, 1]`` times ``scale`` x embedding std."""

    scale: float = 3.0

    def draw(self, model, subject_tokens, samples, generator):
        shape = (samples, len(subject_tokens), model.cfg.d_model)
        unit = torch.rand(shape, generator=generator) * 2 - 1
        return Corruption(unit * self.scale * embedding_std(model))


@dataclass(frozen=True)
class MultivariateGaussian(Noise):
    """Noise from a Gaussian with the embeddings' mean and covariance.

    Added to the subject's embeddings, as the paper's "m" option; with
    ``replace=True`` the subject's embeddings are replaced by such draws.
    """

    replace: bool = False

    def draw(self, model, subject_tokens, samples, generator):
        rows = _embedding_rows(model, None).double()
        mean = rows.mean(0)
        centred = rows - mean
        cov = centred.T @ centred / (len(rows) - 1)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        transform = eigenvectors * eigenvalues.clamp(min=0).sqrt()
        shape = (samples, len(subject_tokens), model.cfg.d_model)
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
            raise ValueError("SubjectSwap needs at least one alternative subject")
        object.__setattr__(self, "alternatives", tuple(alternatives))

    def draw(self, model, subject_tokens, samples, generator):
        adapter = adapter_for(model)
        swaps = []
        for alternative in self.alternatives:
            tokens = adapter.tokenize(alternative)[0][:, int(adapter.prepend_bos) :]
            if tokens.shape[1] != len(subject_tokens):
                raise ValueError(
                    f"alternative subject {alternative!r} has {tokens.shape[1]} tokens, but the "
                    f"subject has {len(subject_tokens)}: pick alternatives of the same length"
                )
            swaps.append(adapter.embeddings(tokens)[0].detach())
        values = torch.stack([swaps[i % len(swaps)] for i in range(samples)])
        return Corruption(values, replace=True)


def draw_corruption(
    noise: float | torch.Tensor | Noise,
    model: HookedTransformer,
    subject_tokens: torch.Tensor,
    samples: int,
    seed: int,
) -> tuple[Corruption, str]:
    """Resolve ``trace``'s ``noise`` argument into a corruption and a description of it."""
    n_subject, d_model = len(subject_tokens), model.cfg.d_model
    if isinstance(noise, torch.Tensor):
        expected = (samples, n_subject, d_model)
        if tuple(noise.shape) != expected:
            raise ValueError(
                f"noise tensor has shape {tuple(noise.shape)}; expected [samples, "
                f"n_subject_tokens, d_model] = {list(expected)} for this prompt and subject"
            )
        values = noise.detach().float().cpu()
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(
                f"noise tensor has {bad} NaN or infinite values of {values.numel()}; every "
                f"value must be finite (draw it e.g. with torch.randn(...) * level)"
            )
        return Corruption(values), "explicit tensor"
    if isinstance(noise, bool) or not isinstance(noise, (int, float, Noise)):
        raise TypeError(
            f"noise must be a float level, a tensor [samples, n_subject_tokens, d_model] or a "
            f"lens_rome.hooks.Noise rule, got {noise!r}"
        )
    if not isinstance(noise, Noise):
        if not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise level must be a finite number >= 0 (the std of the "
                             f"Gaussian noise, e.g. 0.1), got {noise}")
        noise = Gaussian(level=float(noise))
    generator = torch.Generator().manual_seed(seed)
    corruption = noise.draw(model, subject_tokens.cpu(), samples, generator)
    if not torch.isfinite(corruption.values).all():
        raise ValueError(f"the noise rule {noise} drew NaN or infinite values; check its "
                         f"parameters (levels and scales must be finite)")
    return corruption, str(noise)
