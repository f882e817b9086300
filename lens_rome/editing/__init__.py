"""Editing facts: ROME, MEMIT, r-ROME, AlphaEdit and fine-tuning baselines, behind one registry."""

from typing import TYPE_CHECKING

from lens_rome._lazy import lazy_exports

_EXPORTS = {  # module -> the names this package takes from it
    ".memit": ("memit", "MemitEdit", "MemitHyperParams", "load_edit"),
    ".rome": ("rome", "Edit"),
    ".hparams": ("RomeHyperParams",),
    ".statistics": ("KeyStatistics", "key_statistics", "key_statistics_many"),
    ".weights": ("WeightEdit",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from lens_rome.editing import memit, rome
    from lens_rome.editing.hparams import RomeHyperParams
    from lens_rome.editing.memit import MemitEdit, MemitHyperParams, load_edit
    from lens_rome.editing.rome import Edit
    from lens_rome.editing.statistics import KeyStatistics, key_statistics, key_statistics_many
    from lens_rome.editing.weights import WeightEdit
