"""AlphaEdit's null-space constraint: change ``W_out`` only where the corpus keys do not reach.

ROME and MEMIT trade the new fact against all other keys through ``C = E[k k^T]``;
every edit still moves the outputs of ordinary keys a little, and over hundreds of
sequential edits those small moves add up until the model stops writing fluent
text.  AlphaEdit (Fang et al., ICLR 2025) removes the trade-off: the change ``D``
(``[d_mlp, d_model]`` in TransformerLens' layout, ``post @ W_out``) is confined to
the null space of the preserved keys, ``D = P X`` with ``P`` the projector onto
the eigenvectors of ``C`` whose eigenvalues are small, so that ``k^T D ~ 0`` for
the keys ``C`` was estimated from.  Within that space it solves, for the new keys
``K`` (``[n, d_mlp]``) and the residuals ``R`` (``[n, d_model]``) they must add,

    min_X |K P X - R|^2 + |K_p P X|^2 + l2 |P X|^2

where ``K_p`` are the keys of the edits made before (so later edits leave earlier
ones in place).  The solution used by AlphaEdit's code is

    D = (P (K^T K + K_p^T K_p) + l2 I)^-1 P K^T R

which lies in the range of ``P``.  :func:`update_left` returns the ``[d_mlp, n]``
factor ``(P (K^T K + K_p^T K_p) + l2 I)^-1 P K^T``; the change is that times ``R``.

AlphaEdit's code cuts the spectrum at an absolute eigenvalue (2e-2 for its
models); keys differ in scale from model to model, so the cut here is relative:
eigenvalues below ``threshold`` times the mean eigenvalue ``tr(C) / d_mlp``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Iterable

import torch
from jaxtyping import Float

from lens_rome.errors import InputError

log = logging.getLogger(__name__)

# The relative eigenvalue cut and the ridge weight: the best score of a batch of 30
# development cases on SmolLM2 (benchmarks/sequential_edits.py --choose; docs/editing.md).
NULL_SPACE_THRESHOLD = 0.75
NULL_SPACE_L2 = 1.0

_PROJECTORS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHED = 6


def _fingerprint(matrix: torch.Tensor) -> str:
    sample = matrix.detach().to(torch.float64).cpu().contiguous().flatten()[::89]
    digest = hashlib.sha256(sample.numpy().tobytes())
    digest.update(str((tuple(matrix.shape), float(matrix.diagonal().sum()))).encode())
    return digest.hexdigest()


def projector(second_moment: Float[torch.Tensor, "d_mlp d_mlp"],
              threshold: float = NULL_SPACE_THRESHOLD) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """``P = U U^T`` over the eigenvectors of ``C`` with eigenvalue < ``threshold * mean``.

    float64; cached for the last few matrices (one eigen-decomposition per layer).
    Raises ``InputError`` when no eigenvalue is below the cut (nothing could change).
    """
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold <= 0:
        raise InputError(f"threshold must be a number > 0, got {threshold!r}")
    c = second_moment.to(torch.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise InputError(f"second_moment must be a square matrix, got {tuple(c.shape)}")
    key = (_fingerprint(c), float(threshold), str(c.device))
    if key in _PROJECTORS:
        _PROJECTORS.move_to_end(key)
        return _PROJECTORS[key]
    values, vectors = torch.linalg.eigh(c)
    cut = float(threshold) * float(values.mean())
    kept = vectors[:, values < cut]
    if kept.shape[1] == 0:
        raise InputError(
            f"no eigenvalue of C is below {threshold} x the mean eigenvalue ({cut:.3g}; the "
            f"smallest is {float(values[0]):.3g}): the null space is empty; raise the threshold"
        )
    energy = float(values[values < cut].sum() / values.sum())
    log.info("null space: %d of %d directions (%.2f%% of the keys' energy) below %.3g",
             kept.shape[1], len(values), 100 * energy, cut)
    result = kept @ kept.T
    _PROJECTORS[key] = result
    while len(_PROJECTORS) > _CACHED:
        _PROJECTORS.popitem(last=False)
    return result


def key_gram(keys: Iterable[torch.Tensor], d_mlp: int, device=None
             ) -> Float[torch.Tensor, "d_mlp d_mlp"] | None:
    """``sum K^T K`` over blocks of keys ``[n, d_mlp]`` (float64); None when there are none."""
    total = None
    for block in keys:
        if block is None or block.numel() == 0:
            continue
        block = block.to(torch.float64).reshape(-1, d_mlp)
        if device is not None:
            block = block.to(device)
        total = block.T @ block if total is None else total + block.T @ block
    return total


def update_left(
    projection: Float[torch.Tensor, "d_mlp d_mlp"],
    keys: Float[torch.Tensor, "n d_mlp"],
    earlier: Float[torch.Tensor, "d_mlp d_mlp"] | None = None,
    l2: float = NULL_SPACE_L2,
) -> Float[torch.Tensor, "d_mlp n"]:
    """``(P (K^T K + K_p^T K_p) + l2 I)^-1 P K^T``: the change is this times the residuals.

    ``earlier`` is ``K_p^T K_p`` of the keys to keep (:func:`key_gram`), or None.
    """
    p = projection.to(torch.float64)
    k = keys.to(torch.float64).to(p.device)
    gram = k.T @ k if earlier is None else k.T @ k + earlier.to(p)
    system = p @ gram + l2 * torch.eye(len(p), dtype=p.dtype, device=p.device)
    return torch.linalg.solve(system, p @ k.T)
