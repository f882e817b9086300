"""A reversible change to model weights: apply, revert bit for bit, save, load."""

from __future__ import annotations

from typing import Mapping

import torch

from lens_rome.checks import finite_tensor
from lens_rome.errors import InputError, ModelMismatchError
from lens_rome.model.adapter import adapter_for, model_fingerprint
from lens_rome.model.backend import Model


class WeightEdit:
    """A change to the ``W_out`` of some MLP layers of one model that reverts bit for bit.

    ROME's and MEMIT's edits are subclasses that say which layers they change
    (``layers``) and by how much (:meth:`layer_change`), so that :meth:`apply`
    can add a saved edit to a model after checking it is the right one.  A
    change made in place by other means (fine-tuning, or no change at all) is
    recorded with :func:`record_change`.  :meth:`revert` puts back the exact
    bits every touched ``W_out`` had before.  The edits applied to a model
    (``adapter_for(model).state.edits``) revert in reverse order.  A context
    manager: leaving the block reverts the edit.
    """

    def __init__(self, *, model_name: str, fingerprint: str | None, d_mlp: int, d_model: int,
                 hparams: dict | None = None, info: dict | None = None):
        self.model_name, self.fingerprint = model_name, fingerprint
        self.d_mlp, self.d_model = d_mlp, d_model
        self.hparams = hparams or {}
        self.info = info or {}
        self._model: Model | None = None
        self._originals: dict[int, torch.Tensor] = {}
        self._layers: tuple[int, ...] = ()

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return f"{type(self).__name__}(layers {list(self.layers)} of {self.model_name}, {state})"

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose ``W_out`` the edit changes."""
        return self._layers

    def layer_change(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        """The change ``[d_mlp, d_model]`` added to ``W_out`` of ``layer``, in ``weight``'s
        dtype and device (the one expression both the editing function and :meth:`apply`
        add, so that a saved edit re-applies to the same bits)."""
        raise NotImplementedError

    def keys_at(self, layer: int) -> torch.Tensor | None:
        """The keys ``[n, d_mlp]`` the edit wrote at ``layer`` (None: none known)."""
        return None

    def weight_delta(self, layer: int | None = None) -> torch.Tensor:
        """The change ``W_out - W_out(before)`` of ``layer`` (default: the edit's only layer),
        ``[d_mlp, d_model]``, while the edit is applied."""
        if not self.applied:
            raise RuntimeError("this change is reverted")
        if layer is None:
            if len(self.layers) != 1:
                raise InputError(f"this edit changes layers {list(self.layers)}: name one")
            (layer,) = self.layers
        return adapter_for(self._model).w_out(layer).detach() - self._originals[layer]

    @property
    def applied(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> Model | None:
        """The model the edit is applied to, if any."""
        return self._model

    def check_model(self, model: Model) -> None:
        """Raise ``ModelMismatchError`` unless ``model`` is the model this edit was made for."""
        adapter = adapter_for(model)
        theirs = (adapter.name, model_fingerprint(model))
        if theirs != (self.model_name, self.fingerprint) or (
                adapter.d_mlp, adapter.d_model) != (self.d_mlp, self.d_model):
            raise ModelMismatchError(
                f"this edit was made for model {self.model_name!r} (fingerprint "
                f"{self.fingerprint}), not for {theirs[0]!r} (fingerprint {theirs[1]}); "
                f"refusing to apply it"
            )
        for layer in self.layers:
            adapter.check_layer(layer)

    def apply(self, model: Model) -> WeightEdit:
        """Add the change to ``model``'s ``W_out`` in place (after checking it is the right model)."""
        if self.applied:
            raise RuntimeError(f"{self!r} is already applied; revert() it first")
        if self.fingerprint is None:
            raise RuntimeError(f"{self!r} records a change made in place; it cannot be re-applied")
        self.check_model(model)
        adapter = adapter_for(model)
        changes = {layer: self.layer_change(layer, adapter.w_out(layer)) for layer in self.layers}
        for layer, change in changes.items():  # all checked before any weight is touched
            check_update(change, layer)
        originals = {}
        with torch.no_grad():
            for layer, change in changes.items():
                weight = adapter.w_out(layer)
                originals[layer] = weight.detach().clone()
                weight.add_(change)
        self._attach(model, originals)
        return self

    def _attach(self, model: Model, originals: dict[int, torch.Tensor]) -> None:
        """Record that the change is in ``model``, whose ``W_out`` were ``originals`` before."""
        self._model, self._originals = model, originals
        adapter_for(model).state.edits.append(self)

    def revert(self) -> None:
        """Restore every touched ``W_out`` to the exact bits it had before :meth:`apply`."""
        if not self.applied:
            raise RuntimeError(f"{self!r} is not applied: nothing to revert")
        adapter = adapter_for(self._model)
        stack = adapter.state.edits
        later = [e for e in stack[stack.index(self) + 1:] if set(e.layers) & set(self.layers)]
        if later:
            raise RuntimeError(
                f"{len(later)} later edit(s) of layers {list(self.layers)} are still applied "
                f"({later[-1]!r}); revert edits in reverse order"
            )
        with torch.no_grad():
            for layer, original in self._originals.items():
                adapter.w_out(layer).copy_(original)
        stack.remove(self)
        self._model, self._originals = None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.applied:
            self.revert()


def check_update(change: torch.Tensor, layer: int) -> torch.Tensor:
    """``change`` (``[d_mlp, d_model]``, about to be added to ``W_out`` of ``layer``) if it is
    finite; else :class:`~lens_rome.errors.NonFiniteError`, before the model is touched."""
    return finite_tensor(change, f"the update of W_out at layer {layer}",
                         "it was not applied and the model is unchanged; check the inputs "
                         "of the edit (its statistics, targets and hyper-parameters)")


def record_change(model: Model, originals: Mapping[int, torch.Tensor], *,
                  info: dict | None = None) -> WeightEdit:
    """The change already made in place to ``model``'s ``W_out`` of the layers in
    ``originals`` (layer -> ``W_out`` before, ``[d_mlp, d_model]``), applied and
    revertible; no layers: no change."""
    adapter = adapter_for(model)
    change = WeightEdit(model_name=adapter.name, fingerprint=None, d_mlp=adapter.d_mlp,
                        d_model=adapter.d_model, info=info)
    change._layers = tuple(originals)
    change._attach(model, dict(originals))
    return change


def applied_edits(model: Model) -> list[WeightEdit]:
    """The edits currently applied to ``model`` (ROME's, MEMIT's, fine-tuning's), oldest first."""
    return list(adapter_for(model).state.edits)


def edited_keys(model: Model, layer: int) -> list[torch.Tensor]:
    """The keys ``[n, d_mlp]`` written at ``layer`` by the edits applied to ``model``."""
    keys = [e.keys_at(layer) for e in adapter_for(model).state.edits]
    return [k for k in keys if k is not None]
