"""MEMIT: write many facts at once, spreading each over a range of MLP layers.

ROME inserts one key-value pair into one MLP.  MEMIT (Meng, Sen Sharma,
Andonian, Belinkov, Bau; ICLR 2023) edits a batch of requests ``i = 1..n`` and
spreads the change over the layers ``R = l_1 < ... < l_L`` of the critical MLP
path found by causal tracing:

1. **Targets** ``z_i = h_i^{L} + delta_i`` at the last edited layer ``L``: the
   hidden state after block ``L`` at the subject's lookup token, moved by the
   ``delta_i`` that makes ``o*_i`` likely.  Adding ``delta_i`` to the residual
   stream after block ``L`` is adding it to that block's MLP output, so
   ``delta_i`` is exactly ROME's ``v* - W_out k`` at layer ``L``: the loss of
   :mod:`lens_rome.editing.rome`'s ``v*`` optimisation, as the paper's ``compute_z``
   writes it, measures ``delta`` against ``h`` instead of the MLP output (weight
   decay ``|delta| / |h|^2``, clamp ``0.75 |h|``) and uses 5 context prefixes of
   10 tokens (``VALUE_DEFAULTS``; see :func:`target_deltas`).
2. **For each layer** ``l`` in order: the keys ``K`` (``[n, d_mlp]``, each the
   request's key at ``l`` averaged over the prompt and ROME's self-generated
   prefixes, computed with the layers below already edited), the residual
   ``R = (z - h^{L}) / (layers left)`` still missing at ``L`` (at the bare
   prompt), and the least-squares update that adds ``R`` for ``K`` while
   keeping the outputs of the corpus keys, ``C = E[k k^T]``
   (:mod:`lens_rome.editing.statistics`)::

       D_l = (lambda C + K^T K)^-1 K^T R        # [d_mlp, d_model]; W_out += D_l

   ``lambda`` (``mom2_weight``) weighs the corpus keys against the new ones.

With ``null_space=True`` the update of each layer is AlphaEdit's instead
(:mod:`lens_rome.editing.null_space`): confined to the null space of the corpus keys and
keeping the keys of the edits already on the model, which is what keeps a model
fluent over many sequential edits.

One request at one layer reduces to a rank-one update along ROME's direction
``C^-1 k*`` with the same ``delta``; only the scale differs (ROME divides by
``(C^-1 k*)^T k0`` with the bare prompt's key ``k0``, MEMIT by
``lambda + (C^-1 k*)^T k*``).  :func:`edit` returns a :class:`MemitEdit`: it
reverts every touched ``W_out`` bit for bit, saves, loads, and is a context
manager::

    change = memit.edit(model, [{"prompt": "{} is located in the city of",
                                 "subject": "The Eiffel Tower", "target_new": " Rome"},
                                {"prompt": "{} plays the", "subject": "Miles Davis",
                                 "target_new": " piano"}])
    change.revert()
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lens_rome.checks import finite_number, finite_tensor
from lens_rome.data.requests import EditRequest
from lens_rome.editing.hparams import RomeHyperParams, check_update_options
from lens_rome.editing.layout import context_prompts
from lens_rome.editing.null_space import (
    NULL_SPACE_L2,
    NULL_SPACE_THRESHOLD,
    key_gram,
    projector,
    update_left,
)
from lens_rome.editing.rome import Edit
from lens_rome.editing.statistics import KeyStatistics, layer_second_moment, layer_statistics
from lens_rome.editing.values import key_and_value
from lens_rome.editing.weights import WeightEdit, check_update, edited_keys
from lens_rome.errors import InputError, WrongTypeError
from lens_rome.model.adapter import ModelAdapter, adapter_for, model_fingerprint
from lens_rome.model.backend import Model
from lens_rome.storage import load_saved, metadata_keys, save_tensors

log = logging.getLogger(__name__)

SAVE_FORMAT = 1
METADATA_KEY = "lens_rome_memit_edit"
DEFAULT_MOM2_WEIGHT = 15000.0  # the paper's lambda for GPT-J
KEY_BATCH = 64  # prompt rows per forward pass when reading keys

# Per-model defaults.  Layers: critical_layers() of the model's MLP causal trace at the
# last subject token (docs/figures/editing_layer_<model>.json, from
# benchmarks/rome_edits.py --choose-layer; docs/editing.md, "Many edits"); mom2_weight:
# the best score over 30 development cases (benchmarks/sequential_edits.py --choose);
# GPT-2 XL's are the paper's.  Gemma-3-270M's edit quality is not measured yet.
MODEL_DEFAULTS: dict[str, dict] = {
    "smollm2-135m": {"layers": (3, 4, 5), "mom2_weight": 300.0},
    "gemma-3-270m": {"layers": (4, 5, 6, 7)},
    "gpt2-xl": {"layers": (13, 14, 15, 16, 17), "mom2_weight": 20000.0},
}
CRITICAL_FRACTION = 0.85
# Where MEMIT's target optimisation (the paper's ``compute_z``) differs from ROME's v*: the
# delta is measured against the residual stream after the last edited block, clamped to 0.75
# of its norm (the paper's GPT-2 XL and GPT-J settings), and the contexts are the bare prompt
# and 5 generated prefixes of 10 tokens (MEMIT's ``get_context_templates``).
VALUE_DEFAULTS = {"norm_reference": "hidden", "clamp_norm": 0.75, "n_prefixes": 5,
                  "prefix_lengths": (10,)}


def critical_layers(effects: Sequence[float], fraction: float = CRITICAL_FRACTION
                    ) -> tuple[int, ...]:
    """The layers MEMIT spreads an edit over, from an MLP causal trace.

    ``effects[l]``: the average indirect effect of restoring the MLP (window)
    centred on layer ``l`` at the last subject token.  The result is the peak
    layer and the contiguous layers just below it whose effect is at least
    ``fraction`` of the peak's: the critical MLP path that ends where the
    targets ``z`` are set.
    """
    values = [float(v) for v in effects]
    if not values:
        raise InputError("effects is empty: give one average indirect effect per layer")
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], got {fraction!r}")
    peak = max(range(len(values)), key=values.__getitem__)
    first = peak
    while first > 0 and values[first - 1] >= fraction * values[peak]:
        first -= 1
    return tuple(range(first, peak + 1))


@dataclass(frozen=True)
class MemitHyperParams:
    """What shapes a MEMIT (or AlphaEdit) edit.  ``MemitHyperParams.for_model(model)``: defaults.

    Attributes:
        layers: the MLP layers whose ``W_out`` change, increasing; the targets
            ``z`` are at the last one.
        mom2_weight: ``lambda``, the weight of the corpus keys' second moment
            against the new keys (MEMIT only).
        null_space, null_space_threshold, null_space_l2: AlphaEdit's update
            (:mod:`lens_rome.editing.null_space`) instead of MEMIT's.
        value: the ``v*`` optimisation and key settings (lookup token, prefixes,
            steps, KL weight, ...) as :class:`lens_rome.editing.hparams.RomeHyperParams`;
            its ``layer`` is always ``layers[-1]``; default: the model's ROME
            settings with MEMIT's ``VALUE_DEFAULTS``.
    """

    layers: tuple[int, ...]
    mom2_weight: float = DEFAULT_MOM2_WEIGHT
    null_space: bool = False
    null_space_threshold: float = NULL_SPACE_THRESHOLD
    null_space_l2: float = NULL_SPACE_L2
    value: RomeHyperParams | None = None

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise WrongTypeError(f"layers must be a sequence of layer indices, got {layers!r}")
        layers = tuple(layers)
        if not layers or any(isinstance(l, bool) or not isinstance(l, int) or l < 0
                             for l in layers):
            raise InputError(f"layers must be one or more integers >= 0, got {layers!r}")
        if list(layers) != sorted(set(layers)):
            raise InputError(f"layers must be increasing and distinct, got {list(layers)}; "
                             f"e.g. {sorted(set(layers))}")
        object.__setattr__(self, "layers", layers)
        finite_number(self.mom2_weight, "mom2_weight (lambda, the weight of C)", positive=True)
        check_update_options("bare", self.null_space, self.null_space_threshold,
                             self.null_space_l2)
        value = self.value if self.value is not None else RomeHyperParams(
            layer=layers[-1], **VALUE_DEFAULTS)
        if not isinstance(value, RomeHyperParams):
            raise WrongTypeError(f"value must be RomeHyperParams, got {type(value).__name__}")
        if value.layer != layers[-1]:
            value = value.replace(layer=layers[-1])
        object.__setattr__(self, "value", value)

    @classmethod
    def for_model(cls, model: Model | str, **overrides) -> "MemitHyperParams":
        """The defaults for ``model`` (or its name), with ``overrides`` applied.

        ``overrides`` may name fields of this class or of
        :class:`~lens_rome.editing.hparams.RomeHyperParams` (the ``v*`` settings, except ``layer``).
        """
        name = model if isinstance(model, str) else adapter_for(model).name
        own = {f.name for f in dataclasses.fields(cls)} - {"value"}
        theirs = {f.name for f in dataclasses.fields(RomeHyperParams)} - {"layer"} - own
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "layer" in overrides:
            raise WrongTypeError("MEMIT edits several layers: pass layers=[...], not layer=")
        unknown = sorted(set(overrides) - own - theirs)
        if unknown:
            raise WrongTypeError(f"unknown hyper-parameters {unknown}; accepted: "
                            f"{sorted(own | theirs)}")
        defaults = dict(MODEL_DEFAULTS.get(name, {}))
        if "layers" not in defaults and "layers" not in overrides:
            base = RomeHyperParams.for_model(model).layer
            defaults["layers"] = tuple(range(max(base - 2, 0), base + 1))
            log.warning("no default MEMIT layers for %r: using %s (ROME's layer and the two "
                        "below); trace the model's MLPs to choose them", name,
                        list(defaults["layers"]))
        mine = {**defaults, **{k: v for k, v in overrides.items() if k in own}}
        layers = mine["layers"]
        last = (layers,) if isinstance(layers, int) else tuple(layers)
        value = RomeHyperParams.for_model(
            model, **{**VALUE_DEFAULTS, **{k: v for k, v in overrides.items() if k in theirs}},
            layer=last[-1] if last else 0)
        return cls(**mine, value=value)

    def replace(self, **changes) -> "MemitHyperParams":
        """A copy with fields of this class or of ``value`` (the ``v*`` settings) changed."""
        own = {f.name for f in dataclasses.fields(self)}
        value_changes = {k: v for k, v in changes.items() if k not in own}
        if "layer" in value_changes:
            raise WrongTypeError("MEMIT edits several layers: pass layers=[...], not layer=")
        theirs = {f.name for f in dataclasses.fields(RomeHyperParams)} - own
        unknown = sorted(set(value_changes) - theirs)
        if unknown:
            raise WrongTypeError(f"unknown hyper-parameters {unknown}; accepted: "
                            f"{sorted((own | theirs) - {'layer', 'value'})}")
        mine = {k: v for k, v in changes.items() if k in own}
        value = mine.pop("value", self.value)
        if value_changes:
            value = value.replace(**value_changes)
        return dataclasses.replace(self, **mine, value=value)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["layers"] = list(self.layers)
        data["value"] = self.value.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemitHyperParams":
        data = dict(data)
        value = data.pop("value", None)
        if isinstance(value, Mapping):
            value = RomeHyperParams.from_dict(value)
        return cls(**data, value=value)


def check_requests(requests: Sequence[EditRequest | Mapping[str, Any]] | EditRequest | Mapping
                   ) -> list[EditRequest]:
    """The requests parsed; exact repeats dropped (with a warning).

    Raises ``InputError`` for an empty batch and for two requests that rewrite
    the same prompt about the same subject to different targets.
    """
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Iterable):
        raise WrongTypeError(f"requests must be a list of edit requests, got "
                             f"{type(requests).__name__}")
    parsed = [EditRequest.parse(r) for r in requests]
    if not parsed:
        raise InputError("the batch of edit requests is empty: give at least one request "
                         "{'prompt': '{} is located in', 'subject': ..., 'target_new': ...}")
    kept: list[EditRequest] = []
    seen: dict[tuple[str, str], int] = {}
    for index, request in enumerate(parsed):
        fact = (request.subject, request.prompt)
        if fact in seen:
            first = parsed[seen[fact]]
            if first.target_new != request.target_new:
                raise InputError(
                    f"requests {seen[fact]} and {index} rewrite the same fact "
                    f"({request.subject!r} in {request.prompt!r}) to different targets "
                    f"({first.target_new!r} and {request.target_new!r}); keep one of them")
            log.warning("request %d repeats request %d (%r -> %r); editing it once", index,
                        seen[fact], request.subject, request.target_new)
            continue
        seen[fact] = index
        kept.append(request)
    return kept


def _request_rows(adapter: ModelAdapter, request: EditRequest, hp: RomeHyperParams
                  ) -> tuple[list[list[int]], list[int]]:
    """The bare prompt and the prompt after each context prefix (token ids, cut after the
    lookup token, BOS included where the model needs it) and the lookup index in each:
    the same rows as ROME's ``k*`` (:func:`lens_rome.editing.layout.context_prompts`)."""
    bos = adapter.bos
    prompts = context_prompts(adapter, request, hp)
    reference = (prompts[0].subject_range, len(prompts[0].ids))
    rows, lookups = [], []
    for prompt in prompts:
        lookup = prompt.lookup(hp.lookup, reference)
        rows.append(bos + prompt.ids[:lookup + 1])
        lookups.append(len(bos) + lookup)
    return rows, lookups


@torch.no_grad()
def _states_at(adapter: ModelAdapter, rows: list[list[int]], positions: list[int],
               hook: str, stop: int, batch_size: int = KEY_BATCH) -> torch.Tensor:
    """The activation of ``hook`` at ``positions[i]`` of each row ``[n_rows, d]`` (float64).

    Rows are right-padded; attention is causal, so padding never reaches them.
    """
    pad = adapter.pad_id
    store: dict[str, torch.Tensor] = {}

    def keep(activation, hook):
        store["a"] = activation.detach()

    out = []
    for i in range(0, len(rows), batch_size):
        chunk, where = rows[i:i + batch_size], positions[i:i + batch_size]
        width = max(map(len, chunk))
        tokens = adapter.as_tokens([r + [pad] * (width - len(r)) for r in chunk])
        adapter.resid_before(tokens, stop, hooks=[(hook, keep)])
        states = store.pop("a")
        out.append(states[torch.arange(len(chunk)), torch.tensor(where)].to(torch.float64))
    return torch.cat(out)


def request_keys(model: Model, requests: Sequence[EditRequest], layer: int,
                 hp: RomeHyperParams) -> Float[torch.Tensor, "n d_mlp"]:
    """Each request's MLP key at ``layer``, averaged over its prompt and ROME's prefixes
    (ROME's ``k*`` when ``layer`` is its edit layer); float64."""
    return _request_keys(adapter_for(model), requests, layer, hp)


def _request_keys(adapter: ModelAdapter, requests: Sequence[EditRequest], layer: int,
                  hp: RomeHyperParams) -> torch.Tensor:
    rows, positions, owner = [], [], []
    for index, request in enumerate(requests):
        r, p = _request_rows(adapter, request, hp)
        rows += r
        positions += p
        owner += [index] * len(r)
    states = _states_at(adapter, rows, positions, adapter.hook_name("key", layer), layer + 1)
    owner_t = torch.tensor(owner, device=states.device)
    total = torch.zeros(len(requests), states.shape[1], dtype=states.dtype, device=states.device)
    total.index_add_(0, owner_t, states)
    counts = torch.bincount(owner_t, minlength=len(requests)).to(states.dtype)
    return total / counts[:, None]


def hidden_at_lookup(model: Model, requests: Sequence[EditRequest], layer: int,
                     hp: RomeHyperParams) -> Float[torch.Tensor, "n d_model"]:
    """The residual stream after block ``layer`` at each bare prompt's lookup token (float64)."""
    return _hidden_at_lookup(adapter_for(model), requests, layer, hp)


def _hidden_at_lookup(adapter: ModelAdapter, requests: Sequence[EditRequest], layer: int,
                      hp: RomeHyperParams) -> torch.Tensor:
    rows, positions = [], []
    for request in requests:
        r, p = _request_rows(adapter, request, hp.replace(n_prefixes=0))
        rows.append(r[0])
        positions.append(p[0])
    return _states_at(adapter, rows, positions, adapter.hook_name("hidden", layer), layer + 1)


@dataclass
class TargetDeltas:
    """``delta_i`` (``[n, d_model]``, float32): what each request adds after block ``layer``."""

    deltas: Float[torch.Tensor, "n d_model"]
    layer: int
    info: list[dict]


def target_deltas(model: Model, requests: Sequence[EditRequest | Mapping],
                  hparams: MemitHyperParams | None = None, *, progress: bool = False
                  ) -> TargetDeltas:
    """ROME's ``v*`` optimisation at the last MEMIT layer, once per request.

    Depends only on the model as it is now: compute it once and pass it to
    :func:`edit` (``deltas=``) to try several ``mom2_weight`` or layer ranges
    that end at the same layer.
    """
    hp = hparams if hparams is not None else MemitHyperParams.for_model(model)
    return _target_deltas(adapter_for(model), check_requests(requests), hp, progress)


def _target_deltas(adapter: ModelAdapter, requests: list[EditRequest], hp: MemitHyperParams,
                   progress: bool) -> TargetDeltas:
    adapter.check_layer(hp.layers[-1])
    deltas, info = [], []
    for request in tqdm(requests, desc="MEMIT targets", unit="request", disable=not progress):
        kv = key_and_value(adapter, request, hp.value, False)
        deltas.append(kv.delta.detach().float().cpu())
        history = kv.info.get("v_history") or [{}]
        info.append({"lookup_token": kv.info.get("lookup_token"), "v_steps": len(history),
                     "nll": history[-1].get("nll"), "delta_norm": history[-1].get("delta_norm")})
    return TargetDeltas(torch.stack(deltas), hp.layers[-1], info)


def _layer_change(left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``left @ right`` in ``weight``'s dtype and device: the one expression both ``edit`` and
    ``apply`` add, so that a saved edit re-applies to the same bits."""
    return (left.to(weight.device) @ right.to(weight.device)).to(weight.dtype)


class MemitEdit(WeightEdit):
    """A change ``W_out += left_l @ right_l`` to each of several layers of one model.

    ``left_l`` is ``[d_mlp, n]``, ``right_l`` ``[n, d_model]`` (``n`` requests).
    Made by :func:`edit` (applied) or :meth:`load` (not applied).
    :meth:`revert` puts back the exact bits of every touched ``W_out``; edits
    stacked on a model (ROME's and MEMIT's alike) revert in reverse order.
    A context manager: leaving the block reverts it.
    """

    def __init__(self, factors: Mapping[int, tuple[torch.Tensor, torch.Tensor]], *,
                 model_name: str, fingerprint: str, d_mlp: int, d_model: int,
                 requests: Sequence[EditRequest] = (), keys: Mapping[int, torch.Tensor] | None
                 = None, hparams: dict | None = None, info: dict | None = None):
        if not factors:
            raise InputError("a MEMIT edit needs at least one layer")
        super().__init__(model_name=model_name, fingerprint=fingerprint, d_mlp=d_mlp,
                         d_model=d_model, hparams=hparams, info=info)
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in sorted(factors):
            left, right = factors[layer]
            if left.ndim != 2 or right.ndim != 2 or left.shape[0] != d_mlp or \
                    right.shape[1] != d_model or left.shape[1] != right.shape[0]:
                raise InputError(
                    f"layer {layer}: a change of a [{d_mlp}, {d_model}] W_out needs left "
                    f"[{d_mlp}, n] and right [n, {d_model}], got {tuple(left.shape)} and "
                    f"{tuple(right.shape)}")
            self.factors[int(layer)] = (left.detach().float().cpu().contiguous(),
                                        right.detach().float().cpu().contiguous())
        self.keys = {int(l): k.detach().float().cpu() for l, k in (keys or {}).items()}
        self.requests = list(requests)

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return (f"MemitEdit({len(self.requests)} request(s), layers {list(self.layers)} of "
                f"{self.model_name}, {state})")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.factors)

    def keys_at(self, layer: int) -> torch.Tensor | None:
        """The keys ``[n, d_mlp]`` this edit wrote at ``layer`` (None if it did not edit it)."""
        return self.keys.get(layer)

    def weight_delta(self, layer: int) -> Float[torch.Tensor, "d_mlp d_model"]:
        """The change to ``W_out`` of ``layer``."""
        if layer not in self.factors:
            raise InputError(f"this edit changes layers {list(self.layers)}, not {layer}")
        left, right = self.factors[layer]
        return left @ right

    def update_norm(self) -> float:
        """Frobenius norm of the whole change (all layers together)."""
        return float(sum(float(self.weight_delta(l).double().norm()) ** 2
                         for l in self.layers) ** 0.5)

    def layer_change(self, layer: int, weight: torch.Tensor) -> torch.Tensor:
        return _layer_change(*self.factors[layer], weight)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the edit as safetensors (``left.L``, ``right.L``, ``keys.L``) with JSON metadata."""
        tensors = {}
        for layer, (left, right) in self.factors.items():
            tensors[f"left.{layer}"], tensors[f"right.{layer}"] = left, right
        for layer, keys in self.keys.items():
            tensors[f"keys.{layer}"] = keys
        meta = {"format": SAVE_FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
                "layers": list(self.layers), "d_mlp": self.d_mlp, "d_model": self.d_model,
                "requests": [r.to_dict() for r in self.requests], "hparams": self.hparams,
                "info": self.info}
        return save_tensors(path, tensors, METADATA_KEY, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "MemitEdit":
        """Read an edit written by :meth:`save` (not applied: call :meth:`apply`)."""
        return load_saved(path, METADATA_KEY, SAVE_FORMAT, "lens_rome MEMIT edit",
                          cls._from_saved)

    @classmethod
    def _from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "MemitEdit":
        layers = [int(l) for l in meta["layers"]]
        factors = {l: (tensors[f"left.{l}"], tensors[f"right.{l}"]) for l in layers}
        keys = {l: tensors[f"keys.{l}"] for l in layers if f"keys.{l}" in tensors}
        return cls(factors, model_name=meta["model"], fingerprint=meta["fingerprint"],
                   d_mlp=int(meta["d_mlp"]), d_model=int(meta["d_model"]),
                   requests=[EditRequest(**r) for r in meta.get("requests", [])],
                   keys=keys, hparams=meta.get("hparams"), info=meta.get("info"))


def load_edit(path: str | Path) -> "Edit | MemitEdit":
    """A saved ROME :class:`~lens_rome.editing.rome.Edit` or :class:`MemitEdit`, whichever
    ``path`` holds."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if METADATA_KEY in metadata_keys(path):
        return MemitEdit.load(path)
    return Edit.load(path)


def _check_no_post_norm(adapter: ModelAdapter, layers: Sequence[int]) -> None:
    """MEMIT spreads a residual-stream target over ``W_out`` changes, which reach the residual
    stream unchanged only when no norm follows the MLP: refuse the layers where one does."""
    normed = [layer for layer in layers if adapter.mlp_post_norm(layer) is not None]
    if normed:
        raise InputError(
            f"{adapter.name} normalises the output of its MLPs (a norm after the MLP, as in "
            f"Gemma; layers {normed}): MEMIT's update, which adds W_out changes to the residual "
            f"stream as they are, does not hold there, so MEMIT and AlphaEdit batch edits are "
            f"not supported on this model; edit one fact at a time with rome.edit (AlphaEdit's "
            f"projection: rome.edit(..., null_space=True))")


def _second_moment(adapter: ModelAdapter, layer: int, hp: MemitHyperParams,
                   stats, corpus, cache_dir, progress) -> torch.Tensor:
    """``C`` of ``layer``, float64 ``[d_mlp, d_mlp]``: ``stats[layer]``, or computed (cached)."""
    if isinstance(stats, Mapping):
        if layer not in stats:
            raise InputError(f"stats has no entry for layer {layer} (it has "
                             f"{sorted(stats)}); give one per edited layer")
        stats = stats[layer]
    elif stats is not None and len(hp.layers) > 1:
        raise WrongTypeError("MEMIT edits several layers: pass stats as {layer: KeyStatistics}")
    return layer_second_moment(adapter, layer, stats, corpus, samples=hp.value.stats_samples,
                               token_length=hp.value.stats_token_length, cache_dir=cache_dir,
                               progress=progress, ridge=hp.value.stats_ridge,
                               solved=not hp.null_space)


def edit(
    model: Model,
    requests: Sequence[EditRequest | Mapping[str, Any]],
    layers: Sequence[int] | None = None,
    *,
    hparams: MemitHyperParams | None = None,
    stats: Mapping[int, KeyStatistics | torch.Tensor] | None = None,
    deltas: TargetDeltas | None = None,
    corpus: str | Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    **overrides,
) -> MemitEdit:
    """Write a batch of facts into ``model`` in place; returns the applied :class:`MemitEdit`.

    Args:
        requests: edit requests (dicts, :class:`~lens_rome.data.requests.EditRequest`,
            CounterFact records); one request alone is a batch of one.
        layers: the MLP layers to change (default: the model's, ``MODEL_DEFAULTS``).
        hparams: all hyper-parameters (default ``MemitHyperParams.for_model(model)``);
            ``layers`` and ``**overrides`` (``mom2_weight=``, ``null_space=True``,
            ``v_steps=``, ...) change single ones.
        stats: ``{layer: KeyStatistics or [d_mlp, d_mlp] second moment}``; default:
            loaded from the cache, the missing layers computed in one pass.
        deltas: targets from :func:`target_deltas` for these requests on this model
            as it is now (default: computed).
    """
    requests = check_requests(requests)
    adapter = adapter_for(model)
    changes = {**({"layers": tuple(layers)} if layers is not None else {}),
               **{k: v for k, v in overrides.items() if v is not None}}
    if hparams is None:
        hp = MemitHyperParams.for_model(model, **changes)
    else:
        hp = hparams.replace(**changes) if changes else hparams
    for layer in hp.layers:
        adapter.check_layer(layer)
    _check_no_post_norm(adapter, hp.layers)
    if stats is None:  # every layer's statistics from one pass over the corpus
        stats = layer_statistics(adapter, hp.layers, corpus, samples=hp.value.stats_samples,
                                 token_length=hp.value.stats_token_length,
                                 cache_dir=cache_dir, progress=progress)
    moments = {l: _second_moment(adapter, l, hp, stats, corpus, cache_dir, progress)
               for l in hp.layers}
    fingerprint = model_fingerprint(model)
    start = time.perf_counter()
    last = hp.layers[-1]
    if deltas is None:
        deltas = _target_deltas(adapter, requests, hp, progress)
    if deltas.layer != last or tuple(deltas.deltas.shape) != (len(requests), adapter.d_model):
        raise InputError(
            f"deltas are for {deltas.deltas.shape[0]} request(s) at layer {deltas.layer}; this "
            f"edit has {len(requests)} request(s) and its last layer is {last}")
    finite_tensor(deltas.deltas, "MEMIT's target deltas", "recompute them with target_deltas()")
    value_hp = hp.value
    z = _hidden_at_lookup(adapter, requests, last, value_hp)
    z = z + deltas.deltas.to(z)
    factors, keys, originals, per_layer = {}, {}, {}, {}
    try:
        for i, layer in enumerate(hp.layers):
            k = _request_keys(adapter, requests, layer, value_hp)  # [n, d_mlp]
            current = _hidden_at_lookup(adapter, requests, last, value_hp)
            residual = (z - current) / (len(hp.layers) - i)  # [n, d_model]
            c = moments[layer].to(k.device)
            if hp.null_space:
                projection = projector(c, hp.null_space_threshold)
                earlier = key_gram(edited_keys(model, layer), adapter.d_mlp, k.device)
                left = update_left(projection, k, earlier, hp.null_space_l2)
            else:
                left = torch.linalg.solve(hp.mom2_weight * c + k.T @ k, k.T)  # [d_mlp, n]
            left, right = left.float().cpu(), residual.float().cpu()
            weight = adapter.w_out(layer)
            change = check_update(_layer_change(left, right, weight), layer)
            with torch.no_grad():
                originals[layer] = weight.detach().clone()
                weight.add_(change)
            factors[layer], keys[layer] = (left, right), k.float().cpu()
            per_layer[str(layer)] = {
                "residual_norm": float((z - current).norm(dim=1).mean()),
                "update_norm": float((left.double() @ right.double()).norm())}
            log.debug("MEMIT layer %d: %s", layer, per_layer[str(layer)])
        final = _hidden_at_lookup(adapter, requests, last, value_hp)
    except BaseException:
        with torch.no_grad():
            for layer, original in reversed(list(originals.items())):
                adapter.w_out(layer).copy_(original)
        raise
    info = {"layers": per_layer, "targets": deltas.info,
            "remaining_residual": float((z - final).norm(dim=1).mean()),
            "target_norm": float(deltas.deltas.norm(dim=1).mean()),
            "seconds": time.perf_counter() - start}
    result = MemitEdit(factors, model_name=adapter.name, fingerprint=fingerprint,
                       d_mlp=adapter.d_mlp, d_model=adapter.d_model, requests=requests,
                       keys=keys, hparams=hp.to_dict(), info=info)
    result._attach(model, originals)
    return result


@contextlib.contextmanager
def edited(model: Model, requests: Sequence[EditRequest | Mapping[str, Any]],
           layers: Sequence[int] | None = None, **kwargs) -> Iterator[MemitEdit]:
    """Apply a MEMIT edit for the duration of a ``with`` block; reverted on exit, errors too."""
    change = edit(model, requests, layers, **kwargs)
    try:
        yield change
    finally:
        if change.applied:
            change.revert()
