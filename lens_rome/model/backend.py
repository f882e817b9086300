"""Which TransformerLens model classes this installation has.

TransformerLens 3.x has ``HookedTransformer`` and ``TransformerBridge``; 4.x
has the bridge only.  Everything else in lens_rome names a model as
:data:`Model` and asks :func:`lens_rome.model.adapter.adapter_for` how to
drive it, so this module is the only one that imports either class by name.
"""

from __future__ import annotations

import importlib.metadata
from typing import Union

from transformer_lens.model_bridge import TransformerBridge

try:
    from transformer_lens import HookedTransformer
except ImportError:  # TransformerLens 4: removed
    HookedTransformer = None

TRANSFORMER_LENS_VERSION = importlib.metadata.version("transformer-lens")
HAS_HOOKED = HookedTransformer is not None
BACKENDS = ("hooked", "bridge") if HAS_HOOKED else ("bridge",)
DEFAULT_BACKEND = "hooked" if HAS_HOOKED else "bridge"

# A model lens_rome works on, for annotations: a HookedTransformer or a TransformerBridge.
Model = Union["HookedTransformer", TransformerBridge]


def require_hooked(what: str) -> None:
    """Raise a clear error where ``what`` needs ``HookedTransformer`` and it is gone."""
    if not HAS_HOOKED:
        from lens_rome.errors import InputError  # noqa: PLC0415

        raise InputError(
            f"{what} needs transformer_lens.HookedTransformer, which TransformerLens "
            f"{TRANSFORMER_LENS_VERSION} removed; use backend='bridge' (a TransformerBridge), "
            f"or install transformer-lens<4"
        )
