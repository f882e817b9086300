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

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from transformer_lens import HookedTransformer

from lens_rome import memit, rome
from lens_rome.models import adapter_for

log = logging.getLogger(__name__)

METHODS = ("rome", "r-rome", "memit", "alphaedit", "ft", "ft-l", "none")


# --------------------------------------------------------------------------- results of apply


class NoChange:
    """What ``none`` returns: nothing to revert."""

    info: dict = {}

    def revert(self) -> None:
        pass


class WeightChange:
    """A fine-tuned change to one layer's ``W_out``; ``revert()`` restores the original bits."""

    def __init__(self, model: HookedTransformer, layer: int, original: torch.Tensor,
                 info: dict | None = None):
        self.model, self.layer, self.original = model, layer, original
        self.info = info or {}

    @property
    def applied(self) -> bool:
        return self.original is not None

    def weight_delta(self) -> torch.Tensor:
        """The change ``W_out - W_out(original)``, ``[d_mlp, d_model]``."""
        if not self.applied:
            raise RuntimeError("this change is reverted")
        return adapter_for(self.model).w_out(self.layer).detach() - self.original

    def revert(self) -> None:
        if not self.applied:
            raise RuntimeError("this change is already reverted")
        with torch.no_grad():
            adapter_for(self.model).w_out(self.layer).copy_(self.original)
        self.original = None


# --------------------------------------------------------------------------- methods


class NoEdit:
    """``none``: leave the model as it is."""

    name = "none"

    def apply(self, model: HookedTransformer, request) -> NoChange:
        rome.EditRequest.parse(request)
        return NoChange()

    def describe(self) -> dict:
        return {"method": self.name}


class RomeMethod:
    """``rome`` (or ``r-rome``): :func:`lens_rome.rome.edit` with fixed hyper-parameters and
    key statistics.

    The key statistics are loaded (or computed and cached) at the first edit.
    """

    def __init__(self, model: HookedTransformer, hparams: rome.RomeHyperParams | None = None, *,
                 stats=None, corpus: str | Iterable[str] | None = None,
                 cache_dir: str | Path | None = None, **overrides):
        if hparams is None:
            hparams = rome.RomeHyperParams.for_model(model, **overrides)
        elif overrides:
            hparams = hparams.replace(**overrides)
        self.hparams, self.stats, self.corpus, self.cache_dir = hparams, stats, corpus, cache_dir
        self.name = "r-rome" if hparams.update_key == "average" else "rome"

    def apply(self, model: HookedTransformer, request) -> rome.Edit:
        if self.stats is None:
            from lens_rome.statistics import key_statistics  # noqa: PLC0415

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

    def __init__(self, model: HookedTransformer, hparams: memit.MemitHyperParams | None = None,
                 *, stats=None, corpus: str | Iterable[str] | None = None,
                 cache_dir: str | Path | None = None, **overrides):
        if hparams is None:
            hparams = memit.MemitHyperParams.for_model(model, **overrides)
        elif overrides:
            hparams = hparams.replace(**overrides)
        for layer in hparams.layers:
            adapter_for(model).check_layer(layer)
        self.hparams, self.stats, self.corpus, self.cache_dir = hparams, stats, corpus, cache_dir
        self.name = "alphaedit" if hparams.null_space else "memit"

    def _load_stats(self, model: HookedTransformer) -> None:
        if self.stats is None:
            from lens_rome.statistics import key_statistics  # noqa: PLC0415

            value = self.hparams.value
            self.stats = {layer: key_statistics(model, layer, self.corpus,
                                                samples=value.stats_samples,
                                                token_length=value.stats_token_length,
                                                cache_dir=self.cache_dir, progress=True)
                          for layer in self.hparams.layers}

    def apply_batch(self, model: HookedTransformer, requests) -> memit.MemitEdit:
        self._load_stats(model)
        return memit.edit(model, requests, hparams=self.hparams, stats=self.stats)

    def apply(self, model: HookedTransformer, request) -> memit.MemitEdit:
        return self.apply_batch(model, [request])

    def describe(self) -> dict:
        return {"method": self.name, **self.hparams.to_dict()}


@dataclass(frozen=True)
class FineTuneParams:
    """Fine-tuning one layer's ``W_out``.

    Attributes:
        layer: the MLP layer (default: ROME's edit layer for the model).
        steps, lr: Adam steps and learning rate (the paper's code: 25, 5e-4).
        norm_constraint: L-infinity radius of the change per weight (``ft-l``);
            None for plain ``ft``.
        early_stop_loss: stop once the target's mean NLL is below this.
    """

    layer: int
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = None
    early_stop_loss: float = 1e-2

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be > 0 or None, got {self.norm_constraint!r}")


# Per-model fine-tuning settings (see docs/evaluation.md).  The paper's code uses 25 Adam
# steps at lr 5e-4 and, for FT+L on GPT-2 XL, an L-inf radius of 5e-4.  SmolLM2's W_out
# at layer 5 has entries of standard deviation ~0.18; the radius below keeps FT-L's change
# to a few percent of that, which still lets most edits through on the edit prompt.
FT_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": {"steps": 25, "lr": 5e-4},
    "gpt2-xl": {"steps": 25, "lr": 5e-4},
}
FT_L_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": {"norm_constraint": 5e-3},
    "gpt2-xl": {"norm_constraint": 5e-4},
}
FT_L_FALLBACK = 5e-4


class FineTune:
    """``ft`` and ``ft-l``: Adam on one layer's ``W_out`` for the edit prompt's target."""

    def __init__(self, model: HookedTransformer, params: FineTuneParams | None = None, *,
                 constrained: bool = False, **overrides):
        name = adapter_for(model).name
        if params is None:
            defaults = {"layer": rome.RomeHyperParams.for_model(model).layer,
                        **FT_DEFAULTS.get(name, {})}
            if constrained:
                defaults.update(FT_L_DEFAULTS.get(name, {"norm_constraint": FT_L_FALLBACK}))
            fields = {f.name for f in dataclasses.fields(FineTuneParams)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise TypeError(f"unknown fine-tuning options {unknown}; "
                                f"accepted: {sorted(fields)}")
            params = FineTuneParams(**{**defaults, **{k: v for k, v in overrides.items()
                                                      if v is not None}})
        if constrained and params.norm_constraint is None:
            raise ValueError("ft-l needs norm_constraint > 0 (the L-infinity radius)")
        adapter_for(model).check_layer(params.layer)
        self.params = params
        self.name = "ft-l" if params.norm_constraint is not None else "ft"

    def describe(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self.params)}

    def apply(self, model: HookedTransformer, request) -> WeightChange:
        request = rome.EditRequest.parse(request)
        p = self.params
        adapter = adapter_for(model)
        weight = adapter.w_out(p.layer)
        original = weight.detach().clone()
        prompt = adapter.tokenize(request.text)[0][0].tolist()
        target = model.tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
        tokens = torch.tensor([prompt + target[:-1]], device=model.cfg.device)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
        target_ids = torch.tensor(target, device=model.cfg.device)
        with torch.no_grad():  # the blocks below the tuned layer do not change
            resid = model(tokens, stop_at_layer=p.layer)
        optimiser = torch.optim.Adam([weight], lr=p.lr)
        trainable = weight.requires_grad
        losses = []
        try:
            weight.requires_grad_(True)
            for _ in range(p.steps):
                with torch.enable_grad():
                    logits = model(resid, start_at_layer=p.layer)[0, positions]
                    loss = -torch.log_softmax(logits.float(), -1)[
                        torch.arange(len(target)), target_ids].mean()
                    losses.append(float(loss.detach()))
                    if losses[-1] < p.early_stop_loss:
                        break
                    (weight.grad,) = torch.autograd.grad(loss, [weight])
                optimiser.step()
                weight.grad = None
                if p.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.minimum(torch.maximum(
                            weight, original - p.norm_constraint), original + p.norm_constraint))
        except BaseException:
            with torch.no_grad():
                weight.copy_(original)
            raise
        finally:
            weight.grad = None
            weight.requires_grad_(trainable)
        return WeightChange(model, p.layer, original, {"losses": losses})


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
