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

from typing import Iterable, Sequence

import torch
from transformer_lens import ActivationCache
from transformer_lens.hook_points import HookPoint

from lens_rome.errors import InputError
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model
from lens_rome.model.hooks import Hook, Positions


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
        raise InputError(f"a head per row needs rows with a start and stop spanning "
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
    model: Model,
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
    model: Model,
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
        raise InputError(f"can only sever 'mlp' or 'attn' outputs, got {kind!r}")
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
            raise InputError(
                f"clean values for {hook_name} must come from one clean run (batch 1), "
                f"got batch {values.shape[0]}"
            )
        values = values[0]
    return values[_position_index(positions)]
