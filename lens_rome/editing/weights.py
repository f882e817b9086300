"""A reversible change to model weights: apply, revert bit for bit, save, load."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from lens_rome.model.adapter import adapter_for, model_fingerprint


class WeightEdit:
    """What every edit of MLP output weights shares: applying, reverting, the model check.

    A subclass says which layers it changes (``layers``) and by how much
    (:meth:`layer_change`).  :meth:`apply` adds the changes after checking the
    model; :meth:`revert` puts back the exact bits every touched ``W_out`` had
    before.  Edits stacked on a model (ROME's and MEMIT's alike) revert in
    reverse order.  A context manager: leaving the block reverts the edit.
    """

    def __init__(self, *, model_name: str, fingerprint: str, d_mlp: int, d_model: int,
                 hparams: dict | None = None, info: dict | None = None):
        self.model_name, self.fingerprint = model_name, fingerprint
        self.d_mlp, self.d_model = d_mlp, d_model
        self.hparams = hparams or {}
        self.info = info or {}
        self._model: HookedTransformer | None = None
        self._originals: dict[int, torch.Tensor] = {}

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose ``W_out`` the edit changes."""
        raise NotImplementedError

    def layer_change(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        """The change ``[d_mlp, d_model]`` added to ``W_out`` of ``layer``, in ``weight``'s
        dtype and device (the one expression both the editing function and :meth:`apply`
        add, so that a saved edit re-applies to the same bits)."""
        raise NotImplementedError

    @property
    def applied(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> HookedTransformer | None:
        """The model the edit is applied to, if any."""
        return self._model

    def check_model(self, model: HookedTransformer) -> None:
        """Raise ``ValueError`` unless ``model`` is the model this edit was made for."""
        adapter = adapter_for(model)
        theirs = (adapter.name, model_fingerprint(model))
        if theirs != (self.model_name, self.fingerprint) or (
                model.cfg.d_mlp, model.cfg.d_model) != (self.d_mlp, self.d_model):
            raise ValueError(
                f"this edit was made for model {self.model_name!r} (fingerprint "
                f"{self.fingerprint}), not for {theirs[0]!r} (fingerprint {theirs[1]}); "
                f"refusing to apply it"
            )
        for layer in self.layers:
            adapter.check_layer(layer)

    def apply(self, model: HookedTransformer) -> "WeightEdit":
        """Add the change to ``model``'s ``W_out`` in place (after checking it is the right model)."""
        if self.applied:
            raise RuntimeError(f"{self!r} is already applied; revert() it first")
        self.check_model(model)
        adapter = adapter_for(model)
        originals = {}
        with torch.no_grad():
            for layer in self.layers:
                weight = adapter.w_out(layer)
                originals[layer] = weight.detach().clone()
                weight.add_(self.layer_change(layer, weight))
        self._attach(model, originals)
        return self

    def _attach(self, model: HookedTransformer, originals: dict[int, torch.Tensor]) -> None:
        """Record that the change is in ``model``, whose ``W_out`` were ``originals`` before."""
        self._model, self._originals = model, originals
        _stack(model).append(self)

    def revert(self) -> None:
        """Restore every touched ``W_out`` to the exact bits it had before :meth:`apply`."""
        if not self.applied:
            raise RuntimeError(f"{self!r} is not applied: nothing to revert")
        stack = _stack(self._model)
        later = [e for e in stack[stack.index(self) + 1:] if set(e.layers) & set(self.layers)]
        if later:
            raise RuntimeError(
                f"{len(later)} later edit(s) of layers {list(self.layers)} are still applied "
                f"({later[-1]!r}); revert edits in reverse order"
            )
        adapter = adapter_for(self._model)
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


def _stack(model: HookedTransformer) -> list[WeightEdit]:
    """The edits applied to ``model``, oldest first."""
    if not hasattr(model, "lens_rome_edits"):
        model.lens_rome_edits = []
    return model.lens_rome_edits


def applied_edits(model: HookedTransformer) -> list[WeightEdit]:
    """The edits currently applied to ``model`` (ROME's and MEMIT's), oldest first."""
    return list(_stack(model))


def edited_keys(model: HookedTransformer, layer: int) -> list[torch.Tensor]:
    """The keys ``[n, d_mlp]`` written at ``layer`` by the edits applied to ``model``."""
    keys = [e.keys_at(layer) for e in _stack(model)]
    return [k for k in keys if k is not None]
