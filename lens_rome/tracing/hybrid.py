"""A hybrid trace: estimate every cell, restore the most promising ones exactly.

:func:`lens_rome.trace` with ``method="hybrid"`` first estimates the whole grid
(:mod:`lens_rome.tracing.attribution`, integrated gradients), then restores
exactly (the batched engine) the ``verify`` cells with the highest estimated
score at each token from the subject on, and the ``verify_best`` highest of the
whole grid (a count, or a share of its cells; where the effect concentrates, at
one token over many layers, a per-token quota misses most of it), and returns one
:class:`TraceResult` whose ``exact_cells`` marks the exact ones.  The other cells keep the estimate,
shifted onto the exact corrupted score.  This module only chooses and merges
cells; :mod:`lens_rome.tracing.engine` runs both halves.
"""

from __future__ import annotations

import math

import torch

from lens_rome.errors import InputError
from lens_rome.tracing.result import TraceResult

DEFAULT_VERIFY = 0  # exact cells per token; chosen from benchmarks/attribution_quality.py
DEFAULT_VERIFY_BEST = 0.15  # the share of the grid's cells (its estimate's best); same benchmark

Cell = int | tuple[int, int]  # a layer, or (layer, head) for kind="head"


def cells_to_verify(estimate: TraceResult, k: int, best: int | float = 0, positions=None
                    ) -> dict[int, set[Cell]]:
    """The ``k`` cells of highest estimated score at each token from the subject on, and
    the ``best`` highest of all those tokens together (a float in (0, 1): that share of
    their cells, rounded up), of ``positions`` only if given:
    ``{position: {layer or (layer, head)}}``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise InputError(f"verify must be a whole number >= 0, got {k!r}")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or best < 0 or (
            isinstance(best, float) and best >= 1):
        raise InputError(f"verify_best must be a whole number of cells >= 0 or a share of the "
                         f"cells in [0, 1), got {best!r}")
    if k == best == 0:
        raise InputError("verify=0 and verify_best=0 restore no cell: use attribute() for an "
                         "estimate alone, or ask for at least one exact cell")
    start = estimate.subject_range[0]
    rows = list(range(start, len(estimate.tokens))) if positions is None else [
        p for p in positions if p >= start]
    if not rows:
        return {}
    grid = estimate.scores[rows]  # [rows, n_layers] or [rows, n_layers, n_heads]
    per_row = grid[0].numel()
    if isinstance(best, float):
        best = math.ceil(best * grid.numel())

    def cell(flat: int) -> Cell:
        return flat if grid.ndim == 2 else divmod(flat, grid.shape[2])

    chosen = {position: {cell(i) for i in grid[r].flatten().topk(min(k, per_row)).indices.tolist()}
              for r, position in enumerate(rows)}
    for flat in grid.flatten().topk(min(best, grid.numel())).indices.tolist():
        r, i = divmod(flat, per_row)
        chosen[rows[r]].add(cell(i))
    return chosen


def merged(estimate: TraceResult, exact: torch.Tensor, low_score: float, positions=None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, exact_cells)``: ``exact``'s scores where it has them (not NaN), else the
    estimate's indirect effect added to the exact corrupted score ``low_score``; cells
    before the subject are exact (restoring them changes nothing).  With ``positions``,
    the other tokens are NaN, as in an exact trace."""
    mask = ~torch.isnan(exact)
    scores = torch.where(mask, exact, estimate.scores - estimate.low_score + low_score)
    if positions is not None:
        kept = set(positions)
        others = [p for p in range(len(estimate.tokens)) if p not in kept]
        scores[others] = float("nan")
        mask[others] = False
    return scores, mask
