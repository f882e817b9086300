"""The ROME, MEMIT and no-edit editors of the registry (fine-tuning's is in :mod:`.finetune`)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from lens_rome.data.requests import EditRequest
from lens_rome.editing import memit, rome
from lens_rome.editing.editor import OneAtATime
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.memit import MemitEdit, MemitHyperParams
from lens_rome.editing.rome import Edit
from lens_rome.editing.statistics import key_statistics, key_statistics_many
from lens_rome.editing.weights import WeightEdit, record_change
from lens_rome.model.adapter import adapter_for
from lens_rome.model.backend import Model


class NoEdit(OneAtATime):
    """``none``: leave the model as it is (each change changes no layer)."""

    name = "none"

    def apply(self, model: Model, request) -> WeightEdit:
        EditRequest.parse(request)
        return record_change(model, {})


class RomeMethod(OneAtATime):
    """``rome`` (or ``r-rome``): :func:`lens_rome.editing.rome.edit` with fixed hyper-parameters
    and key statistics.

    The key statistics are loaded (or computed and cached) at the first edit.
    """

    def __init__(self, model: Model, hparams: RomeHyperParams | None = None, *,
                 stats=None, corpus: str | Iterable[str] | None = None,
                 cache_dir: str | Path | None = None, **overrides):
        if hparams is None:
            hparams = RomeHyperParams.for_model(model, **overrides)
        elif overrides:
            hparams = hparams.replace(**overrides)
        self.hparams, self.stats, self.corpus, self.cache_dir = hparams, stats, corpus, cache_dir
        self.name = "r-rome" if hparams.update_key == "average" else "rome"

    def apply(self, model: Model, request) -> Edit:
        if self.stats is None:
            hp = self.hparams
            self.stats = key_statistics(model, hp.layer, self.corpus, samples=hp.stats_samples,
                                        token_length=hp.stats_token_length,
                                        cache_dir=self.cache_dir, progress=True)
        return rome.edit(model, request, hparams=self.hparams, stats=self.stats)

    def describe(self) -> dict:
        return {"method": self.name, **self.hparams.to_dict()}


class MemitMethod:
    """``memit`` (or ``alphaedit``, with ``null_space=True``): :func:`lens_rome.editing.memit.edit`.

    ``apply_batch`` edits a batch in one edit, ``apply`` one request.  The key
    statistics of every edited layer are loaded (or computed and cached) at the
    first edit.
    """

    def __init__(self, model: Model, hparams: MemitHyperParams | None = None,
                 *, stats=None, corpus: str | Iterable[str] | None = None,
                 cache_dir: str | Path | None = None, **overrides):
        if hparams is None:
            hparams = MemitHyperParams.for_model(model, **overrides)
        elif overrides:
            hparams = hparams.replace(**overrides)
        for layer in hparams.layers:
            adapter_for(model).check_layer(layer)
        self.hparams, self.stats, self.corpus, self.cache_dir = hparams, stats, corpus, cache_dir
        self.name = "alphaedit" if hparams.null_space else "memit"

    def _load_stats(self, model: Model) -> None:
        if self.stats is None:
            value = self.hparams.value
            self.stats = key_statistics_many(model, self.hparams.layers, self.corpus,
                                             samples=value.stats_samples,
                                             token_length=value.stats_token_length,
                                             cache_dir=self.cache_dir, progress=True)

    def apply_batch(self, model: Model, requests: Sequence) -> list[MemitEdit]:
        """The whole batch in one edit: ``[change]``."""
        self._load_stats(model)
        return [memit.edit(model, requests, hparams=self.hparams, stats=self.stats)]

    def apply(self, model: Model, request) -> MemitEdit:
        return self.apply_batch(model, [request])[0]

    def describe(self) -> dict:
        return {"method": self.name, **self.hparams.to_dict()}
