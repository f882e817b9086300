"""ROME: rewrite one fact with a rank-one change to one MLP's output projection.

Meng et al. (2022, section 3) read a mid-layer MLP as a key-value memory: the
key ``k`` is the MLP's hidden activation at the token where the model looks
the subject up (``blocks.{l}.mlp.hook_post``), the value is what
``W_out`` makes of it.  To make the model say ``o*`` instead of ``o`` for
``(s, r)``, ROME

1. computes the key ``k*``: the activation at the subject's lookup token,
   averaged over the prompt preceded by ~20 short texts the model generates
   itself, so that the edit does not depend on the context;
2. optimises a value ``v* = m + delta`` (``m``: the MLP output at the bare
   prompt's lookup token) as the paper's code (``rome/compute_v.py``) does::

       L(delta) = mean_j -log P(o* | x_j + p, m_j + delta)         # j: prefixes
                  + kl_weight * KL(P_edited || P_original)          # "{s} is a", at s's last token
                  + weight_decay * |delta| / |m|^2

   with ``|delta| <= clamp_norm * |m|`` after each Adam step, stopping when
   ``L < early_stop_loss`` (:class:`RomeHyperParams`; departures from it are
   named options there);
3. inserts the pair with the least change to every other key, given
   ``C = E[k k^T]`` over a corpus (:mod:`lens_rome.editing.statistics`)::

       W' = W + Lambda (C^-1 k*)^T,   Lambda = (v* - W k*) / ((C^-1 k*)^T k*)

TransformerLens computes ``post @ W_out`` with ``W_out`` of shape
``[d_mlp, d_model]``, so the change is ``outer(C^-1 k*, Lambda)`` added to
``blocks[l].mlp.W_out`` in place.  :func:`edit` returns an :class:`Edit`:
revert it (bit-exact), save it, load it, apply it to another copy of the
model, or use :func:`edited` for a temporary edit::

    with rome.edited(model, {"prompt": "{} is located in the city of",
                             "subject": "The Eiffel Tower", "target_new": " Rome"}):
        model.generate("The Eiffel Tower is", max_new_tokens=10)

For edits that pile up on one model: ``update_key="average"`` is r-ROME's update
(``k*`` in numerator and denominator), and ``null_space=True`` AlphaEdit's
(:mod:`lens_rome.editing.null_space`); :mod:`lens_rome.editing.memit` edits batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from jaxtyping import Float

from lens_rome.data.requests import EditRequest
from lens_rome.editing.hparams import RomeHyperParams
from lens_rome.editing.null_space import key_gram, projector, update_left
from lens_rome.editing.statistics import KeyStatistics, layer_second_moment
from lens_rome.editing.values import KeyValue, key_and_value
from lens_rome.editing.weights import WeightEdit, edited_keys
from lens_rome.errors import InputError, WrongTypeError
from lens_rome.model.adapter import ModelAdapter, adapter_for, model_fingerprint
from lens_rome.model.backend import Model
from lens_rome.storage import load_saved, save_tensors

SAVE_FORMAT = 1
METADATA_KEY = "lens_rome_edit"


class Edit(WeightEdit):
    """A rank-one change ``W_out += outer(left, right)`` to one layer of one model.

    Made by :func:`edit` (already applied), or loaded with :meth:`Edit.load`
    (not applied).  :meth:`revert` puts back the exact bits ``W_out`` had
    before :meth:`apply`; several edits stacked on a model revert in reverse
    order.  Also a context manager: leaving the block reverts it.
    """

    def __init__(self, layer: int, left: torch.Tensor, right: torch.Tensor, *,
                 model_name: str, fingerprint: str, d_mlp: int, d_model: int,
                 request: EditRequest | None = None, hparams: dict | None = None,
                 info: dict | None = None, keys: torch.Tensor | None = None):
        if left.shape != (d_mlp,) or right.shape != (d_model,):
            raise InputError(
                f"an edit of a [{d_mlp}, {d_model}] W_out needs left [{d_mlp}] and right "
                f"[{d_model}], got {tuple(left.shape)} and {tuple(right.shape)}"
            )
        if keys is not None and (keys.ndim != 2 or keys.shape[1] != d_mlp):
            raise InputError(f"keys must be [n, {d_mlp}], got {tuple(keys.shape)}")
        super().__init__(model_name=model_name, fingerprint=fingerprint, d_mlp=d_mlp,
                         d_model=d_model, hparams=hparams, info=info)
        self.layer = layer
        self.left = left.detach().float().cpu()
        self.right = right.detach().float().cpu()
        # the key(s) written, [n, d_mlp]: what later null-space edits keep in place
        self.keys = None if keys is None else keys.detach().float().cpu()
        self.request = request

    def __repr__(self) -> str:
        what = f"{self.request.subject!r} -> {self.request.target_new!r}, " if self.request else ""
        state = "applied" if self.applied else "not applied"
        return f"Edit({what}layer {self.layer} of {self.model_name}, {state})"

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers whose ``W_out`` the edit changes (one)."""
        return (self.layer,)

    def keys_at(self, layer: int) -> torch.Tensor | None:
        """The keys ``[n, d_mlp]`` this edit wrote at ``layer`` (None if none are known)."""
        return self.keys if layer == self.layer else None

    def weight_delta(self) -> Float[torch.Tensor, "d_mlp d_model"]:
        """The change to ``W_out``: ``outer(left, right)``."""
        return torch.outer(self.left, self.right)

    def layer_change(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        return torch.outer(self.left, self.right).to(weight.device, weight.dtype)

    def update_norm(self) -> float:
        """Frobenius norm of the change to ``W_out``."""
        return float(self.left.double().norm() * self.right.double().norm())

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the edit as safetensors (``left``, ``right``) with JSON metadata."""
        meta = {
            "format": SAVE_FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
            "layer": self.layer, "d_mlp": self.d_mlp, "d_model": self.d_model,
            "request": self.request.to_dict() if self.request else None,
            "hparams": self.hparams,
            "info": {k: v for k, v in self.info.items() if k != "v_history"},
        }
        tensors = {"left": self.left, "right": self.right}
        if self.keys is not None:
            tensors["keys"] = self.keys
        return save_tensors(path, tensors, METADATA_KEY, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by :meth:`save` (not applied: call :meth:`apply`)."""
        return load_saved(path, METADATA_KEY, SAVE_FORMAT, "lens_rome edit", cls._from_saved)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "Edit":
        request = EditRequest(**meta["request"]) if meta.get("request") else None
        return cls(int(meta["layer"]), tensors["left"], tensors["right"],
                   model_name=meta["model"], fingerprint=meta["fingerprint"],
                   d_mlp=int(meta["d_mlp"]), d_model=int(meta["d_model"]), request=request,
                   hparams=meta.get("hparams"), info=meta.get("info"), keys=tensors.get("keys"))


def edit(
    model: Model,
    request: EditRequest | Mapping[str, Any],
    *,
    hparams: RomeHyperParams | None = None,
    layer: int | None = None,
    lookup: str | int | None = None,
    stats: KeyStatistics | torch.Tensor | None = None,
    corpus: str | Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **overrides,
) -> Edit:
    """Rewrite one fact of ``model`` in place; returns the applied :class:`Edit`.

    Args:
        request: ``{"prompt": "{} is located in the city of", "subject": "The
            Eiffel Tower", "target_new": " Rome"}``, an :class:`EditRequest`, or a
            CounterFact record.
        hparams: all hyper-parameters; default ``RomeHyperParams.for_model(model)``.
        layer, lookup, **overrides: change single hyper-parameters.
        stats: the key statistics of the layer (a :class:`KeyStatistics` or the
            second moment ``[d_mlp, d_mlp]``); default: computed or loaded from
            the cache by :func:`lens_rome.editing.statistics.key_statistics` over ``corpus``.
    """
    request = EditRequest.parse(request)
    adapter = adapter_for(model)
    base = hparams if hparams is not None else RomeHyperParams.for_model(
        model, **({"layer": layer} if layer is not None else {}))
    changes = {k: v for k, v in {"layer": layer, "lookup": lookup, **overrides}.items()
               if v is not None}
    fields = {f.name for f in dataclasses.fields(RomeHyperParams)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise WrongTypeError(f"unknown hyper-parameters {unknown}; accepted: {sorted(fields)}")
    hp = base.replace(**changes) if changes else base
    adapter.check_layer(hp.layer)

    second_moment = layer_second_moment(adapter, hp.layer, stats, corpus,
                                        samples=hp.stats_samples,
                                        token_length=hp.stats_token_length, cache_dir=cache_dir,
                                        progress=progress, ridge=hp.stats_ridge,
                                        solved=not hp.null_space)
    start = time.perf_counter()
    fingerprint = model_fingerprint(model)
    kv = key_and_value(adapter, request, hp, progress)
    left, right = _rank_one_update(adapter, hp, second_moment, kv)
    info = {**kv.info, "seconds": time.perf_counter() - start}
    result = Edit(hp.layer, left, right, model_name=adapter.name, fingerprint=fingerprint,
                  d_mlp=adapter.d_mlp, d_model=adapter.d_model, request=request,
                  hparams=hp.to_dict(), info=info, keys=kv.key[None])
    return result.apply(model)


def _rank_one_update(adapter: ModelAdapter, hp: RomeHyperParams,
                     second_moment: torch.Tensor, kv: KeyValue
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left [d_mlp], right [d_model])`` with ``|left| = 1``; the change is their outer product."""
    key, delta = kv.key, kv.delta.double().to(kv.key.device)
    if hp.null_space:  # AlphaEdit for one key: make k* add delta, inside the null space
        projection = projector(second_moment, hp.null_space_threshold)
        earlier = key_gram(edited_keys(adapter.model, hp.layer), adapter.d_mlp, key.device)
        u = update_left(projection, key[None], earlier, hp.null_space_l2)[:, 0]
        return u / u.norm(), delta * u.norm()
    u = torch.linalg.solve(second_moment.to(key.device), key)  # C^-1 k*
    scale = u.norm()
    if hp.update_key == "average":
        # r-ROME: W' k* = v* = W k0 + delta, i.e. Lambda = (v* - W k*) / (u . k*)
        weight = adapter.w_out(hp.layer).detach().to(torch.float64)
        residual = delta + (kv.bare_key - key).to(weight.device) @ weight
        return u / scale, residual.to(key.device) * scale / (u @ key)
    # Lambda = (v* - W k0) / (u . k0) with k0 the bare prompt's key and v* = W k0 + delta,
    # as the paper's code does: the edited MLP gives the prompt itself exactly v*.
    return u / scale, delta * scale / (u @ kv.bare_key)  # rescaled with the unit left


@contextlib.contextmanager
def edited(model: Model, request: EditRequest | Mapping[str, Any],
           **kwargs) -> Iterator[Edit]:
    """Apply an edit for the duration of a ``with`` block; reverted on exit, errors included."""
    change = edit(model, request, **kwargs)
    try:
        yield change
    finally:
        if change.applied:
            change.revert()
