"""The model seam: the one place that knows how a model is laid out.

Tracing and editing never touch hook names, ``W_out``, the config or BOS
handling directly: they ask the adapter that :func:`adapter_for` builds once
per entry point, a :class:`ModelAdapter` for a ``HookedTransformer``
(:mod:`lens_rome.model.hooked`) or a :class:`BridgeAdapter` for a
``TransformerBridge`` (:mod:`lens_rome.model.bridge`).  Hook names are data,
:data:`HOOK_NAMES` (:mod:`lens_rome.model.hook_names`).
"""

from __future__ import annotations

import hashlib
import json

from lens_rome.errors import WrongTypeError
from lens_rome.model.backend import HookedTransformer, Model, TransformerBridge
from lens_rome.model.bridge import BridgeAdapter
from lens_rome.model.hook_names import HOOK_NAMES
from lens_rome.model.hooked import ModelAdapter, ModelState

__all__ = ["HOOK_NAMES", "BridgeAdapter", "ModelAdapter", "ModelState", "adapter_for",
           "model_fingerprint"]


def adapter_for(model: Model) -> ModelAdapter:
    """The adapter that lets tracing and editing work on ``model``."""
    if HookedTransformer is not None and isinstance(model, HookedTransformer):
        return ModelAdapter(model)
    if isinstance(model, TransformerBridge):
        return BridgeAdapter(model)
    raise WrongTypeError(
        "lens_rome works on transformer_lens.HookedTransformer and "
        f"transformer_lens.model_bridge.TransformerBridge models, got {type(model).__name__}"
    )


def model_fingerprint(model: Model) -> str:
    """A short hash of ``model``'s shape and of weights that ROME never edits.

    Covers the config's shape fields, the token embeddings and every MLP's
    ``W_in`` (strided samples of each), so it is cheap, tells different models
    apart, and stays the same while edits change ``W_out``.
    """
    cfg = model.cfg
    digest = hashlib.sha256()
    shape = {k: getattr(cfg, k, None) for k in (
        "n_layers", "d_model", "d_mlp", "d_vocab", "n_heads", "d_head", "act_fn",
        "normalization_type", "positional_embedding_type",
    )}
    digest.update(json.dumps(shape, sort_keys=True, default=str).encode())
    for tensor in adapter_for(model).fingerprint_tensors():
        sample = tensor.detach().float().cpu().contiguous().flatten()[::97]
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]
