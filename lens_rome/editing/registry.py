"""Editing methods behind one interface: ROME, r-ROME, MEMIT, AlphaEdit, fine-tuning, no edit.

Meng et al. (2022, section 4) compare ROME with fine-tuning one layer:

- ``ft``: Adam on ``W_out`` of one MLP layer to minimise
  ``-log P(target_new | rewrite prompt)`` (mean over the target's tokens,
  teacher-forced), for a fixed number of steps;
- ``ft-l`` (the paper's FT+L): the same, but after every step the change to
  ``W_out`` is clamped to an L-infinity ball of radius ``norm_constraint``
  around the original weights (5e-4 for GPT-2 XL in the paper);
- ``rome``: :func:`lens_rome.rome.edit`;
- ``r-rome``: the same with r-ROME's update (``update_key="average"``, Gupta
  et al. 2024);
- ``memit``: :func:`lens_rome.memit.edit`, a batch of requests over several layers;
- ``alphaedit``: the same with AlphaEdit's null-space update (``null_space=True``);
- ``none``: the unedited model, for reference rows.

:func:`make_method` builds one by name; ``method.apply(model, request)`` edits
the model in place and returns an object whose ``revert()`` puts back the
exact bits, so that every evaluation case starts from the unedited model::

    method = make_method("ft-l", model)
    change = method.apply(model, {"prompt": "{} is in", "subject": "The Louvre",
                                  "target_new": " Rome"})
    ...
    change.revert()

:func:`apply_batch` edits several requests at once: in one edit where the
method has ``apply_batch`` (``memit``, ``alphaedit``), else one after another;
it returns the list of changes, to be reverted in reverse order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from transformer_lens import HookedTransformer

from lens_rome.data.requests import EditRequest
from lens_rome.editing import memit, rome
from lens_rome.editing.finetune import METHODS, FineTune, NoChange
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.memit import MemitEdit, MemitHyperParams
from lens_rome.editing.rome import Edit
from lens_rome.model.adapter import adapter_for


class NoEdit:
    """``none``: leave the model as it is."""

    name = "none"

    def apply(self, model: HookedTransformer, request) -> NoChange:
        EditRequest.parse(request)
        return NoChange()

    def describe(self) -> dict:
        return {"method": self.name}


class RomeMethod:
    """``rome`` (or ``r-rome``): :func:`lens_rome.rome.edit` with fixed hyper-parameters and
    key statistics.

    The key statistics are loaded (or computed and cached) at the first edit.
    """

    def __init__(self, model: HookedTransformer, hparams: RomeHyperParams | None = None, *,
                 stats=None, corpus: str | Iterable[str] | None = None,
                 cache_dir: str | Path | None = None, **overrides):
        if hparams is None:
            hparams = RomeHyperParams.for_model(model, **overrides)
        elif overrides:
            hparams = hparams.replace(**overrides)
        self.hparams, self.stats, self.corpus, self.cache_dir = hparams, stats, corpus, cache_dir
        self.name = "r-rome" if hparams.update_key == "average" else "rome"

    def apply(self, model: HookedTransformer, request) -> Edit:
        if self.stats is None:
            from lens_rome.editing.statistics import key_statistics  # noqa: PLC0415

            hp = self.hparams
            self.stats = key_statistics(model, hp.layer, self.corpus, samples=hp.stats_samples,
                                        token_length=hp.stats_token_length,
                                        cache_dir=self.cache_dir, progress=True)
        return rome.edit(model, request, hparams=self.hparams, stats=self.stats)

    def describe(self) -> dict:
        return {"method": self.name, **self.hparams.to_dict()}


class MemitMethod:
    """``memit`` (or ``alphaedit``, with ``null_space=True``): :func:`lens_rome.memit.edit`.

    ``apply`` edits one request, ``apply_batch`` a batch in one edit.  The key
    statistics of every edited layer are loaded (or computed and cached) at the
    first edit.
    """

    def __init__(self, model: HookedTransformer, hparams: MemitHyperParams | None = None,
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

    def _load_stats(self, model: HookedTransformer) -> None:
        if self.stats is None:
            from lens_rome.editing.statistics import key_statistics  # noqa: PLC0415

            value = self.hparams.value
            self.stats = {layer: key_statistics(model, layer, self.corpus,
                                                samples=value.stats_samples,
                                                token_length=value.stats_token_length,
                                                cache_dir=self.cache_dir, progress=True)
                          for layer in self.hparams.layers}

    def apply_batch(self, model: HookedTransformer, requests) -> MemitEdit:
        self._load_stats(model)
        return memit.edit(model, requests, hparams=self.hparams, stats=self.stats)

    def apply(self, model: HookedTransformer, request) -> MemitEdit:
        return self.apply_batch(model, [request])

    def describe(self) -> dict:
        return {"method": self.name, **self.hparams.to_dict()}


def make_method(name: str, model: HookedTransformer, **options: Any):
    """The editing method ``name`` (one of :data:`METHODS`) for ``model``.

    ``options`` go to the method: ROME hyper-parameters (``hparams=...``,
    ``stats=...``, ``layer=...``, ``null_space=True``, ...), MEMIT ones
    (``layers=...``, ``mom2_weight=...``, ``stats={layer: ...}``, ...) or
    fine-tuning ones (``layer``, ``steps``, ``lr``, ``norm_constraint``,
    ``early_stop_loss``).
    """
    if name == "none":
        if options:
            raise TypeError(f"method 'none' takes no options, got {sorted(options)}")
        return NoEdit()
    if name in ("rome", "r-rome"):
        if name == "r-rome":
            if options.get("update_key", "average") != "average":
                raise ValueError("method 'r-rome' is ROME with update_key='average'; use "
                                 "method 'rome' for the other update")
            options = {**options, "update_key": "average"}
        return RomeMethod(model, **options)
    if name in ("memit", "alphaedit"):
        if name == "alphaedit":
            if options.get("null_space", True) is not True:
                raise ValueError("method 'alphaedit' is MEMIT with null_space=True; use "
                                 "method 'memit' for MEMIT's own update")
            options = {**options, "null_space": True}
        return MemitMethod(model, **options)
    if name in ("ft", "ft-l"):
        return FineTune(model, constrained=name == "ft-l", **options)
    raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")


def method_name(method: Any) -> str:
    """The name of a method object or string (checked)."""
    name = method if isinstance(method, str) else getattr(method, "name", None)
    if isinstance(method, str) and name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    if not isinstance(name, str) or not hasattr(method, "apply") and not isinstance(method, str):
        raise TypeError(f"method must be one of {list(METHODS)} or an object with .name and "
                        f".apply(model, request), got {method!r}")
    return name


def describe(method: Any) -> Mapping:
    return method.describe() if hasattr(method, "describe") else {"method": method.name}


def apply_batch(method: Any, model: HookedTransformer, requests) -> list:
    """Apply ``requests`` with ``method``; the changes made, oldest first.

    One edit for methods with ``apply_batch`` (MEMIT, AlphaEdit); otherwise
    one edit per request, in order, each on top of the ones before.  If an
    edit fails, those already made are reverted before the error propagates.
    """
    requests = list(requests)
    if not requests:
        raise ValueError("the batch of edit requests is empty: give at least one request")
    if hasattr(method, "apply_batch"):
        return [method.apply_batch(model, requests)]
    changes = []
    try:
        for request in requests:
            changes.append(method.apply(model, request))
    except BaseException:
        for change in reversed(changes):
            change.revert()
        raise
    return changes
