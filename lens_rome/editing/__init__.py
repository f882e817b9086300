"""Editing facts: ROME, MEMIT, r-ROME, AlphaEdit and fine-tuning baselines, behind one registry."""

from lens_rome.editing import memit, rome
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.memit import MemitEdit, MemitHyperParams, load_edit
from lens_rome.editing.rome import Edit
from lens_rome.editing.statistics import KeyStatistics, key_statistics
from lens_rome.editing.weights import WeightEdit

__all__ = [
    "Edit", "KeyStatistics", "MemitEdit", "MemitHyperParams", "RomeHyperParams", "WeightEdit",
    "key_statistics", "load_edit", "memit", "rome",
]
